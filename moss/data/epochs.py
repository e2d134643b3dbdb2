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
from moss.data.mixing import Source
from moss.data.schema import ShardSample
from moss.data.stages import tar_samples
from moss.errors import ConfigError


@dataclass(frozen=True)
class SourcePlan:
    """One training source in an epoch plan: its usable samples, its share of the draws and its epochs."""

    name: str
    samples: int  # usable samples per pass over the source
    share: float  # its weight over the sum of the weights
    planned: float | None  # epochs asked for (None: replayed at its share)
    epochs: float  # epochs the planned run trains on it


@dataclass(frozen=True)
class EpochPlan:
    """The training length that the planned epochs take (estimated).

    With several sources the run is as long as the planned source that needs the most samples (the lead);
    an "epoch" (validation, checkpoint, `data/epoch`) is one epoch of the lead.
    """

    epochs: float
    samples: int  # samples drawn per epoch (one source: its usable samples)
    rows: int  # their estimated delayed rows
    micro_batches_per_epoch: float
    steps_per_epoch: int
    max_steps: int
    sources: tuple[SourcePlan, ...] = ()
    lead: str = "train"  # the planned source whose epochs count

    def describe(self) -> str:
        if len(self.sources) > 1:
            mix = ", ".join(
                f"{s.name} {s.epochs:.2f} epochs of {s.samples} samples at {s.share:.0%}"
                + ("" if s.planned else " (replayed)")
                for s in self.sources
            )
            head = f"data.sources: {mix}; one epoch of {self.lead}: {self.samples} samples drawn"
        else:
            head = f"data.epochs={self.epochs:g}: {self.samples} samples"
        return (
            f"{head} (~{self.rows} rows) per epoch -> "
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
            rows, frames, seen = rows + example.rows, frames + max(sample.frames, 1), seen + 1
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
    source = Source("train", epochs=epochs).with_urls(urls)
    return plan_source_epochs([source], builder, packing, batch_size, world_size, accumulate, probe)


def plan_source_epochs(
    sources: list[Source],
    builder: ExampleBuilder,
    packing: dict | None,
    batch_size: int,
    world_size: int,
    accumulate: int,
    probe: int = 64,
) -> EpochPlan:
    """How many optimiser steps the planned epochs of weighted `sources` take (those without epochs are replayed).

    A source drawn with share `p` of the samples and `n` usable samples passes once every `n / p` draws; the run
    lasts `max(epochs * n / p)` draws over the planned sources, and each draw costs the mean rows of a sample
    weighted by the shares.
    """
    planned = [source for source in sources if source.epochs is not None]
    if not planned:
        raise ConfigError("no source has epochs to plan; set data.epochs (or data.sources.<name>.epochs)")
    for source in planned:
        if source.epochs <= 0:
            raise ConfigError(f"data.epochs must be positive, got {source.epochs} (source {source.name})")
    total_weight = sum(source.weight for source in sources)
    limit = packing["budget"] if packing else builder.max_rows
    counts = {}
    for source in sources:
        ratio = rows_per_frame(list(source.urls), builder, probe)
        estimated = [math.ceil(f * ratio) for f in sample_frames(list(source.urls))]
        usable = [r for r in estimated if limit is None or r <= limit or builder.truncate]
        if not usable:
            raise ConfigError(
                f"data.epochs: every sample of {source.name} is estimated longer than the row limit ({limit})"
            )
        counts[source.name] = (len(usable), sum(min(r, limit) if limit else r for r in usable))
    share = {source.name: source.weight / total_weight for source in sources}
    lead = max(planned, key=lambda s: s.epochs * counts[s.name][0] / share[s.name])
    lead_epochs = lead.epochs
    n_lead = counts[lead.name][0]
    draws = n_lead / share[lead.name]  # samples drawn per epoch of the lead (one source: n / 1.0)
    # rows drawn per epoch: each source's rows per pass times the passes one epoch of the lead makes of it
    rows = sum(counts[s.name][1] * (draws * share[s.name] / counts[s.name][0]) for s in sources)
    if packing:
        per_batch = packing["budget"] * packing.get("min_fill", 1.0) * packing.get("packs_per_batch", 1)
        micro_batches = rows / per_batch
    else:
        micro_batches = draws / batch_size
    per_step = world_size * accumulate
    plans = tuple(
        SourcePlan(
            s.name, counts[s.name][0], share[s.name], s.epochs, lead_epochs * draws * share[s.name] / counts[s.name][0]
        )
        for s in sources
    )
    return EpochPlan(
        epochs=lead_epochs,
        samples=round(draws),
        rows=round(rows),
        micro_batches_per_epoch=micro_batches,
        steps_per_epoch=max(1, round(micro_batches / per_step)),
        max_steps=max(1, math.ceil(lead_epochs * micro_batches / per_step)),
        sources=plans,
        lead=lead.name,
    )
