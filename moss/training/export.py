"""A run's model outside the run: merged HF-format folders, peft adapters, and a `.ckpt` read back.

The merged folder has the original layout (config.json + safetensors, tied heads omitted) plus the tokenizer
files, so `MossTTSD.from_pretrained` and the original OpenMOSS loader both read it. A Lightning checkpoint
records its base model as plain data (`describe_base`, written by the LitModule), and
`model_from_checkpoint` rebuilds the model from that record alone.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftModel

from moss.model import MossTTSD, MossTTSDConfig
from moss.model.checkpoint import usual_permissions
from moss.model.lora import apply_lora, merged, unwrap
from moss.training.sharding import full_state_dict, is_sharded

# The key of a Lightning checkpoint that records the run's base model (written by the LitModule, read below).
BASE_KEY = "moss_base"


def describe_base(net: Callable, config: MossTTSDConfig) -> dict:
    """What the frozen base of a run is, as plain data: a checkpoint folder, or a seeded random init.

    Saved in every Lightning checkpoint, so inference and export rebuild the model from this description
    instead of instantiating anything named in a run folder's YAML (which could name any callable).
    """
    func, keywords = getattr(net, "func", None), dict(getattr(net, "keywords", {}) or {})
    if func == MossTTSD.from_pretrained and keywords.get("path") is not None:
        return {"kind": "pretrained", "path": str(Path(keywords["path"]).resolve())}
    if func == MossTTSD.from_config:
        seed = keywords.get("seed")
        return {"kind": "random", "seed": None if seed is None else int(seed), "config": config.to_dict("moss_ttsd")}
    return {"kind": "custom"}


def unsharded(model: torch.nn.Module, peft: dict | None, is_global_zero: bool) -> torch.nn.Module | None:
    """The trained model as plain modules for export.

    Itself when not sharded; under FSDP an unsharded CPU copy on rank 0 (None elsewhere). A collective call
    when sharded: every rank must make it.
    """
    if not is_sharded(model):
        return model if is_global_zero else None
    state = full_state_dict(model)
    if not is_global_zero:
        return None
    moss = unwrap(model)
    copy = MossTTSD.empty(moss.config, attn_implementation=moss.attn_implementation)
    copy.set_channel_weights(moss.channel_weights)
    copy = apply_lora(copy, **peft) if peft else copy
    copy.load_state_dict(state)
    return copy.eval()


def export_hf(
    model: torch.nn.Module,
    out_dir: str | Path,
    tokenizer=None,
    layout: str = "original",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `model` (LoRA merged) as an HF-format folder; returns `out_dir`."""
    out_dir = Path(out_dir)
    merged_copy = merged(model)
    if dtype is not None:
        merged_copy = copy.deepcopy(merged_copy).to(dtype) if merged_copy is model else merged_copy.to(dtype)
    merged_copy.save_pretrained(out_dir, layout=layout)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def save_adapter(model: torch.nn.Module, out_dir: str | Path) -> Path | None:
    """Save the LoRA adapter in peft's format (`adapter_config.json` + `adapter_model.safetensors`)."""
    if not isinstance(model, PeftModel):
        return None
    model.save_pretrained(str(out_dir))
    usual_permissions(*(p for p in Path(out_dir).iterdir() if p.is_file()))
    return Path(out_dir)


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    layout: str = "original",
    base_model: str | None = None,
    tokenizer: str | None = None,
) -> Path:
    """Export any checkpoint `infer.py` reads as a merged HF-format folder with its tokenizer.

    Accepts a run's Lightning `.ckpt`, a LoRA adapter folder or an HF folder.
    """
    from moss.model.checkpoint import load_model

    if Path(checkpoint).suffix == ".ckpt":
        model, tok = model_from_checkpoint(checkpoint, tokenizer)
    else:
        model, tok = load_model(checkpoint, base_model=base_model, tokenizer=tokenizer)
    return export_hf(model, out_dir, tok, layout=layout)


def lora_settings(peft, where) -> dict:
    """The `apply_lora` keywords of a checkpoint's hyperparameters, type-checked (plain values only)."""
    allowed = set(inspect.signature(apply_lora).parameters) - {"model"}
    if not isinstance(peft, dict) or not set(peft) <= allowed:
        raise ValueError(f"{where}: LoRA settings {peft!r} are not apply_lora's keywords {sorted(allowed)}")
    for key, value in peft.items():
        plain = isinstance(value, bool | int | float | str) or (
            isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        )
        if not plain:
            raise ValueError(f"{where}: LoRA setting {key}={value!r} is not a plain value")
    return dict(peft)


def model_from_checkpoint(
    path: str | Path, tokenizer: str | None = None, device: str = "cpu", attn_implementation: str = "sdpa"
):
    """A run's model (LoRA merged) and tokenizer, rebuilt from its `.ckpt` alone.

    The checkpoint records its base (a folder, or the architecture and seed of a random init), its LoRA
    settings and its weights; the model is built from those.

    Nothing is instantiated from the run folder: a `.hydra/config.yaml` can name any callable, so it is not read.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    base = state.get(BASE_KEY) if isinstance(state, dict) else None
    hparams = state.get("hyper_parameters") or {} if isinstance(state, dict) else {}
    if not isinstance(base, dict) or base.get("kind") not in ("pretrained", "random"):
        raise ValueError(
            f"{path} does not record a base model this loader can rebuild ({BASE_KEY}={base!r}; checkpoints "
            f"written before it was recorded, or a custom net); pass the run's export/ or adapter/ folder instead"
        )
    if base["kind"] == "pretrained":
        model = MossTTSD.from_pretrained(str(base["path"]), attn_implementation=attn_implementation)
        tok_path = tokenizer or str(base["path"])
    else:
        config = MossTTSDConfig.from_dict(dict(base["config"]), source=f"{path} ({BASE_KEY})")
        model = MossTTSD.from_config(config, seed=base.get("seed"), attn_implementation=attn_implementation)
        tok_path = tokenizer
    peft = hparams.get("peft")
    if peft:
        model = apply_lora(model, **lora_settings(peft, path))
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or (missing and not state.get("adapter_only")):
        raise ValueError(
            f"{path}: weights do not fit the recorded model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model = unwrap(merged(model)).to(device).eval()
    if tok_path is None:
        from moss.text.tiny_tokenizer import build_tiny_tokenizer

        tiny = MossTTSDConfig.tiny()  # the built-in tokenizer fits any width, not another vocabulary
        layout = ("vocab_size", "speech_token_range", "channels", "speech_eos_token")
        if any(getattr(config, key) != getattr(tiny, key) for key in layout):
            raise ValueError(f"{path} is a random model without the tiny vocabulary; set tokenizer=/path/to/tokenizer")
        return model, build_tiny_tokenizer()
    return model, AutoTokenizer.from_pretrained(tok_path)
