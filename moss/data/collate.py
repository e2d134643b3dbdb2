"""The padding collator of the original fine-tuning code (right padding), for `[T, C]` examples.

Pad rows: channel 0 = the tokenizer's pad id, channels 1..C-1 = the audio pad, labels -100,
attention 0. Examples longer than `max_length` are cut on the right, as the original does.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class PaddingCollator:
    """Batch delayed examples into `input_ids`/`labels` `[B, T, C]` and `attention_mask` `[B, T]`.

    Also returns `real_rows` (non-padding rows in the batch) and `keys` for bookkeeping.
    """

    def __init__(self, text_pad_id: int, speech_pad: int = 1024, max_length: int = 16000):
        self.text_pad_id, self.speech_pad, self.max_length = text_pad_id, speech_pad, max_length

    def __call__(self, examples: list[dict]) -> dict:
        lengths = [min(ex["input_ids"].shape[0], self.max_length) for ex in examples]
        batch, length, channels = len(examples), max(lengths), examples[0]["input_ids"].shape[1]
        input_ids = torch.full((batch, length, channels), self.speech_pad, dtype=torch.long)
        input_ids[..., 0] = self.text_pad_id
        labels = torch.full((batch, length, channels), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        for i, (ex, n) in enumerate(zip(examples, lengths, strict=True)):
            input_ids[i, :n] = ex["input_ids"][:n]
            labels[i, :n] = ex["labels"][:n]
            attention_mask[i, :n] = 1
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "real_rows": torch.tensor(sum(lengths)),
            "keys": [ex["key"] for ex in examples],
        }
