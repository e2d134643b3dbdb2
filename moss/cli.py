"""What every command-line entry point shares: a mistake in a command is one message, not a traceback.

`command` wraps the body of a `@hydra.main` function. A `ConfigError`, a `FileNotFoundError` (our messages
name the setting that points at the file) or a required `???` setting left unset is printed as
`error: ...` with the fix; the run directory Hydra made for this attempt is removed when it holds nothing,
and the process exits with status 2. `HYDRA_FULL_ERROR=1` re-raises, for the full trace. Anything else is a
bug or a machine problem and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf.errors import MissingMandatoryValue

from moss.config_schema import setting_keys
from moss.errors import ConfigError
from moss.outputs import refused_write, writable_folder_problem

USAGE_ERROR = 2  # the conventional exit status of a command-line mistake (argparse uses it too)


def command(task: Callable) -> Callable:
    """Decorate a Hydra task function (below `@hydra.main`) so usage errors exit 2 with one message."""

    @functools.wraps(task)
    def run_task(cfg):
        global _task_started
        if _user_full_error is not None:  # started by `run`, which set HYDRA_FULL_ERROR for Hydra alone
            _task_started = True
            if not _user_full_error:
                os.environ.pop("HYDRA_FULL_ERROR", None)
        try:
            return task(cfg)
        except Exception as err:
            if (refused := refused_write(err)) and os.environ.get("HYDRA_FULL_ERROR") != "1":
                print(f"error: {refused}", file=sys.stderr)
                sys.exit(1)
            usage = usage_error_behind(err)
            if usage is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            _remove_if_empty(_hydra_run_dir())
            print(f"error: {usage_message(usage)}", file=sys.stderr)
            sys.exit(USAGE_ERROR)

    return run_task


def usage_error_behind(err: BaseException | None) -> Exception | None:
    """The usage error behind `err`, also when Hydra's instantiate wrapped it (its `__cause__`), else None."""
    while err is not None:
        if isinstance(err, ConfigError | FileNotFoundError | MissingMandatoryValue):
            return err
        err = err.__cause__
    return None


def usage_message(err: Exception) -> str:
    """The message of a usage error; an unset `???` setting becomes the override that sets it."""
    if isinstance(err, MissingMandatoryValue):
        key = getattr(err, "full_key", None) or "a required setting"
        return f"{key} is required; set {key}=... on the command line (see the comment in its conf/*.yaml)"
    return str(err)


def require(cfg, keys: dict[str, str]) -> list[str]:
    """Problems for every key of `keys` left unset (`???` or null) in `cfg`; values are example settings."""
    from omegaconf import OmegaConf

    problems = []
    for key, example in keys.items():
        node, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, node) if node else cfg
        if parent is None or leaf not in parent or OmegaConf.is_missing(parent, leaf) or parent[leaf] is None:
            problems.append(f"{key} is required; set {key}={example}")
    return problems


def fail(title: str, problems: list[str]) -> None:
    """Raise one ConfigError listing `problems` (each with its fix), if there are any."""
    if problems:
        raise ConfigError(f"{title}:\n  - " + "\n  - ".join(problems))


def _hydra_run_dir() -> Path | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):  # not started by Hydra (a test calling the task directly)
        return None


def _remove_if_empty(folder: Path | None) -> None:
    """Remove the empty run directory Hydra created for a command that did nothing.

    Its empty parents go too, up to the working directory (`runs/` of `runs/<name>`); a folder with anything in
    it stays.
    """
    if folder is None:
        return
    cwd, folder = Path.cwd().resolve(), folder.resolve()
    while folder != cwd:
        try:
            folder.rmdir()  # only succeeds when empty
        except OSError:
            return
        if cwd not in folder.parents:
            return
        folder = folder.parent


def quote_values(argv: list[str], keys: tuple[str, ...]) -> list[str]:
    """Quote the values of free-text overrides (`text=...`) for Hydra's grammar.

    The shell has already removed the quotes of `text='[S1]Hello, welcome back.[S2]Hi.'`, and Hydra would read
    the bare value as a list (`[S1]...`) and fail. A value that is already quoted for Hydra is left as it is.
    """
    quoted = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in keys and not (value[:1] in ("'", '"') and value[-1:] == value[:1] and len(value) > 1):
            # Hydra's quoted strings: backslashes are literal except a run just before a quote or the end.
            escaped = re.sub(r"(\\+)(?='|$)", r"\1\1", value).replace("'", "\\'")
            arg = f"{key}='{escaped}'"
        quoted.append(arg)
    return quoted


def slot_additions_as_choices(config_dir: Path, config_name: str, argv: list[str]) -> list[str]:
    """`+experiment=NAME` (lightning-hydra-template's spelling) as `experiment=NAME`, for every defaults slot.

    A slot is a group the defaults list already names (`experiment: null`, `debug: null`, ...). Hydra refuses
    the `+` form there ("Multiple values for experiment"); both mean the same choice, so both are accepted and
    compose the same config. `++` and additions of keys that are not slots are left as written.
    """
    slots = _slots(config_dir, config_name)
    out = list(argv[:1])
    for arg in argv[1:]:
        key = arg[1:].split("=", 1)[0] if arg.startswith("+") and not arg.startswith("++") and "=" in arg else None
        out.append(arg[1:] if key in slots else arg)
    return out


def _slots(config_dir: Path, config_name: str) -> set[str]:
    """The groups the command's defaults list names (`experiment`, `debug`, `codec`, ...)."""
    return {
        str(key).removeprefix("optional ").split("/")[-1]
        for entry in _defaults(config_dir, config_name)
        for key in (entry if isinstance(entry, dict) else [entry])
    }


def run(main: Callable, config_dir: Path, config_name: str, free_text: tuple[str, ...] = ()) -> None:
    """Start the `@hydra.main` function `main`: Hydra composes the config once, and its refusals are ours to word.

    An override of a key the config lacks, a group option that does not exist, a syntax error or a folder Hydra
    cannot make is one `error:` line and exit status 2, naming the closest key or option, instead of Hydra's
    report and exit 1. `+slot=NAME` is taken as `slot=NAME`, and the values of free-text keys are quoted.
    `HYDRA_FULL_ERROR=1` keeps Hydra's own report and every traceback.
    """
    global _user_full_error
    argv = slot_additions_as_choices(config_dir, config_name, quote_values(sys.argv, free_text))
    sys.argv = argv
    _user_full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors instead of printing them; `command` restores it
    try:
        main()
    except Exception as err:
        if _task_started or _user_full_error:
            raise
        problems = _composition_problems(err, config_dir, config_name, argv)
        if problems is None:
            raise
        _usage_error(*problems)


_user_full_error: bool | None = None  # HYDRA_FULL_ERROR as the user set it (`run` sets it for Hydra)
_task_started = False  # past Hydra's composition: errors from here on are the command's own


def _composition_problems(err: Exception, config_dir: Path, config_name: str, argv: list[str]) -> list[str] | None:
    """What Hydra refused before the command started, in lines for `error:`; None when it is not Hydra's."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException

    args = [a for a in argv[1:] if "=" in a and not a.startswith("-")]
    if isinstance(err, MissingConfigException) and err.options is not None:
        import difflib

        group, _, option = str(err.missing_cfg_file).rpartition("/")
        close = difflib.get_close_matches(option, err.options, n=1, cutoff=0.5)
        hint = f"; did you mean {group}={close[0]}?" if close else ""
        return [f"{group}={option} is not an option of conf/{group}/{hint} (the options: {', '.join(err.options)})"]
    if isinstance(err, ConfigCompositionException):
        overrides = OverridesParser.create().parse_overrides(args)
        groups = {p.name for p in config_dir.iterdir() if p.is_dir()}
        choices = [a for a, o in zip(args, overrides, strict=True) if o.key_or_group.split("/")[0] in groups]
        try:
            from hydra import compose, initialize_config_dir

            with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
                cfg = compose(config_name, overrides=choices)
        except HydraException:
            cfg = None
        unknown = _unknown_settings(cfg, overrides, groups) if cfg is not None else []
        return ["unknown settings:", *unknown] if unknown else [_first_lines(err)]
    if isinstance(err, HydraException):
        override = getattr(err, "override", None)  # a syntax error: which override, then where in it
        return [f"{override}: {_first_lines(err)}" if override else _first_lines(err)]
    if isinstance(err, OSError):  # Hydra could not make the command's folder (hydra.run.dir): name the setting
        failed = str(err.filename or "")
        for arg in args:
            key, _, value = arg.partition("=")
            if value and (key == "output_dir" or failed.startswith(value.rstrip("/") + "/") or failed == value):
                return [writable_folder_problem(Path(value), key) or f"{key}={value}: {err}"]
        return [f"the command's folder cannot be made: {err}"]
    return None


def _first_lines(err: Exception) -> str:
    """Hydra's message without its config search path."""
    return str(err).split("\nConfig search path")[0].strip().replace("\n", " ")


def _unknown_settings(cfg, overrides, groups: set[str]) -> list[str]:
    """`key=value` changes of keys `cfg` lacks, each with the closest key it has."""
    import difflib

    from omegaconf import OmegaConf

    known = setting_keys(OmegaConf.to_container(cfg, resolve=False))
    problems = []
    for override in overrides:
        key = override.key_or_group
        if override.type.name != "CHANGE" or override.package or key.split("/")[0] in groups:
            continue  # an addition, a deletion or a group choice (`model=tiny`, `hydra/job_logging=...`)
        if key.startswith("hydra."):
            continue
        node, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, node) if node else cfg
        if OmegaConf.is_dict(parent) and leaf in parent.keys():  # `in parent` is False for a ??? value
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
        hint = f"did you mean {close[0]}=...?" if close else "see the comments in conf/ for the settings there are"
        problems.append(f"{key} is not a setting of this command; {hint}")
    return problems


def _usage_error(title: str, *problems: str) -> None:
    print("error: " + "\n  - ".join([title, *problems]), file=sys.stderr)
    sys.exit(USAGE_ERROR)


def _defaults(config_dir: Path, config_name: str) -> list:
    from omegaconf import OmegaConf

    entries = OmegaConf.to_container(OmegaConf.load(config_dir / f"{config_name}.yaml")).get("defaults") or []
    return [entry for entry in entries if isinstance(entry, dict)]


@contextlib.contextmanager
def stop_signals_interrupt():
    """SIGTERM and SIGUSR1 (what schedulers send, often to the whole process group) stop a command like Ctrl-C.

    The command's own `KeyboardInterrupt` handling (finishing a results list, keeping finished shards) then
    runs for them too; the previous handlers come back afterwards.
    """

    def stop(signum, frame):
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
