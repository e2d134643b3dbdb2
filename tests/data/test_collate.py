"""The padding collator reproduces the original fine-tuning batch (delay, then right padding)."""

import numpy as np
import torch
from safetensors.torch import load_file

from moss.data.collate import PaddingCollator
from moss.data.examples import Example
from moss.model.delay import apply_delay_pattern, apply_delay_pattern_labels
from tests.conftest import requires_golden


@requires_golden
def test_matches_the_original_batch(golden):
    for variant in ("preprocess_raw", "preprocess_normalized", "preprocess_normalized_v05final"):
        g = load_file(golden / "data" / variant / "grids.safetensors")
        grids = [
            (
                apply_delay_pattern(g[f"sample{i}_input_ids"].numpy(), 368),
                apply_delay_pattern_labels(g[f"sample{i}_labels"].numpy()),
            )
            for i in range(2)
        ]
        examples = [Example(str(i), len(ids), ids, labels) for i, (ids, labels) in enumerate(grids)]
        assert [e.input_ids.shape[0] for e in examples] == g["shifted_lengths"].tolist()
        batch = PaddingCollator(text_pad_id=368, max_length=16000)(examples)
        assert torch.equal(batch.input_ids, g["batch_input_ids"])
        assert torch.equal(batch.labels, g["batch_labels"])
        assert torch.equal(batch.attention_mask, g["batch_attention_mask"].long())


def test_truncates_on_the_right_like_the_original():
    ex = Example("a", 10, np.ones((10, 8), np.int32), np.ones((10, 8), np.int32))
    batch = PaddingCollator(text_pad_id=5, max_length=6)([ex])
    assert batch.input_ids.shape == (1, 6, 8) and int(batch.stats.real_rows) == 6
    assert batch.label_counts.tolist() == [5] * 8
