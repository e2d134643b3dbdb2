"""What a run's Lightning checkpoint holds besides Lightning's own state, and reading a model back from it.

Every checkpoint records its base model as plain data (`describe_base`, under `BASE_KEY`): a checkpoint folder,
or the architecture and seed of a random init. A LoRA run's checkpoints may hold only the trainable weights
(`ADAPTER_ONLY`). `model_from_checkpoint` rebuilds the model from that record alone; nothing named in the run
folder's YAML is instantiated (it could name any callable).
"""

from __future__ import annotations

import inspect
import io
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from moss.errors import ConfigError, first_line
from moss.model import MossTTSD, MossTTSDConfig
from moss.model.lora import apply_lora, merged, unwrap
from moss.outputs import atomic_write

log = logging.getLogger(__name__)

# The key of a Lightning checkpoint that records the run's base model (written by the LitModule, read below).
BASE_KEY = "moss_base"
ADAPTER_ONLY = "adapter_only"  # set in a LoRA run's checkpoints that hold the trainable weights only


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with the project's one rule for files (`moss.outputs.atomic_write`).

    Lightning writes a local checkpoint to a temporary file in the system's temp folder and then copies it over
    the old one: across file systems that copy truncates the old checkpoint first, so a full disk left a cut
    `best.ckpt` that `resume=auto` could not read. Here the temporary file is beside the checkpoint and on disk
    before it takes the name; a failed save leaves the old checkpoint whole and says how much space it needed.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))
        except OSError as err:
            err.needed_bytes = buffer.getbuffer().nbytes
            raise


def follow_moved_run(checkpoint: dict, callbacks) -> None:
    """Point the saved state of the run's `ModelCheckpoint`s at their folder now, when the run folder moved.

    The state holds absolute paths. Resumed from a moved or copied run folder, Lightning kept only the old
    `best_model_path` and dropped the best score: the next validation became "best" whatever its score, and
    `export.from=best` read a file in the old place. Paths under the old folder whose file is in the new one are
    moved with it; anything else is left as saved.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    for callback in callbacks:
        state = (
            (checkpoint.get("callbacks") or {}).get(callback.state_key)
            if isinstance(callback, ModelCheckpoint)
            else None
        )
        if not isinstance(state, dict) or callback.dirpath is None or not state.get("dirpath"):
            continue
        old, new = Path(state["dirpath"]), Path(callback.dirpath)
        if old == new or not new.is_dir():
            continue

        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            state[key] = _moved(state.get(key), old, new)
        state["best_k_models"] = {_moved(k, old, new): v for k, v in (state.get("best_k_models") or {}).items()}
        state["dirpath"] = str(new)


def _moved(path: str | None, old: Path, new: Path) -> str | None:
    """`path` under `new` instead of `old`, when it was under `old` and its file is there now."""
    if not path or not Path(path).is_relative_to(old) or not (new / Path(path).relative_to(old)).exists():
        return path
    return str(new / Path(path).relative_to(old))


def trainable_keys(model: torch.nn.Module) -> set[str]:
    """The Lightning state-dict keys of the weights a run trains (the module holds the model as `model`)."""
    return {f"model.{n}" for n, p in model.named_parameters() if p.requires_grad}


def keep_only_trainable(checkpoint: dict, trainable: set[str]) -> None:
    """Drop the frozen base from a Lightning checkpoint (tens of MB instead of the 4 GB base)."""
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
    checkpoint[ADAPTER_ONLY] = True


def check_trainable(checkpoint: dict, trainable: set[str]) -> None:
    """An adapter-only checkpoint must hold every weight this run trains.

    Raises:
        KeyError: naming the missing weights (the checkpoint came from other peft settings).
    """
    missing = trainable - set(checkpoint["state_dict"])
    if missing:
        raise KeyError(
            f"adapter-only checkpoint lacks trainable weights {sorted(missing)[:5]} ({len(missing)}); "
            f"was it written with the same peft settings?"
        )


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
    from moss.model.checkpoint import load_tokenizer

    path = Path(path)
    state = read_run_checkpoint(path)
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
    if unexpected or (missing and not state.get(ADAPTER_ONLY)):
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
    return model, load_tokenizer(tok_path)


def load_best(trainer, module, best_checkpoint) -> str:
    """Put the weights of the run's best checkpoint into `module`, for export; what it holds now, in words.

    `best_checkpoint` is the run's best-score `ModelCheckpoint`. Without one, or before the first validation,
    the last weights stay (said in a warning and in the result). Every rank calls this: under FSDP the best
    checkpoint is a distributed folder that all ranks read their shards of; otherwise rank 0 reads the file.
    """
    from moss.training.sharding import is_sharded

    best = str(getattr(best_checkpoint, "best_model_path", "") or "")
    if not best:
        why = "no best checkpoint callback" if best_checkpoint is None else "no validation has run"
        log.warning("export.from=best: %s; exporting the last weights", why)
        return f"last weights ({why})"
    path, monitor, value = Path(best), best_checkpoint.monitor, best_checkpoint.best_model_score
    if not path.exists():
        raise ConfigError(
            f"export.from=best: the best checkpoint {path} is gone; put it back, or export the last weights with "
            f"export.from=last (or python export.py checkpoint={path.parent / 'last.ckpt'} output_dir=...)"
        )
    score = f"{monitor} {float(value):.4f}" if value is not None else f"best {monitor}"
    if is_sharded(module.model):
        step = trainer.strategy.load_checkpoint(path, weights_only=True).get("global_step")
        return f"{path.name}: {score} at step {step}"
    if not trainer.is_global_zero:
        return ""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get(ADAPTER_ONLY):
        check_trainable(state, trainable_keys(module.model))
    missing, unexpected = module.load_state_dict(state["state_dict"], strict=False)
    if unexpected or (missing and not state.get(ADAPTER_ONLY)):
        raise ValueError(
            f"{path}: weights do not fit this run's model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return f"{path.name}: {score} at step {state.get('global_step')}"


def read_run_checkpoint(path: str | Path) -> dict:
    """A run's `.ckpt` as a dict (tensors and plain data only: `weights_only=True`).

    Raises:
        ConfigError: `path` is a folder, missing, truncated, not a torch checkpoint, or not a dict; one line.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"{path} is a folder, not a run's .ckpt file; give the file (runs/<name>/checkpoints/last.ckpt), or the "
            f"folder without the .ckpt suffix if it is an exported model"
        )
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; give a run's .ckpt (runs/<name>/checkpoints/last.ckpt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, empty, foreign or refused by weights_only: one message
        raise ConfigError(f"{path} is not a readable run checkpoint ({first_line(err)})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path} holds a {type(state).__name__}, not a run checkpoint")
    return state


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from (None: it loads)."""
    return read_position(path)[1]


def read_position(path: str | Path) -> tuple[int, str | None]:
    """The training step a checkpoint resumes at, and why it cannot be resumed from (None: it loads).

    A single file is opened memory-mapped (its tensors are not read); a distributed checkpoint (FSDP: a folder)
    must have its `.metadata`, the file the distributed reader starts from, and Lightning's `meta.pt` with the
    loops' state.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / ".metadata").is_file():
            return -1, "a checkpoint folder without its .metadata"
        path = path / "meta.pt"
        if not path.is_file():
            return -1, "a checkpoint folder without its meta.pt"
    try:
        if path.stat().st_size == 0:
            return -1, "an empty file"
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure to load is the reason it is passed over
        return -1, first_line(err, 200)
    if not isinstance(state, dict) or ("state_dict" not in state and path.name != "meta.pt"):
        return -1, "not a Lightning checkpoint (no state_dict)"
    step = state.get("global_step", 0)  # a hand-made checkpoint without loops resumes at its start
    if not isinstance(step, int) or step < 0:
        return -1, f"no training step recorded (global_step={step!r})"
    return step, None
