"""One run plan: every setting a training run derives from its config, resolved before it is recorded and run.

A run's config is not final as composed: a Hub id becomes a local folder, `raw.*` points the data at the
folders it is preprocessed into, a small shard set lowers `data.num_workers`, and `data.epochs` sets
`trainer.max_steps`, the validation interval and the checkpoint interval. `plan_sources` makes the changes
that need no data (and names the preprocessing stages), `plan_run` the ones that read the shard sets; what
`plan_run` returns is read-only, and it is the config `<run>/.hydra/config.yaml` records and the run uses.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from moss.config_schema import schema_problems
from moss.data.dataset import expand_shards, readers_problem
from moss.data.epochs import EpochPlan
from moss.errors import ConfigError
from moss.model.checkpoint import resolve_model_path
from moss.model.loss import normalized_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawStage:
    """Preprocessing JSONL files `inputs` into the shard folder `folder`, before training (`raw.train/val`)."""

    inputs: tuple[str, ...]
    folder: Path


@dataclass(frozen=True)
class RunPlan:
    """What a run does: its final, read-only config and the epoch plan behind its length (if any).

    With them, the objects built from the config on the way, which the run uses as they are (each built once).
    """

    cfg: DictConfig
    epochs: EpochPlan | None
    tokenizer: object
    model_config: object
    datamodule: object


def plan_sources(cfg: DictConfig) -> tuple[DictConfig, list[RawStage]]:
    """A copy of `cfg` with the model path resolved and the data pointed at its `raw.*` folders, and those stages.

    Without `raw.train` nothing is preprocessed. The built-in validation set is never mixed with the user's
    data: without `raw.val` there is no validation.
    """
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        if cfg.model.get("path"):  # a Hub id becomes the folder it is downloaded to (every ${model.path} follows)
            cfg.model.path = resolve_model_path(cfg.model.path)
        raw = cfg.get("raw") or {}
        if not raw.get("train"):
            return cfg, []
        stages = []
        for split in ("train", "val"):
            inputs = raw.get(split)
            folder = Path(cfg.paths.output_dir) / "shards" / split
            if inputs:
                stages.append(RawStage(tuple(str(i) for i in inputs), folder))
            cfg.data[f"{split}_shards"] = str(folder) if inputs else None
        cfg.data.synthetic = None
    return cfg, stages


def plan_run(cfg: DictConfig, fit_workers: bool = False) -> RunPlan:
    """The final config: `cfg` with the loader workers fitted to the shards and `data.epochs` turned into steps.

    Needs the shard sets to exist (after the `plan_sources` stages; the built-in corpus is generated here when
    `data.epochs` must count it). A training set needs a shard per reader (ranks x loader workers): too few is
    refused, or with `fit_workers` (a set preprocessed from a few records) `data.num_workers` is lowered to fit.
    """
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        _fit_readers(cfg, fit_workers)
        tokenizer, model_config = instantiate(cfg.tokenizer), instantiate(cfg.model.config)
        _check_channel_weights(cfg, model_config.channels)
        datamodule = instantiate(cfg.data, _partial_=True)(tokenizer=tokenizer, model_config=model_config)
        epochs = datamodule.epoch_plan(world_size(cfg))  # `data.epochs` in optimiser steps (None without)
        if epochs is not None:
            cfg.trainer.max_steps = epochs.max_steps
            cfg.trainer.val_check_interval = epochs.steps_per_epoch
            if cfg.get("callbacks") and cfg.callbacks.get("model_checkpoint"):
                cfg.callbacks.model_checkpoint.every_n_train_steps = epochs.steps_per_epoch
            log.info(epochs.describe())
    OmegaConf.set_readonly(cfg, True)
    if problems := schema_problems(cfg):  # what the plan derived is checked like what the user set
        raise ConfigError("the planned config is invalid:\n  - " + "\n  - ".join(problems))
    return RunPlan(cfg, epochs, tokenizer, model_config, datamodule)


def _check_channel_weights(cfg: DictConfig, channels: int) -> None:
    weights = cfg.model.get("channel_weights")
    if weights is not None:
        try:
            normalized_weights(list(weights), channels)
        except ValueError as err:
            raise ConfigError(f"model.{err}") from None


def world_size(cfg: DictConfig) -> int:
    """Ranks the run will have (devices x nodes), from the config."""
    devices = OmegaConf.select(cfg, "trainer.devices", default=None)
    nodes = int(OmegaConf.select(cfg, "trainer.num_nodes", default=None) or 1)
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if OmegaConf.is_list(devices) or isinstance(devices, list | tuple):
        return len(devices) * nodes
    if str(devices) in ("-1", "auto") and OmegaConf.select(cfg, "trainer.accelerator") in ("gpu", "cuda", "auto"):
        import torch

        return max(1, torch.cuda.device_count()) * nodes
    return nodes


def synthetic_shards(cfg: DictConfig, split: str) -> int | None:
    """Shards the built-in corpus will have for `split`, when `data.<split>_shards` is its (generated) folder."""
    synthetic, spec = cfg.data.get("synthetic"), cfg.data.get(f"{split}_shards")
    samples = synthetic and synthetic.get(f"{split}_samples")
    if not samples or not isinstance(spec, str):
        return None
    if Path(spec).resolve() != (Path(str(synthetic.dir)) / split).resolve():
        return None
    return math.ceil(samples / synthetic.get("samples_per_shard", 64))


def _fit_readers(cfg: DictConfig, fit_workers: bool) -> None:
    """Apply the readers rule (`readers_problem`) to every training source.

    Too few shards for the readers is refused, or with `fit_workers` `data.num_workers` is lowered to fit.
    """
    sources = cfg.data.get("sources")
    if sources:
        sets = {f"data.sources.{name}.shards": len(expand_shards(s.shards)) for name, s in sources.items()}
    else:
        shards = synthetic_shards(cfg, "train")
        sets = {"data.train_shards": len(expand_shards(cfg.data.train_shards)) if shards is None else shards}
    ranks, workers = world_size(cfg), int(cfg.data.num_workers)
    problems = {name: problem for name, n in sets.items() if (problem := readers_problem(n, ranks, workers, name))}
    if not problems:
        return
    fitted = min(sets.values()) // ranks
    if not fit_workers or fitted < 1:
        raise ConfigError("\n".join(problems.values()))
    log.warning("%d shards for %d ranks: data.num_workers %d -> %d", min(sets.values()), ranks, workers, fitted)
    cfg.data.num_workers = fitted
