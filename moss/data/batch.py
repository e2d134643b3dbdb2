"""The typed batches the data pipeline hands to training: a micro-batch, its statistics, an optimiser step.

`PackedBatch` is what the model reads (packed rows with their boundaries, or padded rows with a mask);
`BatchStats` is what the callbacks count (real rows, samples, skips), plain host values; `StepBatch` is the
`k` micro-batches of one optimiser step with their summed label counts. The boundaries (`cu_seqlens`) and label
counts stay on the host when a batch moves to a device: the model and the loss read them there, and reading
them back from a GPU would stall it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class BatchStats:
    """What a micro-batch holds, for throughput, packing efficiency, epochs and the skip report.

    Args:
        real_rows: rows of real samples (not padding).
        sum_sq_rows: sum of the squared sample lengths (attention FLOPs).
        num_samples: samples in the micro-batch.
        keys: the samples' keys.
        passes: the pass over its source each sample was read in (a key comes again in the next pass).
        reader: which reader (rank x worker slot) made it; -1 for a placeholder.
        skipped: that reader's skip counts so far, by reason.
        sources: samples per data source (`data.sources`; one source is named "train").
    """

    real_rows: int
    sum_sq_rows: int
    num_samples: int
    keys: tuple[str, ...] = ()
    passes: tuple[int, ...] = ()
    reader: int = 0
    skipped: Mapping[str, int] = field(default_factory=dict)
    sources: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PackedBatch:
    """One micro-batch of model inputs: packed (`position_ids` + `cu_seqlens`) or padded (`attention_mask`).

    Args:
        input_ids: int64 `[B, T, C]`.
        labels: int64 `[B, T, C]`, -100 where nothing is predicted.
        label_counts: int64 `[C]` valid next-token targets per channel (host).
        stats: the micro-batch's `BatchStats`.
        position_ids: int64 `[B, T]`, restarting at each packed sample.
        cu_seqlens: int32 boundaries of every segment of every row, as if the rows were one sequence (host).
        max_seqlen: the longest segment.
        attention_mask: int64 `[B, T]`, 1 on real rows (padded batches).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    label_counts: torch.Tensor
    stats: BatchStats
    position_ids: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    attention_mask: torch.Tensor | None = None

    DEVICE_FIELDS = ("input_ids", "labels", "position_ids", "attention_mask")

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> PackedBatch:
        """The batch with its device fields on `device`; `cu_seqlens` and `label_counts` stay on the host.

        The copies are asynchronous to CUDA (`non_blocking` None): the loader pins the memory they come from
        (`pin_memory`).
        """
        if non_blocking is None:
            non_blocking = torch.device(device).type == "cuda"
        moved = {
            name: value.to(device, non_blocking=non_blocking)
            for name in self.DEVICE_FIELDS
            if (value := getattr(self, name)) is not None
        }
        return dataclasses.replace(self, **moved)

    def pin_memory(self) -> PackedBatch:
        """The batch with its device fields in page-locked memory (what a `pin_memory=True` loader calls).

        torch's loader pins a dataclass only through this method; without it the batch would stay pageable and
        every copy to the GPU synchronous.
        """
        pinned = {name: value.pin_memory() for name in self.DEVICE_FIELDS if (value := getattr(self, name)) is not None}
        return dataclasses.replace(self, **pinned)

    def model_inputs(self) -> dict:
        """Keyword arguments of `MossTTSD.forward`."""
        names = (*self.DEVICE_FIELDS, "cu_seqlens", "max_seqlen", "label_counts")
        return {name: value for name in names if (value := getattr(self, name)) is not None}

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None


@dataclass(frozen=True)
class StepBatch:
    """The micro-batches of one optimiser step.

    `label_counts` (host, int64 `[C]`) sums theirs: the loss of every micro-batch is divided by the step's
    counts (`moss.training.objective.StepLoss`), so the step's gradient does not depend on how it was split.
    """

    micro: tuple[PackedBatch, ...]

    def __post_init__(self):
        if not self.micro:
            raise ValueError("an optimiser step needs at least one micro-batch")

    @property
    def label_counts(self) -> torch.Tensor:
        return torch.stack([b.label_counts for b in self.micro]).sum(0)

    @property
    def stats(self) -> list[BatchStats]:
        return [b.stats for b in self.micro]

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> StepBatch:
        return StepBatch(tuple(b.to(device, non_blocking=non_blocking) for b in self.micro))

    def __len__(self) -> int:
        return len(self.micro)
