"""The padding collator of the original fine-tuning code (right padding), for delayed `[T, C]` examples.

Pad rows: channel 0 = the tokenizer's pad id, channels 1..C-1 = the audio pad, labels -100,
attention 0. Examples longer than `max_length` are cut on the right, as the original does.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from moss.data.batch import BatchStats, PackedBatch
from moss.data.examples import Example
from moss.model.loss import IGNORE_INDEX


class PaddingCollator:
    """Batch delayed examples into `input_ids`/`labels` `[B, T, C]` and `attention_mask` `[B, T]`.

    Returns a `PackedBatch` with `label_counts` `[C]` (valid next-token targets per channel) and its
    `BatchStats` (with `origin`: its fields reader, skipped and sources).
    """

    def __init__(self, text_pad_id: int, speech_pad: int = 1024, max_length: int = 16000):
        self.text_pad_id, self.speech_pad, self.max_length = text_pad_id, speech_pad, max_length

    def __call__(self, examples: list[Example], origin: Mapping | None = None) -> PackedBatch:
        lengths = [min(ex.input_ids.shape[0], self.max_length) for ex in examples]
        batch, length, channels = len(examples), max(lengths), examples[0].input_ids.shape[1]
        input_ids = np.empty((batch, length, channels), dtype=np.int64)
        input_ids[:] = self.speech_pad
        input_ids[..., 0] = self.text_pad_id
        labels = np.full((batch, length, channels), IGNORE_INDEX, dtype=np.int64)
        attention_mask = np.zeros((batch, length), dtype=np.int64)
        for i, (ex, n) in enumerate(zip(examples, lengths, strict=True)):
            input_ids[i, :n] = np.asarray(ex.input_ids)[:n]
            labels[i, :n] = np.asarray(ex.labels)[:n]
            attention_mask[i, :n] = 1
        return PackedBatch(
            input_ids=torch.from_numpy(input_ids),
            labels=torch.from_numpy(labels),
            attention_mask=torch.from_numpy(attention_mask),
            label_counts=torch.from_numpy((labels[:, 1:] != IGNORE_INDEX).sum(axis=(0, 1))),
            stats=BatchStats(
                real_rows=sum(lengths),
                sum_sq_rows=sum(n * n for n in lengths),
                num_samples=batch,
                keys=tuple(ex.key for ex in examples),
                **(origin or {}),
            ),
        )
