"""A run's model outside the run: merged HF-format folders and peft adapters.

The merged folder has the original layout (config.json + safetensors, tied heads omitted) plus the tokenizer
files, so `MossTTSD.from_pretrained` and the original OpenMOSS loader both read it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import PeftModel

from moss.generation import generation_for
from moss.model import MossTTSD
from moss.model.folder import usual_permissions
from moss.model.lora import apply_lora, merged, unwrap
from moss.outputs import OutputFolder
from moss.training.run_checkpoint import model_from_checkpoint
from moss.training.sharding import full_state_dict, is_sharded


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
    copy.generation_config = moss.generation_config
    copy = apply_lora(copy, **peft) if peft else copy
    copy.load_state_dict(state)
    return copy.eval()


TRAINING_CONFIG = "training_config.yaml"  # the config of the run that trained an export (train.py writes it)


def export_hf(
    model: torch.nn.Module,
    out_dir: str | Path,
    tokenizer=None,
    layout: str = "original",
    dtype: torch.dtype | None = None,
    sampling: dict | list | None = None,
) -> Path:
    """Write `model` (LoRA merged) as an HF-format folder; returns `out_dir`.

    Its `generation_config.json` is in the original's form (per-channel `do_samples` + `layers`): `sampling`
    when given, else the base checkpoint's, else OpenMOSS' client defaults (`moss.generation.generation_for`).
    """
    out_dir = Path(out_dir)
    merged_copy = merged(model)
    if dtype is not None:
        merged_copy = copy.deepcopy(merged_copy).to(dtype) if merged_copy is model else merged_copy.to(dtype)
    generation = generation_for(merged_copy.generation_config, sampling).to_dict(merged_copy.config)
    merged_copy.save_pretrained(out_dir, layout=layout, generation_config=generation)
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
    sampling: dict | list | None = None,
    overwrite: bool = False,
) -> Path:
    """Export any checkpoint `infer.py` reads as a merged HF-format folder with its tokenizer.

    Accepts a run's Lightning `.ckpt`, a LoRA adapter folder or an HF folder. `out_dir` is checked before the
    model is loaded (`moss.outputs.OutputFolder`: a folder of someone else's files is refused, an earlier
    export is replaced only with `overwrite`), and the export is written beside it and moved into place.
    """
    from moss.model.checkpoint import load_model

    folder = OutputFolder(out_dir, "export", overwrite=overwrite).check()
    if Path(checkpoint).suffix == ".ckpt":
        model, tok = model_from_checkpoint(checkpoint, tokenizer)
    else:
        model, tok = load_model(checkpoint, base_model=base_model, tokenizer=tokenizer)
    config = training_config_of(Path(checkpoint))
    text = config.read_bytes() if config is not None else None  # read before the folder may be replaced
    with folder.staged() as stage:
        export_hf(model, stage, tok, layout=layout, sampling=sampling)
        if text is not None:
            (stage / TRAINING_CONFIG).write_bytes(text)
    return Path(out_dir)


def training_config_of(checkpoint: Path) -> Path | None:
    """The training config that goes with a checkpoint (None when there is none).

    An export's own `training_config.yaml`, or for a run's `.ckpt` the run's record
    (`<run>/checkpoints/x.ckpt` -> `<run>/.hydra/config.yaml`).
    """
    if checkpoint.is_dir():
        found = checkpoint / TRAINING_CONFIG
    else:
        found = checkpoint.parent.parent / ".hydra" / "config.yaml"
    return found if found.is_file() else None
