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
from dataclasses import dataclass
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from moss.data.dataset import expand_shards
from moss.data.epochs import EpochPlan
from moss.model.checkpoint import resolve_model_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawStage:
    """Preprocessing JSONL files `inputs` into the shard folder `folder`, before training (`raw.train/val`)."""

    inputs: tuple[str, ...]
    folder: Path


@dataclass(frozen=True)
class RunPlan:
    """What a run does: its final, read-only config and the epoch plan behind its length (if any)."""

    cfg: DictConfig
    epochs: EpochPlan | None


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
    `data.epochs` must count it). `fit_workers`: a set preprocessed from a few records may have fewer shards
    than ranks x loader workers; lower `data.num_workers` to fit instead of refusing.
    """
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        if fit_workers:
            _fit_workers_to_shards(cfg)
        epochs = _epoch_plan(cfg)
        if epochs is not None:
            cfg.trainer.max_steps = epochs.max_steps
            cfg.trainer.val_check_interval = epochs.steps_per_epoch
            if cfg.get("callbacks") and cfg.callbacks.get("model_checkpoint"):
                cfg.callbacks.model_checkpoint.every_n_train_steps = epochs.steps_per_epoch
            log.info(epochs.describe())
    OmegaConf.set_readonly(cfg, True)
    return RunPlan(cfg, epochs)


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


def _fit_workers_to_shards(cfg: DictConfig) -> None:
    shards, world = len(expand_shards(cfg.data.train_shards)), world_size(cfg)
    most = max(1, shards // world)
    if int(cfg.data.num_workers) > most:
        log.warning(
            "%s has %d shards for %d ranks: data.num_workers %d -> %d",
            cfg.data.train_shards,
            shards,
            world,
            cfg.data.num_workers,
            most,
        )
        cfg.data.num_workers = most


def _epoch_plan(cfg: DictConfig) -> EpochPlan | None:
    """`data.epochs` in optimiser steps, estimated through the run's own example builder (tokenizer, layout)."""
    if not cfg.data.get("epochs"):
        return None
    tokenizer = instantiate(cfg.tokenizer)
    model_config = instantiate(cfg.model.config)
    datamodule = instantiate(cfg.data, _partial_=True)(tokenizer=tokenizer, model_config=model_config)
    return datamodule.epoch_plan(world_size(cfg))
