"""The GPU speed-ups change no number: static varlen shapes, compiled decoder layers, the Liger switch (CPU side)."""

import numpy as np
import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager
from transformers.models.qwen3 import modeling_qwen3

from moss.config_checks import validate
from moss.data.examples import Example
from moss.data.packing import collate_packs
from moss.errors import ConfigError
from moss.model import MossTTSD, MossTTSDConfig, speedups
from moss.model.lora import apply_lora
from moss.model.varlen import pad_boundaries
from tests.conftest import compose_train

BUDGET = 96


def pack(seed: int) -> dict:
    """One packed micro-batch of random samples (9-39 rows each): a different segment layout per seed."""
    rng = np.random.default_rng(seed)
    items, rows = [], 0
    while rows + (n := int(rng.integers(9, 40))) <= BUDGET:
        ids = np.zeros((n, 8), dtype=np.int64)
        ids[:, 0], ids[:, 1:] = rng.integers(0, 300, n), rng.integers(0, 1024, (n, 7))
        labels = ids.copy()
        labels[:2] = -100  # a prompt row or two, as real samples have
        items.append(Example(f"s{seed}-{len(items)}", n, ids, labels))
        rows += n
    return collate_packs([items], BUDGET, text_pad_id=0)


def tiny(bucket: int = 0, lora: bool = False) -> torch.nn.Module:
    model = MossTTSD.from_config(MossTTSDConfig.tiny(), seed=0, attn_implementation="varlen_sdpa").double().train()
    model.varlen_bucket = bucket
    return apply_lora(model, r=4, lora_dropout=0.0) if lora else model


def train_packs(model, seeds) -> tuple[list[float], dict]:
    losses = []
    for seed in seeds:
        out = model(**pack(seed).model_inputs())
        out.loss.backward()
        losses.append(float(out.loss.detach()))
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_padded_boundaries_hold_empty_segments_only():
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    assert pad_boundaries(cu, 4).tolist() == [0, 5, 9, 9, 9]
    assert pad_boundaries(cu, 2) is cu  # already a multiple
    assert pad_boundaries(torch.tensor([0, 7], dtype=torch.int32), 3).tolist() == [0, 7, 7, 7]


def test_static_varlen_shapes_give_the_same_loss_and_gradients():
    seeds = [0, 1, 2]
    plain, plain_grads = train_packs(tiny(), seeds)
    static, static_grads = train_packs(tiny(bucket=16), seeds)
    assert plain == static
    for name, grad in plain_grads.items():
        torch.testing.assert_close(static_grads[name], grad, rtol=0, atol=0)


class CountingBackend:
    """A torch.compile backend (AOT autograd, eager kernels) that counts the graphs it is given."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph, example_inputs):
        self.graphs += 1
        return aot_eager(graph, example_inputs)


@pytest.mark.parametrize("lora", [False, True])
def test_compiled_layers_equal_eager_with_one_compilation_over_five_packs(lora):
    torch._dynamo.reset()
    seeds = [0, 1, 2, 3, 4]
    assert len({pack(s).cu_seqlens.numel() for s in seeds}) > 1  # the packs do differ in segment count
    eager, eager_grads = train_packs(tiny(bucket=16, lora=lora), seeds)
    backend, model = CountingBackend(), tiny(bucket=16, lora=lora)
    assert speedups.compile_layers(model, backend=backend) == 2  # fullgraph: a graph break raises
    first, _ = train_packs(model, seeds[:1])
    after_first = backend.graphs
    model.zero_grad(set_to_none=True)
    compiled, compiled_grads = train_packs(model, seeds)
    # Both layers share one graph; with LoRA the first layer's input needs no gradient and the second's does.
    assert after_first == (2 if lora else 1) and backend.graphs == after_first, backend.graphs
    # Compiled layers attend through one masked SDPA call, eager ones through the per-sample loop.
    np.testing.assert_allclose(compiled, eager, rtol=1e-12)
    assert compiled_grads.keys() == eager_grads.keys() and eager_grads
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-9, atol=1e-12)


def test_without_static_shapes_the_compiled_layer_recompiles():
    torch._dynamo.reset()
    backend, model = CountingBackend(), tiny(bucket=0)
    speedups.compile_layers(model, backend=backend)
    train_packs(model, [0, 1, 2])  # 6, 5 and 5 boundaries
    assert backend.graphs == 2


def test_compiled_layers_keep_their_parameter_names():
    model = tiny()
    names = list(model.state_dict())
    speedups.compile_layers(model, backend="eager")
    assert list(model.state_dict()) == names


def test_liger_switch_keeps_modules_and_names_and_is_eager_off_cuda():
    reference, model = tiny(), tiny()
    names = list(model.state_dict())
    try:
        # 2 layers x (input, post-attention, q, k norms) + the final norm, and 2 MLPs.
        assert speedups.use_liger(model) == 2 * 4 + 1 + 2
        assert modeling_qwen3.apply_rotary_pos_emb is not speedups._EAGER_ROPE
        assert isinstance(model.decoder_layers()[0].mlp, speedups.LigerSwiGLUMLP)
        assert list(model.state_dict()) == names
        batch = pack(0).model_inputs()
        torch.testing.assert_close(model(**batch).loss, reference(**batch).loss, rtol=0, atol=0)
        adapted = apply_lora(model, r=4)  # peft still finds the projections inside the switched MLPs
        assert any("mlp.gate_proj.lora_A" in n for n, _ in adapted.named_parameters())
    finally:
        assert speedups.use_liger(model, on=False) == 2 * 4 + 1 + 2
    assert modeling_qwen3.apply_rotary_pos_emb is speedups._EAGER_ROPE
    assert type(model.decoder.norm) is modeling_qwen3.Qwen3RMSNorm


def test_liger_is_refused_off_cuda_before_and_at_the_run(tmp_path):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        speedups.apply_speedups(tiny(), "cpu", liger=True)
    with pytest.raises(ConfigError, match="model.speedups.liger=true needs a CUDA device"):
        validate(compose_train(tmp_path, ["model.speedups.liger=true", "trainer.accelerator=cpu"]))
    with pytest.raises(ConfigError, match="model.speedups.varlen_bucket=0 is refused"):  # declared on `Speedups`
        validate(compose_train(tmp_path, ["model.speedups.static_varlen=true", "model.speedups.varlen_bucket=0"]))


def test_compile_implies_static_varlen():
    model = speedups.apply_speedups(tiny(), "cpu", compile=True, varlen_bucket=32)
    assert model.varlen_bucket == 32
    assert all(layer._compiled_call_impl is not None for layer in model.decoder_layers())
