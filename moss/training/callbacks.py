"""Training callbacks: throughput (real frames/s per device and in total), packing efficiency, MFU, memory.

A frame is one row of the token grid: one text token or one 80 ms audio frame (12.5 frames/s) across all 8
channels. Padding rows cost compute but teach nothing, so throughput counts real rows only.

MFU (model FLOPs utilisation) = useful FLOPs per second / peak FLOPs of the devices, with the FLOP model of
`moss.training.flops`, logged in three accountings side by side: `perf/mfu` (ours: causal attention counted as
half the square), `perf/mfu_foundry` (llm-foundry's: the full square) and `perf/hfu` (ours plus the forward that
gradient checkpointing recomputes). Peak FLOPs: `peak_tflops` per device, or the project's table of GPUs
(dense bf16); without either, MFU is not logged.
"""

from __future__ import annotations

import resource
import time
from collections import Counter
from typing import Literal

import lightning as L
import torch

from moss.model.lora import unwrap
from moss.settings import Count, NonNegative, Positive, Size
from moss.training.flops import flop_model, peak_tflops, step_flops


def build_callbacks(group) -> dict[str, L.Callback]:
    """The callbacks of the `callbacks` config group by name; an entry that is null, or builds to None, is off."""
    from hydra.utils import instantiate

    built = {name: instantiate(node) for name, node in (group or {}).items() if node is not None}
    return {name: callback for name, callback in built.items() if callback is not None}


def early_stopping(
    patience: Size | None = None,
    min_delta: NonNegative = 0.0,
    monitor: str = "val/loss",
    mode: Literal["min", "max"] = "min",
) -> L.Callback | None:
    """Stop when `monitor` has not improved by `min_delta` for `patience` validations; None: never stop early.

    `monitor` is `val/loss` or a metric of the quality gate (`val/cer` with mode min, `val/switch_acc` max, ...).
    """
    if patience is None:
        return None
    from lightning.pytorch.callbacks import EarlyStopping

    return EarlyStopping(monitor=monitor, mode=mode, patience=int(patience), min_delta=float(min_delta))


class FrameThroughput(L.Callback):
    """Logs every `window` optimiser steps.

    * `perf/real_frames_per_s` (this device, in the progress bar) and `perf/real_frames_per_s_total` (all ranks);
    * `perf/packing_efficiency`: real rows / computed rows (1.0 = no compute spent on padding);
    * `perf/samples_per_batch`: samples per micro-batch (per pack when packing one pack per batch);
    * `perf/mfu`, `perf/mfu_foundry`, `perf/hfu` (when the device's peak is known or `peak_tflops` is given)
      and `perf/tflops_per_device` (ours);
    * `perf/peak_memory_gb`: peak allocated accelerator memory (peak RSS on CPU);
    * `data/skipped_<reason>`: samples skipped so far by this rank's readers (see the skip report);
    * `data/epoch` (a run planned in epochs) and, with `data.sources`, `data/samples_<source>` and
      `data/epoch_<source>`: samples trained on so far (this rank's count x ranks), over the samples of an epoch.

    Run totals are kept in `summary` for the end-of-run report; the sample counts are saved in checkpoints, so the
    epochs logged go on from where a resumed run stopped.
    """

    def __init__(self, window: Count = 10, peak_tflops: Positive | None = None):
        self.window, self.peak_override = window, peak_tflops
        self.summary: dict = {}
        self._total_samples = 0
        self._drawn: Counter = Counter()  # samples per data source, this rank

    def state_dict(self) -> dict:
        return {"samples": self._total_samples, "sources": dict(self._drawn)}

    def load_state_dict(self, state: dict) -> None:
        self._total_samples = int(state.get("samples", 0))
        self._drawn = Counter(state.get("sources", {}))

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = self._t0 = time.perf_counter()
        self._rows = self._computed = self._samples = self._batches = self._sq = 0
        self._total_rows = self._total_computed = self._total_flops = 0
        self._skipped: dict[int, dict] = {}
        # Samples of one epoch, when the run was planned in epochs (`MossDataModule.epoch_plan`), and per source.
        self._epoch_samples = getattr(trainer.datamodule, "epoch_samples", None) if trainer.datamodule else None
        self._source_samples = getattr(trainer.datamodule, "source_samples", None) or {}
        moss = unwrap(pl_module.model)
        self._flops = flop_model(moss)
        self._lora = any(not p.requires_grad for p in moss.decoder.layers.parameters())
        self._recompute = bool(getattr(moss.decoder, "gradient_checkpointing", False))
        self._peak = self.peak_override or peak_tflops(pl_module.device)

    def _step_flops(self, rows: int, sum_sq: int, convention: str = "ours") -> float:
        return step_flops(self._flops, rows, sum_sq, self._lora, convention, self._recompute)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for micro in batch.micro:  # a StepBatch: one optimiser step
            stats = micro.stats
            computed = micro.input_ids.shape[0] * micro.input_ids.shape[1]
            self._rows, self._computed, self._sq = (
                self._rows + stats.real_rows,
                self._computed + computed,
                self._sq + stats.sum_sq_rows,
            )
            self._total_rows, self._total_computed = self._total_rows + stats.real_rows, self._total_computed + computed
            self._total_flops += self._step_flops(stats.real_rows, stats.sum_sq_rows)
            self._samples, self._batches = self._samples + stats.num_samples, self._batches + 1
            self._skipped[stats.reader] = stats.skipped
            self._total_samples += stats.num_samples
            self._drawn.update(stats.sources)
        if (batch_idx + 1) % self.window:
            return
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        rate = self._rows / elapsed
        tflops = self._step_flops(self._rows, self._sq) / elapsed / 1e12
        metrics = {
            "perf/packing_efficiency": self._rows / max(self._computed, 1),
            "perf/samples_per_batch": self._samples / max(self._batches, 1),
            "perf/tflops_per_device": tflops,
            "perf/peak_memory_gb": self._peak_memory(pl_module.device),
        }
        if self._epoch_samples:
            metrics["data/epoch"] = self._total_samples * trainer.world_size / self._epoch_samples
        if len(self._drawn) > 1:
            for name, drawn in self._drawn.items():
                metrics[f"data/samples_{name}"] = drawn * trainer.world_size
                if self._source_samples.get(name):
                    metrics[f"data/epoch_{name}"] = drawn * trainer.world_size / self._source_samples[name]
        for counts in self._skipped.values():
            for reason, n in counts.items():
                key = "data/skipped_" + reason.replace(" ", "_").replace("-", "_")
                metrics[key] = metrics.get(key, 0.0) + float(n)
        # Host values, logged as CPU tensors: a Python number would be copied to the device (a sync) by
        # Lightning. Only the all-rank total crosses devices, and is read back only when the loggers write.
        host = {key: torch.tensor(float(value)) for key, value in metrics.items()}
        pl_module.log_dict(host, batch_size=1)
        pl_module.log("perf/real_frames_per_s", torch.tensor(rate), prog_bar=True, batch_size=1)
        if self._peak:
            pl_module.log("perf/mfu", torch.tensor(tflops / self._peak), prog_bar=True, batch_size=1)
            others = {
                f"perf/{name}": torch.tensor(self._step_flops(self._rows, self._sq, c) / elapsed / 1e12 / self._peak)
                for name, c in (("mfu_foundry", "foundry"), ("hfu", "hfu"))
            }
            pl_module.log_dict(others, batch_size=1)
        if trainer.world_size > 1:
            local = torch.tensor(rate, dtype=torch.float32).to(pl_module.device, non_blocking=True)
            total = trainer.strategy.reduce(local, reduce_op="sum")
        else:
            total = torch.tensor(rate)
        pl_module.log("perf/real_frames_per_s_total", total, batch_size=1)
        self._t0 = time.perf_counter()
        self._rows = self._computed = self._samples = self._batches = self._sq = 0

    @staticmethod
    def _peak_memory(device: torch.device) -> float:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GB (Linux)

    def on_train_end(self, trainer, pl_module) -> None:
        wall = time.perf_counter() - self._start
        self.summary = {
            "wall_s": wall,
            "real_rows": self._total_rows,
            "real_frames_per_s": self._total_rows / max(wall, 1e-9),
            "packing_efficiency": self._total_rows / max(self._total_computed, 1),
            "tflops_per_device": self._total_flops / max(wall, 1e-9) / 1e12,
            "mfu": (self._total_flops / max(wall, 1e-9) / 1e12 / self._peak) if self._peak else None,
            "skipped": {r: n for counts in self._skipped.values() for r, n in counts.items()},
            "samples": self._total_samples * trainer.world_size,  # trained on (this rank's count x ranks)
            "sources": {name: n * trainer.world_size for name, n in self._drawn.items()},
        }
