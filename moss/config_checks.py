"""validate(cfg): every problem of a training config, reported at once, each with the override that fixes it.

The one library module that knows the top-level layout of `conf/train.yaml`. It runs before anything is built
or written: a run that would fail after minutes of model loading, or on a setting it silently ignores, fails
here in a second with one message. Each setting's type and limits are declared beside the parameter that takes
it and checked by `moss.config_schema`; train.yaml's own settings are declared here (`TrainSettings`). What is
left below are the rules between settings and the world: files that must exist, a GPU that must be there, a
monitor some callback must log.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Literal

from omegaconf import DictConfig, OmegaConf
from pydantic import Field

from moss.config_schema import check_mapping, schema_problems
from moss.errors import ConfigError
from moss.evaluation.speech_models import Language
from moss.model.speedups import liger_problem
from moss.settings import Count, NonNegative, Probability, Seed, Size, TypedDict, strict
from moss.training.launch import relaunched_rank
from moss.training.plan import synthetic_shards
from moss.training.quality_gate import GATE_METRICS, gate_metric

log = logging.getLogger(__name__)

# Folders of a run directory that only a run writes: their presence means the name is taken.
RUN_OUTPUTS = ("checkpoints", "logs", "export", "adapter")
# What the training step, validation and Lightning log, and so what best.ckpt and early stopping can watch.
LOGGED = ("val/loss", "train/loss", "train/grad_norm", "train/lr", "step", "epoch")


@strict
class SanityCheck(TypedDict, total=False):
    """`sanity_check`: the check of the first training samples before training (`moss.data.sanity`)."""

    samples: Size
    normalize: Literal["v0.5", "v0.7"] | None
    asr_model: str | None
    asr_language: Language | None
    max_cer: NonNegative


@strict
class DataCard(TypedDict, total=False):
    """`data_card`: the estimates written to `<run>/data_card.json`."""

    max_samples: Size


@strict
class Raw(TypedDict, total=False):
    """`raw`: JSONL files preprocessed into the run's shards."""

    train: list[str] | None
    val: list[str] | None
    settings: dict | None


Export = strict(
    TypedDict(
        "Export",
        {
            "enabled": bool,
            "from": Literal["best", "last"],
            "layout": Literal["original", "moss_ttsd"],
            "sampling": dict | list[dict] | None,
        },
        total=False,
    )
)


class TrainerSettings(TypedDict, total=False):
    """Limits of the `trainer.*` settings Lightning's Trainer takes without them (its own check runs too)."""

    max_steps: Count  # the schedule is computed from it: the run has an end
    devices: Count | list[Size] | Literal["auto"]
    num_nodes: Count
    log_every_n_steps: Count
    val_check_interval: Count | Annotated[float, Field(gt=0, le=1)] | None
    limit_val_batches: Size | Probability | None
    limit_train_batches: Size | Probability | None


class TrainSettings(TypedDict, total=False):
    """The settings of conf/train.yaml that no `_target_` takes (the groups are checked by their targets)."""

    name: str
    seed: Seed
    resume: str | None
    float32_matmul_precision: Literal["highest", "high", "medium"]
    export: Export
    sanity_check: SanityCheck
    data_card: DataCard | None
    raw: Raw


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem found in `cfg` (nothing is changed or written)."""
    problems = [
        *schema_problems(cfg),
        *check_mapping(cfg, TrainSettings),
        *check_mapping(cfg, TrainerSettings, "trainer"),
        *_model_problems(cfg),
        *_data_problems(cfg),
        *_trainer_problems(cfg),
        *_monitor_problems(cfg),
        *_sanity_problems(cfg),
        *run_problems(cfg),
    ]
    if problems:
        raise ConfigError("invalid training config:\n  - " + "\n  - ".join(problems))


def _select(cfg: DictConfig, key: str):
    """The value at `key`, or None when it is absent, `???` or cannot be resolved here."""
    try:
        return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - e.g. ${hydra:...} outside a Hydra run
        return None


def _is_missing(cfg: DictConfig, key: str) -> bool:
    node, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, node) if node else cfg
    return parent is None or leaf not in parent or OmegaConf.is_missing(parent, leaf)


def _model_problems(cfg: DictConfig) -> list[str]:
    problems = []
    if _is_missing(cfg, "model.path"):
        problems.append("model.path is required for this model; set model.path=/path/to/MOSS-TTSD-v0.5")
    elif (path := _select(cfg, "model.path")) is not None and not (Path(str(path)) / "config.json").is_file():
        problems.append(f"model.path={path} has no config.json; point it at a MOSS-TTSD checkpoint folder")

    attn = _select(cfg, "model.net.attn_implementation")
    if attn in ("varlen_sdpa", "flash_attention_2") and _select(cfg, "data.packing") is None:
        problems.append(
            f"model.net.attn_implementation={attn} needs packed batches; set data.packing (see conf/data/) "
            f"or use model.net.attn_implementation=sdpa with data.packing=null"
        )
    return problems


def _raw_problems(cfg: DictConfig) -> list[str]:
    """Raw JSONL inputs that are not files, and the codec they need (`raw.*`, preprocessed by train.py)."""
    raw = _select(cfg, "raw") or {}
    listed = [str(f) for split in ("train", "val") for f in (raw.get(split) or [])]
    if not listed:
        return []
    from moss.codec.checkpoint import codec_problems

    problems = [f"raw: {f} is not a file; list JSONL files, e.g. raw.train=[/data/train.jsonl]" for f in listed]
    problems = [p for p, f in zip(problems, listed, strict=True) if not Path(f).is_file()]
    if raw.get("val") and not raw.get("train"):
        problems.append("raw.val needs raw.train (the training JSONL) too")
    if raw.get("train") and _select(cfg, "data.sources"):
        problems.append(
            "raw.train preprocesses one training set, data.sources mixes several: preprocess each source with "
            "python -m data_pipelines.preprocess and name its folder in data.sources.<name>.shards"
        )
    return problems + codec_problems(cfg.codec)


def _data_problems(cfg: DictConfig) -> list[str]:
    """Shard specs that match nothing (the plan fits the readers to the shards: `moss.training.plan`)."""
    raw = _select(cfg, "raw") or {}
    if raw.get("train") or raw.get("val"):
        return _raw_problems(cfg)  # the shards are made from raw.* before training
    sources = _select(cfg, "data.sources")
    if not sources and (_is_missing(cfg, "data.train_shards") or _select(cfg, "data.train_shards") is None):
        return ["data.train_shards is required (or data.sources); set data.train_shards='/path/to/shards/*.tar'"]
    from moss.data.dataset import expand_shards
    from moss.data.mixing import source_specs

    plain = OmegaConf.to_container(cfg.data, resolve=True) if sources else {}
    shaped = isinstance(plain.get("sources"), dict) and all(isinstance(s, dict) for s in plain["sources"].values())
    if sources and not shaped:
        return []  # the schema check names what is wrong with data.sources itself
    try:
        specs = source_specs(plain.get("train_shards"), plain.get("sources"), plain.get("epochs")) if sources else []
    except ConfigError as err:
        return [str(err)]
    splits = ["val"] if sources else ["train", "val"]
    sets = {f"data.sources.{spec.name}.shards": spec.shards for spec in specs}
    for split in splits:  # the built-in corpus is generated on first use: nothing to find yet
        if synthetic_shards(cfg, split) is None:
            sets[f"data.{split}_shards"] = _select(cfg, f"data.{split}_shards")
    problems = []
    for name, spec in sets.items():
        if spec is None:
            continue
        try:
            expand_shards(OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec, name)
        except FileNotFoundError as err:
            problems.append(str(err))
    return problems


def _trainer_problems(cfg: DictConfig) -> list[str]:
    import torch

    problems = []
    accelerator = str(_select(cfg, "trainer.accelerator"))
    precision = str(_select(cfg, "trainer.precision"))
    devices = _select(cfg, "trainer.devices")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and isinstance(devices, int) and devices > cores:  # a few more work (tests of 3 ranks on 2 cores)
        message = (
            f"trainer.devices={devices} would start {devices} training processes on the CPU, and this machine has "
            f"{cores} cores; set trainer.devices={cores} or fewer (or train on GPUs: trainer=gpu)"
        )
        if devices > 4 * cores:
            problems.append(message)
        else:
            log.warning(message)
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        problems.append(
            f"trainer.accelerator={accelerator} but this machine has no CUDA GPU (torch {torch.__version__}); "
            f"to run on the CPU add trainer.accelerator=cpu trainer.precision=32-true (experiments lora_v05 and "
            f"full_v05 are sized for GPUs)"
        )
    elif accelerator in ("gpu", "cuda") and isinstance(devices, int) and devices > torch.cuda.device_count():
        problems.append(
            f"trainer.devices={devices} but this machine has {torch.cuda.device_count()} CUDA GPUs; set "
            f"trainer.devices={torch.cuda.device_count()} (or trainer.num_nodes for more machines)"
        )
    if precision.startswith("16"):
        problems.append(
            f"trainer.precision={precision} needs a loss scaler, which the training step does not run; use "
            f"bf16-mixed (A100/H100 and newer) or 32-true"
        )
    moved = {"accumulate_grad_batches": "data.accumulate_grad_batches", "gradient_clip_val": "model.gradient_clip_val"}
    for key, owner in moved.items():
        if key in (cfg.get("trainer") or {}):
            problems.append(f"trainer.{key} is not read: the training step is the module's; set {owner} instead")
    if _select(cfg, "model.speedups.liger") and (problem := liger_problem("cpu" if accelerator == "cpu" else "cuda")):
        problems.append(f"{problem}; set model.speedups.liger=false")
    return problems


def _sanity_problems(cfg: DictConfig) -> list[str]:
    """The pre-training check's ASR half needs the codec that decodes the shards' codes."""
    if not _select(cfg, "sanity_check.asr_model") or not int(_select(cfg, "sanity_check.samples") or 0):
        return []
    from moss.codec.checkpoint import codec_problems

    return [f"sanity_check.asr_model decodes the training codes: {p}" for p in codec_problems(cfg.codec)]


def _monitor_problems(cfg: DictConfig) -> list[str]:
    """Monitors of best.ckpt / early stopping that nothing would log, and a quality gate that would never run."""
    callbacks = _select(cfg, "callbacks") or {}
    gate = callbacks.get("quality_gate")
    problems = []
    if gate is not None and _select(cfg, "data.val_shards") is None and not (_select(cfg, "raw") or {}).get("val"):
        problems.append(
            "callbacks.quality_gate runs at each validation, and this run has no validation data; set "
            "data.val_shards (or raw.val), or drop the gate with ~callbacks.quality_gate"
        )
    for name in ("best_checkpoint", "early_stopping", "model_checkpoint"):
        monitor = (callbacks.get(name) or {}).get("monitor")
        if monitor is not None and not gate_metric(monitor) and monitor not in LOGGED:
            import difflib

            known = [*LOGGED, *(f"val/{m}" for m in GATE_METRICS)]
            close = difflib.get_close_matches(str(monitor), known, n=1, cutoff=0.6)
            problems.append(
                f"callbacks.{name}.monitor={monitor} is logged by nothing"
                + (f"; did you mean callbacks.{name}.monitor={close[0]}?" if close else "")
                + f" (logged: {', '.join(LOGGED)}; with callbacks=quality_gate also val/{', val/'.join(GATE_METRICS)})"
            )
            continue
        if not gate_metric(monitor):
            continue
        if gate is None:
            problems.append(
                f"callbacks.{name}.monitor={monitor} is logged by the quality gate, which is off; add "
                f"callbacks=quality_gate (with its scripts, codec and metric models), or monitor val/loss"
            )
        elif gate.get("every_n_validations", 1) != 1:
            problems.append(
                f"callbacks.{name}.monitor={monitor} must be measured at every validation; set "
                f"callbacks.quality_gate.every_n_validations=1"
            )
    return problems


def run_problems(cfg: DictConfig) -> list[str]:
    """A resume target that does not exist, or a run directory that already holds another run."""
    resume = _select(cfg, "resume")
    if resume not in (None, "auto") and not Path(str(resume)).is_file():
        return [f"resume={resume} is not a checkpoint file; use resume=auto or a path to a .ckpt"]
    if problem := name_problem(_select(cfg, "name")):
        return [problem]
    output = _select(cfg, "paths.output_dir")
    if resume is not None or output is None or relaunched_rank():
        return []
    taken = [name for name in RUN_OUTPUTS if (Path(output) / name).is_dir() and any((Path(output) / name).iterdir())]
    if not taken:
        return []
    return [
        f"the run directory {output} already holds a run ({', '.join(f'{t}/' for t in taken)}); continue it with "
        f"resume=auto, or start another with name={_free_name(cfg)} (or delete {output})"
    ]


def name_problem(name) -> str | None:
    """Why `name` cannot name a run folder under `paths.root` (one plain folder name: no path, not . or ..)."""
    text = "" if name is None else str(name)
    if not text.strip() or text in (".", "..") or "/" in text or "\\" in text or "\0" in text or text != text.strip():
        return (
            f"name={text!r} must be one plain folder name (not empty, '.', '..', and without '/'); the run "
            f"directory is paths.root/name: set name=my-run (and paths.root=/where/runs/go for another place)"
        )
    return None


def _free_name(cfg: DictConfig) -> str:
    name, root = str(_select(cfg, "name")), Path(str(_select(cfg, "paths.root") or "runs"))
    suffix = 2
    while (root / f"{name}-{suffix}").exists():
        suffix += 1
    return f"{name}-{suffix}"
