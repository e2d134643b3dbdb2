"""Selective activation checkpointing: the same gradients as none or full, and only pointwise work recomputed."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moss.config_checks import validate
from moss.errors import ConfigError
from moss.model import MossTTSD, MossTTSDConfig
from moss.model.activation_checkpointing import checkpointing_policy
from moss.model.lora import apply_lora
from tests.conftest import compose_train


def step(policy, lora: bool):
    torch.manual_seed(0)
    model = MossTTSD.from_config(MossTTSDConfig.tiny(), seed=0, attn_implementation="sdpa").double().train()
    if policy:
        model.gradient_checkpointing_enable(policy)
    if lora:
        model = apply_lora(model, r=4, lora_alpha=8, lora_dropout=0.0)
    ids = torch.randint(0, 300, (2, 48, 8), generator=torch.Generator().manual_seed(1))
    ids[..., 1:] = torch.randint(0, 1024, (2, 48, 7), generator=torch.Generator().manual_seed(2))
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids.clone()).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, counter.get_total_flops()


@pytest.mark.parametrize("lora", [False, True])
def test_selective_and_full_checkpointing_give_the_gradients_of_none(lora):
    plain, plain_flops = step(None, lora)
    full, full_flops = step("full", lora)
    selective, selective_flops = step("selective", lora)
    assert plain.keys() == full.keys() == selective.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(full[name], grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(selective[name], grad, rtol=1e-10, atol=1e-12)
    # Full recomputes the layers' matmuls (all but those whose outputs backward never needs: non-reentrant
    # checkpointing stops early); selective keeps them, so it counts not one matmul FLOP more than none.
    layer_params = sum(
        p.numel() for n, p in MossTTSD.from_config(MossTTSDConfig.tiny()).named_parameters() if ".layers." in n
    )
    assert full_flops - plain_flops > 2 * layer_params * 2 * 48 / 2
    assert selective_flops == plain_flops


def test_settings_are_checked_before_the_run(tmp_path):
    assert checkpointing_policy(False) is None and checkpointing_policy(True) == "full"
    assert checkpointing_policy("selective") == "selective"
    with pytest.raises(
        ConfigError, match="model.gradient_checkpointing='some' is refused: input should be a valid boolean"
    ):
        validate(compose_train(tmp_path, ["model.gradient_checkpointing=some"]))
