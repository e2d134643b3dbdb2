"""Generation reproduces the original `_sample` (golden), equals a no-cache step-by-step reference, is the same
batched or one by one, and streams the same audio as it decodes at the end."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from moss.codec import XYTokenizer
from moss.generation import GenerationConfig, frames_of, generate, sampling_config
from moss.inference import batch_prompts
from moss.model import MossTTSD, MossTTSDConfig
from moss.model.delay import apply_delay_pattern
from moss.streaming import StreamingDecoder
from moss.text import PromptBuilder
from tests.conftest import requires_golden


def golden_generation(golden) -> tuple[MossTTSD, dict, GenerationConfig]:
    """The golden tiny backbone, the original's generation vectors and the checkpoint's generation config."""
    model = MossTTSD.from_pretrained(golden / "backbone" / "model", attn_implementation="eager").eval()
    saved = json.loads((golden / "backbone" / "model" / "generation_config.json").read_text())
    return model, load_file(golden / "backbone" / "generate.safetensors"), GenerationConfig.from_dict(saved)


@requires_golden
def test_greedy_generation_matches_the_original(golden):
    model, g, config = golden_generation(golden)
    out = generate(model, g["prompt_input_ids"], g["prompt_attention_mask"].long(), config, output_logits=True)
    assert torch.equal(out.sequences, g["sequences"])
    for c in range(8):
        logits = torch.stack([step[c] for step in out.logits], 1)  # [B, steps, V]
        assert torch.equal(logits.argmax(-1), g[f"step_ch{c}_argmax"])
        torch.testing.assert_close(logits.amax(-1), g[f"step_ch{c}_top1"], atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.logsumexp(logits, -1), g[f"step_ch{c}_logsumexp"], atol=1e-4, rtol=0)


def tiny_prompts(tokenizer, lengths=(0, 5, 2)):
    build = PromptBuilder(tokenizer, speech_offset=384, system_prompt="TTS.")
    rng = np.random.default_rng(0)
    grids = [
        build.inference_grid(f"[S1]hello {i}[S2]yes", rng.integers(0, 1024, (n, 8)) if n else None)
        for i, n in enumerate(lengths)
    ]
    return batch_prompts(grids, text_pad_id=368)


def test_cached_generation_equals_full_recompute_and_batching_changes_nothing(tiny_tokenizer):
    model = MossTTSD.from_config(MossTTSDConfig.tiny(), seed=3, attn_implementation="sdpa").eval()
    ids, mask = tiny_prompts(tiny_tokenizer)
    config = GenerationConfig(max_new_tokens=10)
    cached = generate(model, ids, mask, config)
    assert torch.equal(cached.sequences, generate(model, ids, mask, config, use_cache=False).sequences)
    batched = frames_of(cached, 384)
    for b in range(ids.shape[0]):
        pad = int((mask[b] == 0).sum())
        alone = generate(model, ids[b : b + 1, pad:], mask[b : b + 1, pad:], config)
        assert torch.equal(frames_of(alone, 384)[0], batched[b])


def test_sampling_is_seeded(tiny_tokenizer):
    model = MossTTSD.from_config(MossTTSDConfig.tiny(), seed=3).eval()
    ids, mask = tiny_prompts(tiny_tokenizer, (3,))
    sampled = sampling_config({"do_sample": True, "temperature": 0.9, "top_k": 50, "top_p": 0.95}, 20, seed=7)
    a, b = (generate(model, ids, mask, sampled).sequences for _ in range(2))
    reseeded = sampling_config({"do_sample": True, "temperature": 0.9, "top_k": 50, "top_p": 0.95}, 20, seed=8)
    other = generate(model, ids, mask, reseeded).sequences  # only the seed differs
    assert torch.equal(a, b) and not torch.equal(a, other)


def test_streaming_decode_equals_decoding_at_the_end():
    codec = XYTokenizer.from_config(seed=2)
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 1024, (640, 8), generator=g)  # crosses two 375-frame windows
    grid = frames.clone()
    grid[:, 0] += 384
    end = torch.tensor([[1413] + [1024] * 7])
    rows = apply_delay_pattern(torch.cat([grid, end]), text_pad_id=1413)
    chunks = []
    decoder = StreamingDecoder(codec, 384, chunks.append)
    for row in rows:
        decoder.push(row)
    first_chunks = len(chunks)
    decoder.finish()
    assert first_chunks >= 1  # audio was produced before generation ended
    (whole,) = codec.decode([frames])
    torch.testing.assert_close(torch.cat(chunks), whole, atol=0, rtol=0)


@requires_golden
def test_static_cache_generation_still_matches_the_original(golden):
    model, g, config = golden_generation(golden)
    ids, mask = g["prompt_input_ids"], g["prompt_attention_mask"].long()
    out = generate(model, ids, mask, config, output_logits=True, engine="static", bucket=4, check_every=3)
    assert torch.equal(out.sequences, g["sequences"]) and model.attn_implementation == "eager"  # restored
    for c in range(8):
        logits = torch.stack([step[c] for step in out.logits], 1)
        assert torch.equal(logits.argmax(-1), g[f"step_ch{c}_argmax"])
        torch.testing.assert_close(torch.logsumexp(logits, -1), g[f"step_ch{c}_logsumexp"], atol=1e-4, rtol=0)


def test_static_cache_equals_the_dynamic_cache_token_for_token(tiny_tokenizer):
    """Greedy and seeded sampling, four left-padded items ending at different steps, across bucket boundaries."""
    model = MossTTSD.from_config(MossTTSDConfig.tiny(), seed=3, attn_implementation="sdpa").eval()
    ids, mask = tiny_prompts(tiny_tokenizer, (0, 5, 2, 9))
    configs = [GenerationConfig(max_new_tokens=30)]
    configs += [sampling_config({"do_sample": True, "temperature": 1.3}, 40, seed=s) for s in (1, 3)]
    for config in configs:
        dynamic = generate(model, ids, mask, config, output_logits=True)
        prompt_rows = dynamic.prompt_rows
        assert dynamic.sequences.shape[1] - prompt_rows > 8  # more rows than a bucket: several buckets are read
        for check_every in (1, 5):
            static = generate(
                model, ids, mask, config, output_logits=True, engine="static", bucket=8, check_every=check_every
            )
            assert torch.equal(static.sequences, dynamic.sequences)
            assert len(static.logits) == len(dynamic.logits)
            torch.testing.assert_close(static.logits[-1][3], dynamic.logits[-1][3], atol=1e-5, rtol=1e-5)
    ends = [int(r.eq(model.config.speech_eos_token).nonzero()[0]) for r in static.sequences[:, prompt_rows:, 0]]
    assert len(set(ends)) > 1, ends  # the items finished at different steps


def test_audio_channels_are_drawn_in_one_call_with_the_draws_of_one_call_each():
    from moss.sampling import ChannelSampler

    config = sampling_config(
        {"do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.2}, 5, 11
    )
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(3, 600 if c == 0 else 1025, generator=g) for c in range(8)]
    history = torch.randint(0, 600, (3, 12, 8), generator=g)
    sampler = ChannelSampler(config.channels, config.seed, torch.device("cpu"))
    batched = sampler(history, [x.clone() for x in logits])
    assert [members for members, _, _ in sampler.groups] == [[0], [1, 2, 3, 4, 5, 6, 7]]
    reference, picks = torch.Generator().manual_seed(11), []
    for c in range(8):  # the reference: each channel's processors and draw on its own, in channel order
        scores = config.channels[c].processors()(history[..., c], logits[c].clone())
        picks.append(torch.multinomial(torch.softmax(scores, -1), 1, generator=reference).squeeze(1))
    assert torch.equal(batched, torch.stack(picks, -1))


def test_graph_engine_needs_cuda(tiny_tokenizer):
    model = MossTTSD.from_config(MossTTSDConfig.tiny(), seed=3).eval()
    ids, mask = tiny_prompts(tiny_tokenizer, (2,))
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        generate(model, ids, mask, GenerationConfig(max_new_tokens=2), engine="graph")


class HostReads(TorchDispatchMode):
    """Records the operators that copy tensor data to the host (on a GPU: a wait for it), e.g. `.item()`."""

    READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.equal")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(str(func).startswith(name) for name in self.READS):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_decode_step_reads_nothing_back_and_the_loop_reads_once_per_check(tiny_tokenizer):
    """What CUDA graphs need (no device read inside a step), and what `check_every` promises (reads per step)."""
    from moss.model.static_kv import NAME, StaticKV

    model = MossTTSD.from_config(MossTTSDConfig.tiny(), seed=3).eval()
    ids, mask = tiny_prompts(tiny_tokenizer, (0, 5))
    kv = StaticKV.for_model(model, 2, 64, bucket=16)
    feed, positions = ids[:, :1].clone(), torch.zeros(2, 1, dtype=torch.long)
    kv.place(0, 1)
    # Python dispatch modes do not see inference-mode tensors: no_grad here, and generate without its decorator.
    with model.attention(NAME), torch.no_grad(), HostReads() as reads:
        model(feed, position_ids=positions, static_kv=kv, output_logits=True, logits_to_keep=1)
    assert reads.seen == [] and model.attn_implementation == "sdpa"
    config = sampling_config({"do_sample": True, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.1}, 48, seed=0)
    reads_per = {}
    for check_every in (1, 16):
        with torch.no_grad(), HostReads() as reads:
            out = generate.__wrapped__(model, ids, mask, config, engine="static", bucket=16, check_every=check_every)
        reads_per[check_every] = len(reads.seen)
    steps = out.sequences.shape[1] - out.prompt_rows
    assert steps > 16
    # One read per step or per 16 steps, plus two per call (whether the prompt is padded, the rows made).
    assert reads_per == {1: steps + 2, 16: -(-steps // 16) + 2}, (steps, reads_per)
