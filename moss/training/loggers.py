"""Logger factories that need a decision at run time, and a CSV logger that keeps a resumed run's history."""

from __future__ import annotations

import csv
import io
import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from moss.outputs import atomic_write


def wandb_account_configured() -> bool:
    """True when wandb has credentials: WANDB_API_KEY, or an api.wandb.ai entry from `wandb login`."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(offline: bool | None = None, **kwargs) -> WandbLogger:
    """A WandbLogger that runs offline unless an account is configured (or `offline` says otherwise)."""
    if offline is None:
        offline = os.environ.get("WANDB_MODE") == "offline" or not wandb_account_configured()
    return WandbLogger(offline=offline, **kwargs)


class _HistoryWriter(ExperimentWriter):
    """Lightning's CSV writer without its one destructive habit: it deleted `metrics.csv` when it found one.

    The rows already in the file are the run's history; `keep_until(step)` cuts them back to the steps before
    `step` (the resumed position: the steps after it are trained, and logged, again). Every rewrite of the
    file is atomic, so a kill during one leaves the old history, never half of it.
    """

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            with path.open(newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])

    def keep_until(self, step: int) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with path.open(newline="") as file:
            rows = [row for row in csv.DictReader(file) if _step(row) < step]
        self._write(rows)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as file:
            self._write(list(csv.DictReader(file)), fieldnames)

    def _write(self, rows: list[dict], fieldnames: list[str] | None = None) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fieldnames or self.metrics_keys)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.metrics_file_path, lambda tmp: tmp.write_text(text.getvalue(), newline=""))


def _step(row: dict) -> int:
    try:
        return int(float(row.get("step") or 0))
    except ValueError:
        return 0


class RunCSVLogger(CSVLogger):
    """`logs/metrics.csv`, appended across resumes.

    An interrupted and resumed run ends with the same rows, at the same steps, as an uninterrupted one (train.py
    calls `keep_until` with the step a run starts from).
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> _HistoryWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryWriter(log_dir=self.log_dir)
        return self._experiment

    def keep_until(self, step: int) -> None:
        """Drop rows logged at `step` or later (0: a fresh run, none kept)."""
        if self.experiment is not None:  # None on ranks > 0, which log nothing
            self.experiment.keep_until(step)
