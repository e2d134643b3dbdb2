"""Reading and writing MOSS-TTSD weight folders in the layout of the original (and the transformers port).

Readable: `model.safetensors`, sharded `model.safetensors.index.json`, `pytorch_model.bin` and its sharded
index; `.bin` files are opened with `torch.load(weights_only=True)` only, never as arbitrary pickle.
Written: `config.json` + `model.safetensors` (or shards + index), keys `model.embedding_list.*`,
`model.language_model.*`; tied `lm_heads.*` are omitted, as the original's `save_pretrained` does.
`load_model` opens any model folder this project meets (ours, the original's, a peft adapter over either)
with the tokenizer beside it; a training run's `.ckpt` is the training layer's to read.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Literal

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
# Parameters a checkpoint may lack: the unused Qwen3 token table (we keep a zero table) and the tied heads.
OPTIONAL_PREFIXES = ("model.language_model.embed_tokens.",)
TIED_PREFIX = "lm_heads."


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as the Hugging Face Hub spells repositories
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]  # weights, configs, tokenizer


def resolve_model_path(path: str | Path) -> str:
    """A local model folder for `path`: the folder itself, or a Hub id downloaded to the Hugging Face cache.

    A Hub id is `owner/name` (`fnlp/MOSS-TTSD-v0.5`) that is not a local path; the cached copy is reused on
    later runs, also offline.

    Raises:
        ConfigError: `path` is not a local folder and is a Hub id that cannot be fetched (offline, unknown).
    """
    text = str(path)
    if Path(text).exists() or not HUB_ID.match(text):
        return text
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=text, allow_patterns=HUB_FILES)
    except Exception as err:  # noqa: BLE001 - offline, unknown repository, no access: all the same to the user
        raise ConfigError(
            f"{text} is not a local folder, and fetching it from the Hugging Face Hub failed "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); on a machine without network, download "
            f"it elsewhere (huggingface-cli download {text} --local-dir DIR) and pass that folder"
        ) from None


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


def load_tokenizer(path: str | Path):
    """The tokenizer of a model folder; whatever transformers raises for broken files is one line naming it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # noqa: BLE001 - a missing, truncated or foreign tokenizer file: one message
        raise ConfigError(
            f"the tokenizer in {path} does not load ({first_line(err)}); give a folder with a complete tokenizer "
            f"(tokenizer=/path/to/MOSS-TTSD)"
        ) from None


def checked_load(load, path: Path, *args, **kwargs) -> torch.nn.Module:
    """`load(path, ...)` (transformers' `from_pretrained`) with this project's checks around it.

    transformers warns about missing, unexpected or misshapen weights and initialises what is missing at random;
    a MOSS-TTSD folder missing a parameter (other than the unused token table) is the wrong folder, so each of
    those is an error here, naming the parameters, as is a weights file that does not open.
    """
    shapes = stored_shapes(path)  # no weights: names what the folder holds; a file that does not open: names it
    stored = set(shapes)
    if kwargs.get("config") is not None and (problems := shape_problems(kwargs["config"], shapes)):
        raise ConfigError(f"{path}: config.json does not match the weights: " + "; ".join(problems))
    try:  # misshapen weights come back in the loading info, to be refused below with their names
        model, info = load(path, *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except Exception as err:  # noqa: BLE001 - whatever transformers raises, the user gets one line
        raise ConfigError(f"{path}: the weights do not load ({first_line(err)})") from None
    if mismatched := sorted(info.get("mismatched_keys") or ()):
        shapes = [f"{key}: checkpoint {tuple(saved)} vs model {tuple(made)}" for key, saved, made in mismatched]
        raise ValueError(
            f"{path}: tensors of the wrong shape (config.json does not match the weights): {shapes[:4]}"
            f"{'...' if len(shapes) > 4 else ''} ({len(shapes)})"
        )
    missing = [k for k in info["missing_keys"] if not k.startswith((*OPTIONAL_PREFIXES, TIED_PREFIX))]
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith(TIED_PREFIX)]
    if missing or unexpected:
        raise KeyError(
            f"{path} does not match the MOSS-TTSD layout: missing {missing[:8]}{'...' if len(missing) > 8 else ''} "
            f"({len(missing)}), unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''} ({len(unexpected)})"
        )
    if not any(k.startswith(OPTIONAL_PREFIXES) for k in stored):
        with torch.no_grad():
            model.decoder.embed_tokens.weight.zero_()  # never read: zero rather than random, as a re-save writes it
    return model


def stored_keys(path: Path) -> set[str]:
    """The parameter names a checkpoint folder stores (see `stored_shapes`)."""
    return set(stored_shapes(path))


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


def shape_problems(config, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Where config.json's sizes disagree with the stored weights, before a model of that size is built.

    A config.json claiming 1000 layers over weights of 28 made the loader build 1000 layers and initialise the
    missing ones at random: minutes to hours, and then a refusal. The layer count is compared first (no model
    needed), then every stored shape with the model the config describes, built on the meta device (no memory).
    """
    from moss.model.modeling import MossTTSD

    layers = {int(m.group(1)) for key in shapes if (m := re.search(r"\.layers\.(\d+)\.", key))}
    if layers and len(layers) != config.backbone.get("num_hidden_layers"):
        return [
            f"num_hidden_layers={config.backbone.get('num_hidden_layers')}, but the weights hold {len(layers)} layers"
        ]
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MossTTSD(config).state_dict().items()}
    wrong = [
        f"{k}: weights {shapes[k]} vs config {expected[k]}"
        for k in sorted(shapes)
        if k in expected and shapes[k] != expected[k]
    ]
    if not wrong:
        return []
    more = "; ..." if len(wrong) > 3 else ""
    return [f"{len(wrong)} tensors do not have the shapes config.json gives ({'; '.join(wrong[:3])}{more})"]


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


class AdapterJson(TypedDict, total=False):
    """The `adapter_config.json` fields a LoRA adapter is rebuilt from."""

    peft_type: Literal["LORA"]
    r: Count
    lora_alpha: Positive
    lora_dropout: Annotated[float, Field(ge=0, lt=1)]
    target_modules: str | list[str] | None
    base_model_name_or_path: str | None


def read_adapter_config(path: Path) -> dict:
    """A LoRA adapter folder's `adapter_config.json`, checked (ConfigError naming the file and fields)."""
    file = path / "adapter_config.json"
    data = read_json_object(file)
    if problems := check_values(data, AdapterJson, str(file)):
        raise ConfigError(f"{file}: " + "; ".join(problems))
    return data


def load_model(
    checkpoint: str | Path,
    *,
    base_model: str | None = None,
    tokenizer: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
):
    """A MossTTSD (LoRA merged) and its tokenizer from a model folder, without Lightning or Hydra.

    `checkpoint` is an HF-format folder (ours or `fnlp/MOSS-TTSD-v0.5`) or a peft adapter folder (its base from
    `base_model` or the adapter's `base_model_name_or_path`). A training run's `.ckpt` is the training layer's
    to read (`moss.training.run_checkpoint.model_from_checkpoint`; `infer.py` takes either). `tokenizer`
    overrides where the tokenizer is read from.

    Raises:
        FileNotFoundError / ValueError: naming what is missing or which model the files belong to.
    """
    from moss.model.modeling import MossTTSD

    path = Path(resolve_model_path(checkpoint))
    if path.is_dir() and (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = base_model or read_adapter_config(path).get("base_model_name_or_path")
        if not base:
            raise ConfigError(
                f"{path} is a LoRA adapter without a recorded base model (a run from a random init has none); set "
                f"base_model=/path/to/model, or use the run's export/ folder or its .ckpt"
            )
        base = resolve_model_path(base)
        if not (Path(base) / "config.json").is_file():
            raise ConfigError(
                f"the base model of the adapter {path} ({base}, recorded in adapter_config.json) is not a model "
                f"folder here; set base_model=/path/to/MOSS-TTSD"
            )
        model = MossTTSD.from_pretrained(base, dtype=dtype, attn_implementation=attn_implementation, device=device)
        try:
            model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
        except Exception as err:  # noqa: BLE001 - adapter weights of another model, a broken file: one line
            raise ConfigError(f"the LoRA adapter {path} does not load over {base} ({first_line(err)})") from None
        tok_path = tokenizer or base
    elif path.is_dir() and (path / "config.json").is_file():
        model = MossTTSD.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation, device=device)
        tok_path = tokenizer or path
    elif path.is_file() and path.suffix == ".ckpt":
        raise ConfigError(
            f"checkpoint={path} is a training run's checkpoint: load it with "
            f"moss.training.run_checkpoint.model_from_checkpoint, or export it once "
            f"(python export.py checkpoint={path} output_dir=...) and use the folder"
        )
    else:
        raise FileNotFoundError(
            f"checkpoint={path} is neither an HF-format folder (config.json), a LoRA adapter folder "
            f"(adapter_config.json) nor a Lightning .ckpt file"
        )
    return model.eval(), load_tokenizer(tok_path)
