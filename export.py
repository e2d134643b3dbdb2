"""Export a checkpoint as a merged HF-format folder (config.json + safetensors + tokenizer).

Usage: python export.py checkpoint=runs/<name>/checkpoints/last.ckpt output_dir=exported/ [layout=moss_ttsd]
(see conf/export.yaml). Takes a run's Lightning `.ckpt`, a LoRA adapter folder or an HF folder.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from moss.cli import command, run
from moss.training.export import export_checkpoint


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
@command
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    sampling = OmegaConf.to_container(cfg.sampling) if cfg.sampling is not None else None
    path = export_checkpoint(
        cfg.checkpoint, cfg.output_dir, cfg.layout, cfg.base_model, cfg.tokenizer, sampling, overwrite=cfg.overwrite
    )
    print(f"exported {cfg.checkpoint} to {path}")


if __name__ == "__main__":
    run(main, Path(__file__).parent / "conf", "export")
