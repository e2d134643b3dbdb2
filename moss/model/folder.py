"""A model folder's files: its weights, read from file headers, and `generation_config.json`, checked as read.

Readable: `model.safetensors`, sharded `model.safetensors.index.json`, `pytorch_model.bin` and its sharded
index; `.bin` files are opened with `torch.load(weights_only=True)` only, never as arbitrary pickle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import torch
from pydantic import Field
from safetensors import safe_open

from moss.config_schema import check_values
from moss.errors import ConfigError, first_line
from moss.model.config import read_json_object
from moss.settings import Count, Positive, Seed, Size, TypedDict

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
GENERATION_CONFIG = "generation_config.json"


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint folder, in loading order.

    Raises:
        FileNotFoundError: none of the known layouts is present; lists what the folder holds.
    """
    for name in WEIGHT_FILES:
        file = path / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(weight_map(file).values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{file} lists shards that are missing: {missing}")
            return [path / s for s in shards]
        return [file]
    present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    raise FileNotFoundError(
        f"no weights in {path}: expected one of {WEIGHT_FILES}, found {present or 'nothing'}; "
        f"set model.path to a complete MOSS-TTSD checkpoint folder"
    )


def weight_map(file: Path) -> dict[str, str]:
    """The `weight_map` of a sharded checkpoint's index: parameter name -> a shard file inside the folder."""
    mapping = read_json_object(file).get("weight_map")
    if not isinstance(mapping, dict) or not mapping:
        raise ConfigError(f"{file} has no weight_map (parameter name -> shard file); the index is not usable")
    for key, shard in mapping.items():
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise ConfigError(f"{file}: weight_map[{key!r}] = {shard!r} is not a file name in the folder")
    return mapping


def stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The parameters a checkpoint folder stores and their shapes, read from file headers (`.bin` memory-mapped).

    Raises:
        ConfigError: a weights file that does not open (named), or a `.bin` that is not a dict of tensors.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for file in weight_files(path):  # raises naming what is missing
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as f:
                    shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
            else:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                if not isinstance(state, dict):
                    raise ConfigError(f"{file} holds a {type(state).__name__}, not a dict of tensors")
                shapes.update({key: tuple(value.shape) for key, value in state.items() if hasattr(value, "shape")})
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - truncated, not a zip, refused by weights_only: one message
            raise ConfigError(f"{file} is not a readable weights file ({first_line(err)})") from None
    return shapes


def usual_permissions(*paths: Path) -> None:
    """Give files the mode a plain `open()` would (0666 minus the umask).

    safetensors creates its files 0600, so an export would be unreadable to the rest of a team on a shared
    machine.
    """
    mask = os.umask(0)
    os.umask(mask)
    for path in paths:
        os.chmod(path, 0o666 & ~mask)


def write_generation_config(out_dir: Path, generation_config: dict | None) -> None:
    """Write `generation_config.json`, or remove an earlier export's (its sampling does not belong to this model)."""
    generation = out_dir / GENERATION_CONFIG
    if generation_config:
        generation.write_text(json.dumps(generation_config, indent=2) + "\n")
    else:
        generation.unlink(missing_ok=True)


class ChannelSamplingJson(TypedDict, total=False):
    """One channel's sampling in a `generation_config.json` (the original's `layers` entries, or the top level)."""

    do_sample: bool
    temperature: Positive | None
    top_k: Size | None
    top_p: Annotated[float, Field(gt=0, le=1)] | None
    repetition_penalty: Positive | None


class GenerationJson(ChannelSamplingJson, total=False):
    """The `generation_config.json` fields generation reads: per-channel (`do_samples` + `layers`) or shared."""

    do_samples: list[bool] | None
    layers: list[ChannelSamplingJson] | None
    max_new_tokens: Count | None
    seed: Seed | None


def read_generation_config(path: Path) -> dict | None:
    """A checkpoint folder's `generation_config.json` as a dict, or None when it has none.

    Raises:
        ConfigError: the file is not a JSON object, or a field generation reads is out of its bounds.
    """
    file = path / GENERATION_CONFIG
    if not file.is_file():
        return None
    data = read_json_object(file)
    problems = check_values(data, GenerationJson, str(file))
    samples, layers = data.get("do_samples"), data.get("layers")
    if not problems and samples is not None and layers is not None and len(samples) != len(layers):
        problems.append(f"do_samples has {len(samples)} entries, layers {len(layers)}: one per channel each")
    if problems:
        raise ConfigError(f"{file}: " + "; ".join(problems) + "; fix it, or delete it to use the default sampling")
    return data
