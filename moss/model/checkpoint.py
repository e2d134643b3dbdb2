"""Opening any model folder this project meets, with the tokenizer beside it (`load_model`).

Ours, the original's (`fnlp/MOSS-TTSD-v0.5`, also by Hub id), or a peft adapter over either. A training run's
`.ckpt` is the training layer's to read (`moss.training.run_checkpoint`); the folder's files are
`moss.model.folder`'s.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from moss.config_schema import check_values
from moss.errors import ConfigError, first_line
from moss.model.config import read_json_object
from moss.model.modeling import MossTTSD
from moss.settings import Count, Positive, TypedDict

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
