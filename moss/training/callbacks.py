"""Training callbacks: throughput in real frames per second, packing efficiency, skipped samples.

A frame is one row of the token grid: one text token or one 80 ms audio frame (12.5 frames/s) across all 8
channels. Padding rows cost compute but teach nothing, so throughput counts real rows only.
"""

from __future__ import annotations

import time

import lightning as L


class ThroughputMonitor(L.Callback):
    """Logs every `window` micro-batches, per rank.

    * `perf/real_frames_per_s`: real (non-padding) rows per second;
    * `perf/packing_efficiency`: real rows / computed rows (1.0 = no compute spent on padding);
    * `perf/samples_per_batch`: samples per micro-batch (per pack when packing one pack per batch);
    * `data/skipped_<reason>`: samples skipped so far by this rank's readers (see the skip report).

    Run totals are kept in `summary` for the end-of-run report.
    """

    def __init__(self, window: int = 10):
        self.window = window
        self.summary: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = self._t0 = time.perf_counter()
        self._rows = self._computed = self._samples = self._batches = 0
        self._total_rows = self._total_computed = 0
        self._skipped: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        real = int(batch["real_rows"])
        computed = batch["input_ids"].shape[0] * batch["input_ids"].shape[1]
        self._rows, self._computed = self._rows + real, self._computed + computed
        self._total_rows, self._total_computed = self._total_rows + real, self._total_computed + computed
        self._samples, self._batches = self._samples + batch.get("num_samples", 0), self._batches + 1
        self._skipped[batch.get("reader", 0)] = batch.get("skipped", {})
        if (batch_idx + 1) % self.window:
            return
        elapsed = time.perf_counter() - self._t0
        skipped = {}
        for counts in self._skipped.values():
            for reason, n in counts.items():
                key = "data/skipped_" + reason.replace(" ", "_").replace("-", "_")
                skipped[key] = skipped.get(key, 0) + n
        pl_module.log_dict(
            {
                "perf/real_frames_per_s": self._rows / max(elapsed, 1e-9),
                "perf/packing_efficiency": self._rows / max(self._computed, 1),
                "perf/samples_per_batch": self._samples / max(self._batches, 1),
                **{k: float(v) for k, v in skipped.items()},
            },
            batch_size=1,
        )
        self._t0, self._rows, self._computed, self._samples, self._batches = time.perf_counter(), 0, 0, 0, 0

    def on_train_end(self, trainer, pl_module) -> None:
        wall = time.perf_counter() - self._start
        self.summary = {
            "wall_s": wall,
            "real_rows": self._total_rows,
            "real_frames_per_s": self._total_rows / max(wall, 1e-9),
            "packing_efficiency": self._total_rows / max(self._total_computed, 1),
            "skipped": {r: n for counts in self._skipped.values() for r, n in counts.items()},
        }
