"""The padding collator of the original fine-tuning code (right padding), for delayed `[T, C]` examples.

Pad rows: channel 0 = the tokenizer's pad id, channels 1..C-1 = the audio pad, labels -100,
attention 0. Examples longer than `max_length` are cut on the right, as the original does.
"""

from __future__ import annotations

import numpy as np
import torch

from moss.model.loss import IGNORE_INDEX

# What `MossTTSD.forward` takes from a batch, and which of those it reads on the host (never moved to a device:
# packed boundaries and per-channel label counts, read without a device sync).
MODEL_KEYS = ("input_ids", "labels", "attention_mask", "position_ids", "cu_seqlens", "max_seqlen", "label_counts")
HOST_KEYS = ("cu_seqlens", "label_counts")


def model_inputs(batch: dict, device: torch.device | str | None = None) -> dict:
    """Keyword arguments of `MossTTSD.forward` from a padded or packed batch, moved to `device` (host keys stay)."""
    out = {key: batch[key] for key in MODEL_KEYS if batch.get(key) is not None}
    if device is not None:
        for key, value in out.items():
            if torch.is_tensor(value) and key not in HOST_KEYS:
                out[key] = value.to(device, non_blocking=True)
    return out


class PaddingCollator:
    """Batch delayed examples into `input_ids`/`labels` `[B, T, C]` and `attention_mask` `[B, T]`.

    Also returns `label_counts` `[C]` (valid next-token targets per channel), `real_rows` (non-padding rows),
    `sum_sq_rows` (sum of squared lengths), `num_samples` and `keys`.
    """

    def __init__(self, text_pad_id: int, speech_pad: int = 1024, max_length: int = 16000):
        self.text_pad_id, self.speech_pad, self.max_length = text_pad_id, speech_pad, max_length

    def __call__(self, examples: list[dict]) -> dict:
        lengths = [min(ex["input_ids"].shape[0], self.max_length) for ex in examples]
        batch, length, channels = len(examples), max(lengths), examples[0]["input_ids"].shape[1]
        input_ids = np.empty((batch, length, channels), dtype=np.int64)
        input_ids[:] = self.speech_pad
        input_ids[..., 0] = self.text_pad_id
        labels = np.full((batch, length, channels), IGNORE_INDEX, dtype=np.int64)
        attention_mask = np.zeros((batch, length), dtype=np.int64)
        for i, (ex, n) in enumerate(zip(examples, lengths, strict=True)):
            input_ids[i, :n] = np.asarray(ex["input_ids"])[:n]
            labels[i, :n] = np.asarray(ex["labels"])[:n]
            attention_mask[i, :n] = 1
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(attention_mask),
            "label_counts": torch.from_numpy((labels[:, 1:] != IGNORE_INDEX).sum(axis=(0, 1))),
            "real_rows": sum(lengths),  # plain ints: they stay on the CPU, reading them never syncs the GPU
            "sum_sq_rows": sum(n * n for n in lengths),
            "num_samples": batch,
            "keys": [ex["key"] for ex in examples],
        }
