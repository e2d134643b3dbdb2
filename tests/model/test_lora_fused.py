"""FusedLoraLinear: peft's LoRA layer, computed leaner, with the same outputs, gradients, names and files."""

import pytest
import torch

from moss.model import MossTTSD, MossTTSDConfig
from moss.model.lora import FusedLoraLinear, apply_lora, merged


def adapted(fused: bool, dropout: float, dtype=torch.float64):
    torch.manual_seed(0)
    model = MossTTSD.from_config(MossTTSDConfig.tiny(), seed=0, attn_implementation="sdpa").to(dtype)
    model = apply_lora(model, r=4, lora_alpha=8, lora_dropout=dropout, fused=fused)
    with torch.no_grad():  # B starts at zero in peft: give it values, or the adapters would add nothing
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)), dtype=dtype) * 0.1)
    return model.train()


def batch():
    ids = torch.randint(0, 300, (2, 40, 8), generator=torch.Generator().manual_seed(3))
    ids[..., 1:] = torch.randint(0, 1024, (2, 40, 7), generator=torch.Generator().manual_seed(4))
    return ids


def loss_and_grads(model, autocast=False):
    torch.manual_seed(123)  # the same dropout masks, drawn in the same order
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(batch(), labels=batch()).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_fused_equals_peft_in_outputs_and_gradients(dropout):
    peft_model, fused_model = adapted(False, dropout), adapted(True, dropout)
    assert sum(isinstance(m, FusedLoraLinear) for m in fused_model.modules()) == 2 * 7
    assert list(dict(peft_model.named_parameters())) == list(dict(fused_model.named_parameters()))
    loss, grads = loss_and_grads(peft_model)
    fused_loss, fused_grads = loss_and_grads(fused_model)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == fused_grads.keys() and all("lora_" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-10, atol=1e-12)


def test_under_autocast_it_stays_within_bf16_of_peft():
    peft_model, fused_model = adapted(False, 0.0, torch.float32), adapted(True, 0.0, torch.float32)
    loss, grads = loss_and_grads(peft_model, autocast=True)
    fused_loss, fused_grads = loss_and_grads(fused_model, autocast=True)
    torch.testing.assert_close(fused_loss, loss, rtol=2e-2, atol=2e-2)
    for name, grad in grads.items():
        cos = torch.nn.functional.cosine_similarity(fused_grads[name].flatten(), grad.flatten(), dim=0)
        assert cos > 0.99, name


def test_merging_saving_and_disabling_are_peft_s(tmp_path):
    peft_model, fused_model = adapted(False, 0.0), adapted(True, 0.0)
    ids = batch()
    with torch.no_grad():
        a = merged(peft_model).eval()(ids).logits[0]
        b = merged(fused_model).eval()(ids).logits[0]
        torch.testing.assert_close(b, a)
        with fused_model.disable_adapter():  # falls back to peft's forward: the base model alone
            base = fused_model.eval()(ids).logits[0]
        plain = MossTTSD.from_config(MossTTSDConfig.tiny(), seed=0, attn_implementation="sdpa").double().eval()
        torch.testing.assert_close(base, plain(ids).logits[0])
    peft_model.save_pretrained(tmp_path / "peft")
    fused_model.save_pretrained(tmp_path / "fused")
    assert (tmp_path / "peft" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "fused" / "adapter_model.safetensors"
    ).read_bytes()
