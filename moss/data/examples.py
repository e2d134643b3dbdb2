"""Shard samples -> delayed training examples, refusing what the model cannot take.

An `Example` holds int32 `[T + C - 1, C]` grids: the prompt grid of `moss.text.prompt` (or an imported grid as
stored), delayed per channel. Samples the model cannot take raise a
`SampleError` subclass, so the stream counts each kind under its own reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moss.data.schema import SampleError, ShardSample
from moss.model.delay import apply_delay_pattern, apply_delay_pattern_labels
from moss.text.prompt import PromptBuilder


@dataclass(frozen=True)
class Example:
    """One delayed training example; `loc` is where its sample sits in the stream (what a resume restores)."""

    key: str
    rows: int
    input_ids: np.ndarray  # int32 [rows, C]
    labels: np.ndarray  # int32 [rows, C]
    loc: tuple | None = None


class OverLongSample(SampleError):
    """More delayed rows than the limit (the pack budget, or `data.max_rows` for padded batches)."""


class OutOfVocabulary(SampleError):
    """An id outside its channel's embedding table: it would fail with an index error on the device."""


class ExampleBuilder:
    """Shard sample -> delayed `Example` (int32 `[T + C - 1, C]`)."""

    def __init__(
        self,
        prompt: PromptBuilder,
        text_pad_id: int,
        max_rows: int | None = None,
        truncate=False,
        vocab_size: int | None = None,
        speech_vocab_size: int | None = None,
    ):
        self.prompt = prompt
        self.text_pad_id = text_pad_id
        self.max_rows = max_rows
        self.truncate = truncate
        self.vocab_size, self.speech_vocab_size = vocab_size, speech_vocab_size

    def _check_range(self, key: str, input_ids: np.ndarray, labels: np.ndarray) -> None:
        """Every id inside its channel's embedding and head, so no bad grid reaches an index error on device."""
        for limit, columns in ((self.vocab_size, slice(0, 1)), (self.speech_vocab_size, slice(1, None))):
            if limit is None:
                continue
            ids, targets = input_ids[:, columns], labels[:, columns]
            if ids.min(initial=0) < 0 or ids.max(initial=0) >= limit or targets.max(initial=0) >= limit:
                raise OutOfVocabulary(f"{key}: ids outside the model's vocabulary ({limit} for channels {columns})")

    def __call__(self, sample: ShardSample, loc: tuple | None = None) -> Example:
        if sample.grid is not None:  # imported from the original preprocessing: the grid as stored
            grid, labels = sample.grid, sample.grid_labels
            if grid.shape[1] != self.prompt.channels:
                raise SampleError(f"{sample.key}: grid has {grid.shape[1]} channels, the model {self.prompt.channels}")
        else:
            grid, labels = self.prompt(sample.text, sample.codes, sample.ref_text, sample.ref_codes)
        input_ids = apply_delay_pattern(grid.astype(np.int32), self.text_pad_id, self.prompt.speech_pad)
        labels = apply_delay_pattern_labels(labels.astype(np.int32))
        self._check_range(sample.key, input_ids, labels)
        rows = input_ids.shape[0]
        if self.max_rows is not None and rows > self.max_rows:
            if not self.truncate:
                raise OverLongSample(f"{sample.key}: {rows} rows exceed the limit of {self.max_rows}")
            input_ids, labels, rows = input_ids[: self.max_rows], labels[: self.max_rows], self.max_rows
        return Example(sample.key, rows, input_ids, labels, loc)
