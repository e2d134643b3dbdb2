"""LoRA adapters through peft, with the original fine-tuning defaults.

Defaults (OpenMOSS `finetune/lora_config.yaml`): r 16, alpha 32, rsLoRA (scaling alpha / sqrt(r) = 8),
dropout 0.05, no bias, on the q/k/v/o and gate/up/down projections of every Qwen3 layer. Embeddings and
heads stay frozen.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from peft import LoraConfig, PeftModel, get_peft_model
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
) -> PeftModel:
    """Wrap `model` in a peft `PeftModel` whose only trainable parameters are the LoRA matrices."""
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        use_rslora=use_rslora,
        lora_dropout=lora_dropout,
        target_modules=list(target_modules),
        bias=bias,
    )
    return get_peft_model(model, config)


def unwrap(model: nn.Module) -> nn.Module:
    """The MossTTSD inside a PeftModel (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def merged(model: nn.Module) -> nn.Module:
    """The model with its LoRA weights folded in (a copy; the model given is left untouched); others as they are."""
    if isinstance(model, PeftModel):
        return copy.deepcopy(model).merge_and_unload()
    return model
