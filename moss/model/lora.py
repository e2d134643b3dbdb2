"""LoRA adapters through peft, with the original fine-tuning defaults.

Defaults (OpenMOSS `finetune/lora_config.yaml`): r 16, alpha 32, rsLoRA (scaling alpha / sqrt(r) = 8),
dropout 0.05, no bias, on the q/k/v/o and gate/up/down projections of every Qwen3 layer. Embeddings and
heads stay frozen.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def apply_lora(
    model: nn.Module,
    r: int = 16,
    lora_alpha: int = 32,
    use_rslora: bool = True,
    lora_dropout: float = 0.05,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    bias: str = "none",
    fused: bool = False,
) -> PeftModel:
    """Wrap `model` in a peft `PeftModel` whose only trainable parameters are the LoRA matrices.

    `fused`: the adapted linears compute the adapter path as `FusedLoraLinear` does (same parameters, names and
    files; peft still merges, saves and loads them).
    """
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
        lora_dropout=lora_dropout,
        target_modules=list(target_modules),
        bias=bias,
    )
    return use_fused_lora(get_peft_model(model, config), fused)


def use_fused_lora(model: nn.Module, on: bool = True) -> nn.Module:
    """Switch the LoRA linears of `model` to `FusedLoraLinear` (or back to peft's), in place; returns `model`."""
    for module in model.modules():
        if type(module) in (LoraLinear, FusedLoraLinear):
            module.__class__ = FusedLoraLinear if on else LoraLinear
    return model


class FusedLoraLinear(LoraLinear):
    """peft's LoRA linear with a leaner training forward: `base(x) + scaling * (dropout(x) A^T) B^T`.

    peft casts each input to the adapters' dtype (a float32 copy of every bf16 activation, kept for backward),
    then applies the B product and the scaling as separate passes. Here the input is not copied (under autocast
    the matmuls run in its dtype, as peft's would after its cast), and the B product, the scaling and the sum
    with the base output are one `addmm`. Anything else (several or disabled adapters, merged weights, DoRA and
    other variants, mixed-adapter batches, dtypes that differ outside autocast) takes peft's own forward.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = [a for a in self.active_adapters if a in self.lora_A]
        lora_a = self.lora_A[active[0]].weight if len(active) == 1 else None
        plain = (
            lora_a is not None
            and not (args or kwargs or self.disable_adapters or self.merged)
            and active[0] not in self.lora_variant
            and self.lora_B[active[0]].bias is None
            and (torch.is_autocast_enabled(x.device.type) or x.dtype == lora_a.dtype)
        )
        if not plain:
            return super().forward(x, *args, **kwargs)
        name = active[0]
        result = self.base_layer(x)
        low = F.linear(self.lora_dropout[name](x), lora_a)
        lora_b = self.lora_B[name].weight
        flat = result.reshape(-1, result.shape[-1])
        out = torch.addmm(
            flat, low.reshape(-1, low.shape[-1]).to(flat.dtype), lora_b.t().to(flat.dtype), alpha=self.scaling[name]
        )
        return out.view(result.shape)


def unwrap(model: nn.Module) -> nn.Module:
    """The MossTTSD inside a PeftModel (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def merged(model: nn.Module) -> nn.Module:
    """The model with its LoRA weights folded in (a copy; the model given is left untouched); others as they are."""
    if isinstance(model, PeftModel):
        return copy.deepcopy(model).merge_and_unload()
    return model
