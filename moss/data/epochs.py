"""Epochs -> optimiser steps: what `data.epochs=N` means for a step-based stream.

Training streams repeat forever and the LR schedule needs its length in optimiser steps, so an epoch count is
turned into `max_steps` before training, from the shard manifests:

* samples: the manifest's per-sample audio frames (`sample_frames`), so no shard is read in full;
* rows: a sample's delayed rows are its frames plus its text and prompt rows, which scale with its length;
  the rows-per-frame ratio is measured on the first `probe` samples through the real example builder, and
  samples over the row limit (skipped in training) are left out;
* micro-batches: packed, the rows over `budget * min_fill` per pack (the packer fills packs at least that
  full); padded, the samples over the batch size;
* steps: micro-batches over (ranks x gradient accumulation).

It is an estimate (text length varies, packs fill a little better than `min_fill`): the plan says so, and
training logs the epochs it really trained (`data/epoch`: samples trained on / samples per epoch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moss.data.dataset import manifest_entries
from moss.data.examples import ExampleBuilder
from moss.data.schema import ShardSample
from moss.data.stages import tar_samples
from moss.errors import ConfigError


@dataclass(frozen=True)
class EpochPlan:
    """The training length that `epochs` passes over a shard set take (estimated)."""

    epochs: float
    samples: int  # usable samples per epoch
    rows: int  # their estimated delayed rows
    micro_batches_per_epoch: float
    steps_per_epoch: int
    max_steps: int

    def describe(self) -> str:
        return (
            f"data.epochs={self.epochs:g}: {self.samples} samples (~{self.rows} rows) per epoch -> "
            f"~{self.micro_batches_per_epoch:.1f} micro-batches -> {self.steps_per_epoch} optimiser steps per epoch, "
            f"trainer.max_steps={self.max_steps} (estimated from the manifests; data/epoch logs the epochs trained)"
        )


def sample_frames(urls: list[str]) -> list[int]:
    """Audio frames of every sample of a local shard set, from its manifest(s).

    Raises:
        ConfigError: a shard no manifest lists (remote shards, or a set written without one).
    """
    entries = manifest_entries(urls)
    if entries is None:
        raise ConfigError(
            "data.epochs needs the manifest of every training shard (manifest.json beside them, as data_pipelines "
            "writes); set trainer.max_steps instead"
        )
    return [f for e in entries for f in e.get("sample_frames") or [e["frames"] // max(e["samples"], 1)] * e["samples"]]


def rows_per_frame(urls: list[str], builder: ExampleBuilder, probe: int = 64) -> float:
    """Delayed rows per audio frame, measured on the first `probe` good samples of the set."""
    rows = frames = seen = 0
    for url in urls:
        for raw in tar_samples(url, handler=lambda err: True):
            try:
                sample = ShardSample.from_wds(raw)
                example = builder(sample)
            except ValueError:  # a bad sample (SampleError) is skipped in training too
                continue
            rows, frames, seen = rows + example["rows"], frames + max(sample.frames, 1), seen + 1
            if seen >= probe:
                return rows / frames
    if not seen:
        raise ConfigError(f"data.epochs: no usable sample in the first shards ({', '.join(urls[:3])})")
    return rows / frames


def plan_epochs(
    urls: list[str],
    epochs: float,
    builder: ExampleBuilder,
    packing: dict | None,
    batch_size: int,
    world_size: int,
    accumulate: int,
    probe: int = 64,
) -> EpochPlan:
    """How many optimiser steps `epochs` passes over `urls` take (see the module docstring)."""
    if epochs <= 0:
        raise ConfigError(f"data.epochs must be positive, got {epochs}")
    ratio = rows_per_frame(urls, builder, probe)
    limit = packing["budget"] if packing else builder.max_rows
    estimated = [math.ceil(f * ratio) for f in sample_frames(urls)]
    usable = [r for r in estimated if limit is None or r <= limit or builder.truncate]
    if not usable:
        raise ConfigError(f"data.epochs: every sample is estimated longer than the row limit ({limit})")
    rows = sum(min(r, limit) if limit else r for r in usable)
    if packing:
        per_batch = packing["budget"] * packing.get("min_fill", 1.0) * packing.get("packs_per_batch", 1)
        micro_batches = rows / per_batch
    else:
        micro_batches = len(usable) / batch_size
    per_step = world_size * accumulate
    return EpochPlan(
        epochs=epochs,
        samples=len(usable),
        rows=rows,
        micro_batches_per_epoch=micro_batches,
        steps_per_epoch=max(1, round(micro_batches / per_step)),
        max_steps=max(1, math.ceil(epochs * micro_batches / per_step)),
    )
