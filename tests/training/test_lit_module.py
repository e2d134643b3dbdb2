"""Training system: LoRA defaults, full fine-tuning freezes the unused table, schedule, exports round-trip."""

import functools
import math

import pytest
import torch
from peft import PeftModel

from moss.model import MossTTSD, MossTTSDConfig
from moss.model.lora import apply_lora, unwrap
from moss.training import MossTTSDLitModule
from moss.training.export import export_hf, save_adapter
from moss.training.optim import warmup_cosine
from tests.conftest import random_batch


def test_lora_defaults_match_the_original_on_the_real_architecture():
    import peft

    with torch.device("meta"):
        model = apply_lora(MossTTSD(MossTTSDConfig.v05()))
    lora_layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(lora_layers) == 196  # 7 projections x 28 layers
    assert lora_layers[0].scaling["default"] == 8.0  # rsLoRA: 32 / sqrt(16)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == 17_432_576 and all("lora_" in n for n in trainable)


def make_module(config, peft=None, **kwargs):
    module = MossTTSDLitModule(
        config=config,
        net=functools.partial(MossTTSD.from_config, seed=0),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        peft=peft,
        **kwargs,
    )
    module.configure_model()
    return module


def test_full_finetune_freezes_only_the_unused_token_table(tiny_config):
    module = make_module(tiny_config)
    frozen = [n for n, p in module.model.named_parameters() if not p.requires_grad]
    assert frozen == ["model.language_model.embed_tokens.weight"]
    assert unwrap(module.model).channel_weights == [8, 2, 1, 1, 1, 1, 1, 1]


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = warmup_cosine(opt, total_steps=100, warmup_ratio=0.1)
    lrs = []
    for _ in range(101):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5))) and lrs[100] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="set trainer.max_steps"):
        warmup_cosine(opt, total_steps=0)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    sched = warmup_cosine(opt, total_steps=20, warmup_steps=4, min_lr_ratio=0.1)
    lrs = []
    for _ in range(21):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [2.0 * s / 4 for s in range(4)] + [
        2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 16))) for s in range(4, 21)
    ]
    assert lrs == pytest.approx(expected) and lrs[-1] == pytest.approx(0.2)


def _perturb_lora(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_lora_export_and_adapter_reload_give_the_trained_logits(tiny_config, tmp_path, tiny_tokenizer):
    module = make_module(tiny_config, peft=dict(r=4, lora_alpha=8, lora_dropout=0.05))
    _perturb_lora(module.model)
    model = module.model.eval()
    ids, _ = random_batch(tiny_config)
    with torch.no_grad():
        trained = model(ids, output_logits=True).logits
    export_hf(model, tmp_path / "export", tiny_tokenizer)
    assert isinstance(model, PeftModel) and any("lora_" in n for n, _ in model.named_parameters())  # untouched
    merged = MossTTSD.from_pretrained(tmp_path / "export").eval()
    assert (tmp_path / "export" / "tokenizer.json").is_file()
    save_adapter(model, tmp_path / "adapter")
    base = MossTTSD.from_config(tiny_config, seed=0)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        for other in (merged, reloaded):
            for a, b in zip(trained, other(ids, output_logits=True).logits, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and the adapter really changed the model
        plain = MossTTSD.from_config(tiny_config, seed=0).eval()(ids, output_logits=True).logits
    assert not torch.allclose(plain[0], trained[0], atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config):
    ids, labels = random_batch(tiny_config, length=16)
    grads = []
    for checkpointing in (False, True):
        module = make_module(tiny_config, gradient_checkpointing=checkpointing)
        assert unwrap(module.model).decoder_layers()[0].gradient_checkpointing is checkpointing
        module.model.train()
        module.model(ids, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)
