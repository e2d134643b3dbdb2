"""Process launching details that Lightning leaves to the user.

Hydra multirun + Lightning DDP: Lightning starts ranks > 0 by re-running the command line with
`hydra.run.dir` added. Under `-m` that command is the whole sweep, so every extra rank would start the sweep
again and write stray run directories (pitfall P10; Lightning and Hydra issues still open). `relaunch_as_job`
replaces that command with a single run of *this* job: its own overrides, its output directory, no config
copy. It works for plain runs too, so it is installed unconditionally by `train.py`.

Why a private function is replaced: Lightning 2.6's subprocess launcher builds the Hydra command in
`_hydra_subprocess_cmd` and offers no public hook for it (neither the launcher nor the strategy takes a
command). The public route avoids the launcher altogether: start every rank with `torchrun` or `srun` (the
README's recipes), and Lightning spawns nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence


def job_command(local_rank: int) -> tuple[Sequence[str], str]:
    """The command and working directory that start rank `local_rank` of the current Hydra job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hydra_cfg = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += list(hydra_cfg.overrides.task)
    command += [
        f"hydra.run.dir={hydra_cfg.runtime.output_dir}",
        f"hydra.job.name={hydra_cfg.job.name}_rank{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


def relaunch_as_job() -> None:
    """Make Lightning's subprocess launcher start ranks > 0 as single runs of the current Hydra job."""
    from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
    from lightning.pytorch.strategies.launchers import subprocess_script as trainer_launcher

    fabric_launcher._hydra_subprocess_cmd = job_command
    trainer_launcher._hydra_subprocess_cmd = job_command


@contextlib.contextmanager
def restored_environment() -> Iterator[None]:
    """Restore `os.environ` afterwards.

    A launcher's LOCAL_RANK/MASTER_PORT would make the next job of the same process believe it was started by
    torchrun and wait for ranks that never come.
    """
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def restored_signals() -> Iterator[None]:
    """Put back every stop signal's handler afterwards, however the run ended.

    A run installs handlers (preemption, Lightning's own), and Lightning sets Ctrl-C to be ignored when a
    second Ctrl-C interrupts it, never undoing that: the caller (a test suite, a notebook, the next job of a
    multirun) could no longer be stopped with Ctrl-C.
    """
    stops = [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP]
    saved = {sig: signal.getsignal(sig) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None and threading.current_thread() is threading.main_thread():
                signal.signal(sig, handler)


def relaunched_rank() -> bool:
    """True in a rank > 0 started by Lightning, torchrun or SLURM: rank 0 checks and records the run alone."""
    return any(int(os.environ.get(var, 0)) > 0 for var in ("LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID"))


# Warnings every run would print, each about a choice this project makes on purpose.
_KNOWN_WARNINGS = (
    # Validation metrics are summed over ranks before they are logged (lit_module.on_validation_epoch_end).
    r".*It is recommended to use `self\.log\('val/",
    # Deprecations inside torchdata / Lightning's use of torch internals, not in this project's code.
    r".*'set_vital' is deprecated",
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated",
    # A run's checkpoint folder has files only when it resumes (a new run refuses a used name before this).
    r"Checkpoint directory .* exists and is not empty",
)


class _DropTip(logging.Filter):
    """Drops Lightning's advertisement for its hosted logger, printed at every start."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_known_warnings() -> None:
    """Silence known noise; everything else still prints.

    The warnings listed in `_KNOWN_WARNINGS`, Lightning's logger tip, and huggingface_hub's "saved" notices
    (its serialisation logger is named after its file).
    """
    from huggingface_hub import save_torch_state_dict

    for pattern in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTip())
    logging.getLogger(save_torch_state_dict.__code__.co_filename).setLevel(logging.WARNING)
