"""Packing changes nothing but speed: per-sample logits inside a pack equal the sample alone, and the packer
places every sample exactly once within the budget."""

import random

import numpy as np
import pytest
import torch

from moss.data.examples import Example, ExampleBuilder
from moss.data.packing import BestFitPacker, collate_packs
from moss.data.synthetic import generate_samples
from moss.model import MossTTSD
from moss.model.loss import shift_labels
from moss.text import PromptBuilder
from moss.training import MossTTSDLitModule

NONE = np.zeros((0, 8), np.int32)  # the packer looks at rows only


def test_packer_places_every_sample_once_within_budget():
    rng = random.Random(0)
    packer = BestFitPacker(budget=1000, window=16, min_fill=0.99)
    items = [Example(str(i), rng.randint(20, 700), NONE, NONE) for i in range(500)]
    packs = [p for item in items for p in packer.add(item)] + packer.flush()
    keys = [it.key for p in packs for it in p]
    assert sorted(map(int, keys)) == list(range(500))
    fills = [sum(it.rows for it in p) for p in packs]
    assert max(fills) <= 1000 and sum(fills) / (1000 * len(packs)) > 0.95
    with pytest.raises(ValueError, match="exceeds the pack budget"):
        packer.add(Example("big", 1001, NONE, NONE))


@pytest.fixture
def examples(tiny_tokenizer):
    builder = ExampleBuilder(PromptBuilder(tiny_tokenizer, speech_offset=384), text_pad_id=368)
    return [builder(s) for s in generate_samples(5, seed=11)]


def test_collated_pack_layout(examples):
    budget = sum(e.rows for e in examples) + 13
    batch = collate_packs([examples], budget, text_pad_id=368)
    assert batch.input_ids.shape == (1, budget, 8) and batch.attention_mask is None
    starts = np.cumsum([0] + [e.rows for e in examples])
    for e, s in zip(examples, starts, strict=False):
        assert batch.position_ids[0, s : s + e.rows].tolist() == list(range(e.rows))
        assert (batch.labels[0, s] == -100).all()  # the next sample's first row is never a target
    assert batch.position_ids[0, -13:].tolist() == list(range(13))  # pad tail: a segment of its own
    assert batch.cu_seqlens.tolist() == [*starts.tolist(), budget] and batch.max_seqlen == max(
        [e.rows for e in examples] + [13]
    )
    expected = sum((shift_labels(torch.from_numpy(e.labels).long()[None]) != -100).sum((0, 1)) for e in examples)
    assert torch.equal(batch.label_counts, expected)
    assert int(batch.stats.real_rows) == budget - 13 and batch.stats.keys == tuple(e.key for e in examples)


def _module(model):
    module = MossTTSDLitModule(config=model.config, net=lambda config: model, optimizer=None)
    module.configure_model()
    return module


ATTENTION = ["sdpa", "eager", "flex_attention", "varlen_sdpa"]


@pytest.mark.parametrize(
    "attn", [pytest.param(a, marks=pytest.mark.slow) if a == "flex_attention" else a for a in ATTENTION]
)
def test_logits_inside_a_pack_equal_logits_alone(examples, tiny_config, tmp_path, attn):
    MossTTSD.from_config(tiny_config, seed=2).save_pretrained(tmp_path)
    model = MossTTSD.from_pretrained(tmp_path, attn_implementation=attn).eval()
    reference = MossTTSD.from_pretrained(tmp_path, attn_implementation="eager").eval()  # each sample alone
    module = _module(model)
    budget = sum(e.rows for e in examples) + 5
    batch = collate_packs([examples], budget, text_pad_id=368)
    with torch.no_grad():
        packed = module(batch)
        hidden = packed.last_hidden_state[0]
        start = 0
        for e in examples:
            alone = reference(torch.from_numpy(e.input_ids).long()[None], output_logits=True)
            torch.testing.assert_close(hidden[start : start + e.rows], alone.last_hidden_state[0], atol=2e-5, rtol=1e-5)
            packed_logits = model.lm_heads[0](hidden[start : start + e.rows])
            torch.testing.assert_close(packed_logits, alone.logits[0][0], atol=5e-5, rtol=1e-5)
            start += e.rows
        # the summed loss of the pack is the sum of the samples' summed losses
        sums = sum(
            reference(
                torch.from_numpy(e.input_ids).long()[None], labels=torch.from_numpy(e.labels).long()[None]
            ).channel_loss_sums
            for e in examples
        )
        torch.testing.assert_close(packed.channel_loss_sums, sums, rtol=1e-5, atol=1e-4)


def test_a_mask_or_cache_sneaking_in_is_caught(examples, tiny_config):
    """The isolation checks above are sensitive: a 2-D mask or a KV cache makes packed samples attend across."""
    model = MossTTSD.from_config(tiny_config, seed=2).eval()
    budget = sum(e.rows for e in examples)
    batch = collate_packs([examples], budget, text_pad_id=368)
    second = slice(examples[0].rows, examples[0].rows + examples[1].rows)
    with torch.no_grad():
        alone = model(torch.from_numpy(examples[1].input_ids).long()[None]).last_hidden_state[0]
        isolated = model(batch.input_ids, position_ids=batch.position_ids).last_hidden_state[0, second]
        masked = model(
            batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=torch.ones(1, budget, dtype=torch.long),
        ).last_hidden_state[0, second]
        cached = model(batch.input_ids, position_ids=batch.position_ids, use_cache=True).last_hidden_state[0, second]
    torch.testing.assert_close(isolated, alone, atol=2e-5, rtol=1e-5)
    assert (masked - alone).abs().max() > 1e-3 and (cached - alone).abs().max() > 1e-3


@pytest.mark.slow  # a smoke run of the benchmark script (about 30 s)
def test_the_packing_benchmark_runs():
    from tests.training.test_throughput import run_benchmark

    result = run_benchmark("packing.py", "--samples", "300", "--train-samples", "4", "--loader-samples", "100")
    assert result["packed_efficiency"] > result["padded4_efficiency"] > 0
    assert set(result["loader_rows_per_s"]) == {"1 worker", "2 workers"}
