"""Progress in optimiser steps of the whole run: a bar on a terminal, a log line every N seconds elsewhere.

Lightning's bar counts batches of an epoch; a streamed run has no epochs (it showed `Epoch 0/-2`, and
`300/57` after a resume) and, when output goes to a file, printed once at the end of the run. This callback
counts `global_step` against `trainer.max_steps`, from wherever a resumed run starts, so a log file of a
multi-day job says where it is and when it will end.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta
from typing import Literal

import lightning as L
from tqdm import tqdm

from moss.settings import NonNegative

log = logging.getLogger(__name__)

# Metrics shown when known (all are host values: reading them never waits for the device).
SHOWN = (
    ("train/loss", "loss", "{:.4f}"),
    ("val/loss", "val/loss", "{:.4f}"),
    ("perf/real_frames_per_s", "frames/s", "{:,.0f}"),
)


class StepProgress(L.Callback):
    """Optimiser steps done / `max_steps`, loss, real frames/s and ETA, on rank 0.

    Args:
        interval_s: seconds between log lines when the output is not a terminal (0: every step).
        bar: "auto" (a bar on a terminal, log lines otherwise), "bar" or "log".
    """

    def __init__(self, interval_s: NonNegative = 30.0, bar: Literal["auto", "bar", "log"] = "auto"):
        self.interval_s, self.mode = float(interval_s), bar
        self._bar: tqdm | None = None
        self._step = self._logged = -1
        self._measured: dict[str, tuple[float, int]] = {}  # metric -> (value, step it was logged at)

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        self._first, self._step, self._t0 = trainer.global_step, trainer.global_step, time.monotonic()
        self._last_line = self._t0
        terminal = sys.stderr.isatty() if self.mode == "auto" else self.mode == "bar"
        if terminal:
            self._bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, unit="step", dynamic_ncols=True)
        elif trainer.global_step:
            log.info("resumed at step %d of %d", trainer.global_step, trainer.max_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero or trainer.global_step == self._step:
            return  # inside an accumulation window: no optimiser step yet
        self._step = trainer.global_step
        if self._bar is not None:
            self._bar.update(trainer.global_step - self._bar.n)
            self._bar.set_postfix_str(self._metrics(trainer), refresh=False)
        elif time.monotonic() - self._last_line >= self.interval_s:
            self._log_line(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get("val/loss")
        if trainer.is_global_zero and value is not None and not trainer.sanity_checking:
            message = f"step {trainer.global_step}: val/loss {float(value):.4f}"
            self._bar.write(message) if self._bar is not None else log.info(message)

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._logged != trainer.global_step:
            self._log_line(trainer)

    def _log_line(self, trainer) -> None:
        now = time.monotonic()
        self._last_line, self._logged = now, trainer.global_step
        done, total = trainer.global_step, max(trainer.max_steps, 1)
        elapsed = now - self._t0
        rate = (done - self._first) / elapsed if elapsed > 0 else 0.0
        eta = timedelta(seconds=round((total - done) / rate)) if rate > 0 else "?"
        parts = [f"step {done}/{total} ({done / total:.0%})", self._metrics(trainer)]
        parts.append(f"elapsed {timedelta(seconds=round(elapsed))}, ETA {eta}")
        log.info(" | ".join(p for p in parts if p))

    def _metrics(self, trainer) -> str:
        """The `SHOWN` metrics that are host values (a device tensor is left out: reading it would sync).

        Metrics are logged every `trainer.log_every_n_steps`; one from an earlier step says which step it is from,
        so a line never passes off an old loss as the current one.
        """
        metrics, shown = trainer.callback_metrics, []
        for key, name, fmt in SHOWN:
            if key not in metrics or metrics[key].device.type != "cpu":
                continue
            value = float(metrics[key])
            if self._measured.get(key, (None,))[0] != value:
                self._measured[key] = (value, trainer.global_step)
            step = self._measured[key][1]
            shown.append(f"{name} {fmt.format(value)}" + (f" (step {step})" if step != trainer.global_step else ""))
        return ", ".join(shown)
