"""The one error type for a setting the user must change.

A `ConfigError` message lists every problem found and, for each, the override that fixes it. The command-line
entry points (`moss.cli`) print it without a traceback and exit with status 2, so a mistake in a command reads
as one message, not as a crash.
"""


def first_line(err: BaseException, limit: int = 300) -> str:
    """`TypeName: first line of the message` (clipped), for one-line reports of a library's failure."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:limit] if lines else ''}".rstrip(": ")


class ConfigError(ValueError):
    """A setting (an override, a config.json, a path) that the user must change; the message names the fix."""
