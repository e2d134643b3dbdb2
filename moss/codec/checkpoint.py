"""Loading `xy_tokenizer.ckpt` safely and strictly.

The checkpoint is a torch pickle; it is opened with `torch.load(weights_only=True)`, which admits tensors and
plain containers only, never arbitrary objects. Both layouts of the original loader are accepted: a plain
state dict, or `{"generator": state_dict, ...}`. A `.safetensors` export of the same state dict loads too.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file


def read_codec_state(path: Path) -> dict[str, torch.Tensor]:
    """The generator state dict stored at `path`.

    Raises:
        FileNotFoundError: no file.
        ValueError: the file holds something other than tensors (with a way to convert it).
    """
    if not path.is_file():
        raise FileNotFoundError(f"codec checkpoint {path} does not exist; pass the path of xy_tokenizer.ckpt")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds objects other than tensors, which are not unpickled for safety ({err}). If you trust "
            f"the file, convert it once: torch.load(..., weights_only=False)['generator'] -> "
            f"safetensors.torch.save_file(state, 'xy_tokenizer.safetensors')"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("generator"), dict):
        data = data["generator"]
    if not isinstance(data, dict) or not all(torch.is_tensor(v) for v in data.values()):
        raise ValueError(
            f"{path} is not an XY-Tokenizer state dict (expected a dict of tensors or {{'generator': ...}})"
        )
    return data


def load_codec_state(model: torch.nn.Module, path: Path) -> None:
    """Copy the checkpoint into `model`, naming every missing, unexpected or mis-shaped tensor.

    Raises:
        ValueError: the checkpoint does not match the config, or its codebooks were never initialised.
    """
    state = read_codec_state(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:

        def head(items):
            return f"{items[:6]}{' ...' if len(items) > 6 else ''} ({len(items)})"

        raise ValueError(
            f"{path} does not match the codec config: missing {head(missing)}, unexpected {head(unexpected)}, "
            f"wrong shapes {head(shapes)}; check that the YAML is the one this checkpoint was trained with"
        )
    not_ready = [k for k, v in state.items() if k.endswith(".inited") and not bool(v.all())]
    if not_ready:
        raise ValueError(f"{path}: codebooks were never initialised ({not_ready[:3]}); not a trained codec")
    model.load_state_dict(state, strict=True)


def codec_problems(settings) -> list[str]:
    """What is wrong with a `codec` setting group (conf/codec/), each with its fix; checked before any loading."""
    if settings.get("tiny"):
        return []
    problems = []
    for key, example in (("config", "/ckpt/xy_tokenizer_32k_config.yaml"), ("checkpoint", "/ckpt/xy_tokenizer.ckpt")):
        value = settings.get(key) if key in settings and not _is_missing(settings, key) else None
        if value is None:
            problems.append(f"codec.{key} is required; set codec.{key}={example} (or codec=tiny: random, noise)")
        elif not Path(str(value)).is_file():
            problems.append(f"codec.{key}={value} is not a file; set codec.{key}={example}")
    return problems


def _is_missing(settings, key: str) -> bool:
    from omegaconf import OmegaConf

    return OmegaConf.is_config(settings) and OmegaConf.is_missing(settings, key)
