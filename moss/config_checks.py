"""validate(cfg): every cross-field problem of a training config, reported at once with its fix.

The one library module that knows the top-level layout of `conf/train.yaml`.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from moss.model.modeling import ATTN_IMPLEMENTATIONS


class ConfigError(ValueError):
    """One or more configuration problems; the message lists all of them."""


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem found in `cfg` (nothing is changed)."""
    problems: list[str] = []

    def missing(key: str) -> bool:
        node, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, node) if node else cfg
        return parent is None or leaf not in parent or OmegaConf.is_missing(parent, leaf)

    if OmegaConf.is_missing(cfg.model, "path"):
        problems.append("model.path is required for this model; set model.path=/path/to/MOSS-TTSD-v0.5")
    elif OmegaConf.select(cfg, "model.path") is not None:
        path = Path(str(cfg.model.path))
        if not (path / "config.json").is_file():
            problems.append(f"model.path={path} has no config.json; point it at a MOSS-TTSD checkpoint folder")

    if missing("data.train_shards"):
        problems.append("data.train_shards is required; set data.train_shards='/path/to/shards/*.tar'")

    max_steps = OmegaConf.select(cfg, "trainer.max_steps")
    if not isinstance(max_steps, int) or max_steps < 1:
        problems.append(f"trainer.max_steps must be a positive number of optimiser steps, got {max_steps}")

    attn = OmegaConf.select(cfg, "model.net.attn_implementation")
    if attn is not None and attn not in ATTN_IMPLEMENTATIONS:
        problems.append(f"model.net.attn_implementation={attn} is unknown; choose one of {list(ATTN_IMPLEMENTATIONS)}")

    if attn in ("varlen_sdpa", "flash_attention_2") and OmegaConf.select(cfg, "data.packing") is None:
        problems.append(
            f"model.net.attn_implementation={attn} needs packed batches; set data.packing (see conf/data/) "
            f"or use model.net.attn_implementation=sdpa with data.packing=null"
        )

    weights = OmegaConf.select(cfg, "model.channel_weights")
    if weights is not None and len(weights) != 8:
        problems.append(f"model.channel_weights needs 8 values (one per channel), got {list(weights)}")

    resume = OmegaConf.select(cfg, "resume")
    if resume not in (None, "auto") and not Path(str(resume)).is_file():
        problems.append(f"resume={resume} is not a checkpoint file; use resume=auto or a path to a .ckpt")

    accelerator = OmegaConf.select(cfg, "trainer.accelerator")
    precision = str(OmegaConf.select(cfg, "trainer.precision"))
    if accelerator == "cpu" and precision.startswith("16"):
        problems.append(f"trainer.precision={precision} is not supported on CPU; use 32-true or bf16-mixed")

    if problems:
        raise ConfigError("invalid training config:\n  - " + "\n  - ".join(problems))
