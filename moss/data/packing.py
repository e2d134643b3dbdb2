"""Token packing: variable-length delayed samples -> fixed row budgets, with no cross-talk between samples.

`BestFitPacker` collects samples in a window and places them best-fit-decreasing into bins of `budget` rows;
bins that are full enough leave as packs, the rest wait for more samples. `collate_packs` turns packs into
the packed micro-batch of DESIGN.md:

* `input_ids`, `labels` `[B, L, C]` with `L = budget`: samples concatenated (each delayed on its own), the
  free tail filled with pad rows (text pad / audio pad, labels -100);
* `position_ids` `[B, L]` restarting at 0 for every sample (and for the pad tail), from which transformers
  builds a block-diagonal causal mask when `attention_mask` is None and no cache is used;
* `cu_seqlens` (int32, per pack row, flattened over B) and `max_seqlen` for varlen (flash) attention;
* `label_counts` `[C]`: valid next-token targets per channel, known before the forward pass so a whole
  optimiser step can be normalised by them;
* no attention mask, deliberately: a 2-D mask would make packed samples attend to each other.

Every sample starts with prompt rows whose labels are -100 on all channels, so the last row of one sample
never learns to predict the first row of the next.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from moss.data.batch import BatchStats, PackedBatch
from moss.data.examples import Example
from moss.model.loss import IGNORE_INDEX
from moss.settings import Count, Probability, Required, Rows, TypedDict, strict


@strict
class Packing(TypedDict, total=False):
    """`data.packing`: the `BestFitPacker`'s settings, and the packs per micro-batch."""

    budget: Required[Rows]
    window: Count
    min_fill: Probability
    max_rounds: Count
    packs_per_batch: Count


@dataclass
class Bin:
    """Samples assigned to one pack."""

    items: list = field(default_factory=list)
    rows: int = 0


class BestFitPacker:
    """Online best-fit-decreasing packer over a window of samples.

    Args:
        budget: rows per pack.
        window: samples collected before a packing round.
        min_fill: a bin leaves only when `rows >= min_fill * budget`, unless it is the fullest of a round
            that would emit nothing, or a sample in it has waited `max_rounds` rounds.
        max_rounds: bound on how long a sample may wait (keeps the stream moving, bounds state).

    Items are `Example`s; the packer looks at nothing but their `rows`.
    """

    def __init__(self, budget: int, window: int = 256, min_fill: float = 0.995, max_rounds: int = 16):
        if budget < 1 or window < 1:
            raise ValueError(f"budget and window must be positive, got budget={budget}, window={window}")
        self.budget, self.window, self.min_fill, self.max_rounds = budget, window, min_fill, max_rounds
        self.pending: list[Example] = []
        self.ages: list[int] = []

    def add(self, item: Example) -> list[list[Example]]:
        """Queue one sample; returns the packs that became ready (possibly none)."""
        if item.rows > self.budget:
            raise ValueError(f"sample of {item.rows} rows exceeds the pack budget of {self.budget}")
        self.pending.append(item)
        self.ages.append(0)
        return self._round(final=False) if len(self.pending) >= self.window else []

    def flush(self) -> list[list[Example]]:
        """Pack everything still waiting (end of a finite stream)."""
        return self._round(final=True) if self.pending else []

    def _round(self, final: bool) -> list[list[Example]]:
        order = sorted(range(len(self.pending)), key=lambda i: -self.pending[i].rows)
        bins: list[Bin] = []
        members: list[list[int]] = []
        for i in order:
            rows = self.pending[i].rows
            best, best_free = -1, self.budget + 1
            for b, candidate in enumerate(bins):
                free = self.budget - candidate.rows
                if rows <= free < best_free:
                    best, best_free = b, free
            if best < 0:
                bins.append(Bin())
                members.append([])
                best = len(bins) - 1
            bins[best].rows += rows
            members[best].append(i)
        ready = [
            b
            for b in range(len(bins))
            if final
            or bins[b].rows >= self.min_fill * self.budget
            or any(self.ages[i] >= self.max_rounds for i in members[b])
        ]
        if not ready:
            ready = [max(range(len(bins)), key=lambda b: bins[b].rows)]
        emitted = {i for b in ready for i in members[b]}
        packs = [[self.pending[i] for i in members[b]] for b in ready]
        keep = [i for i in range(len(self.pending)) if i not in emitted]
        self.pending = [self.pending[i] for i in keep]
        self.ages = [self.ages[i] + 1 for i in keep]
        return packs


def collate_packs(
    packs: list[list[Example]],
    budget: int,
    text_pad_id: int,
    speech_pad: int = 1024,
    channels: int = 8,
    origin: Mapping | None = None,
) -> PackedBatch:
    """Packed micro-batch from packs of delayed examples (`input_ids`/`labels` int `[T_i + C - 1, C]`).

    Returns a `PackedBatch`: `input_ids`, `labels` (int64 `[B, budget, C]`), `position_ids` (int64
    `[B, budget]`), `cu_seqlens` (int32, boundaries of all segments of all rows, as if the B rows were one
    sequence; the pad tail of a row is a segment of its own), `max_seqlen`, `label_counts` (int64 `[C]`), and
    stats (with `origin`, the `BatchStats` fields reader, skipped and sources).
    """
    batch = len(packs)
    input_ids = np.empty((batch, budget, channels), dtype=np.int64)
    input_ids[:] = speech_pad
    input_ids[..., 0] = text_pad_id
    labels = np.full((batch, budget, channels), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.empty((batch, budget), dtype=np.int64)
    lengths, keys = [], []
    for b, pack in enumerate(packs):
        start = 0
        for item in pack:
            n = item.rows
            input_ids[b, start : start + n] = item.input_ids
            labels[b, start : start + n] = item.labels
            position_ids[b, start : start + n] = np.arange(n)
            lengths.append(n)
            keys.append(item.key)
            start += n
        if start < budget:  # the pad tail is a segment of its own, attended by nothing real
            position_ids[b, start:] = np.arange(budget - start)
            lengths.append(budget - start)
    label_counts = (labels[:, 1:] != IGNORE_INDEX).sum(axis=(0, 1))
    rows = [item.rows for pack in packs for item in pack]
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        labels=torch.from_numpy(labels),
        position_ids=torch.from_numpy(position_ids),
        cu_seqlens=torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32),
        max_seqlen=int(max(lengths)),
        label_counts=torch.from_numpy(label_counts),
        stats=BatchStats(
            real_rows=sum(rows),
            sum_sq_rows=sum(n * n for n in rows),
            num_samples=len(keys),
            keys=tuple(keys),
            **(origin or {}),
        ),
    )
