"""Training callbacks: throughput in real (non-padding) rows per second and padding efficiency.

A row is one step of the token grid: one text token or one 80 ms audio frame (12.5 frames/s) across all
8 channels. Padding rows cost compute but teach nothing, so throughput counts real rows only.
"""

from __future__ import annotations

import time

import lightning as L


class ThroughputMonitor(L.Callback):
    """Logs real frames/s and padding efficiency (real rows / computed rows) every `window` batches.

    Run totals are kept in `summary` for the end-of-run report.
    """

    def __init__(self, window: int = 10):
        self.window = window
        self.summary: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = self._t0 = time.perf_counter()
        self._rows = self._computed = self._total_rows = self._total_computed = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        real = int(batch["real_rows"])
        computed = batch["input_ids"].shape[0] * batch["input_ids"].shape[1]
        self._rows += real
        self._computed += computed
        self._total_rows += real
        self._total_computed += computed
        if (batch_idx + 1) % self.window:
            return
        elapsed = time.perf_counter() - self._t0
        pl_module.log_dict(
            {
                "perf/real_frames_per_s": self._rows / max(elapsed, 1e-9),
                "perf/padding_efficiency": self._rows / max(self._computed, 1),
            },
            batch_size=1,
        )
        self._t0, self._rows, self._computed = time.perf_counter(), 0, 0

    def on_train_end(self, trainer, pl_module) -> None:
        wall = time.perf_counter() - self._start
        self.summary = {
            "wall_s": wall,
            "real_rows": self._total_rows,
            "real_frames_per_s": self._total_rows / max(wall, 1e-9),
            "padding_efficiency": self._total_rows / max(self._total_computed, 1),
        }
