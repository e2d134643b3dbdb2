"""Full fine-tuning keeps updates smaller than bf16 can represent: fp32 master weights, bf16 compute."""

import torch

from moss.model import MossTTSD, MossTTSDConfig
from moss.model.lora import unwrap
from tests.conftest import compose_train
from train import train


def changed_fraction(tmp_path, dtype: str) -> float:
    """Share of one decoder layer's weights that two AdamW steps at the full-FT rate (1e-5) changed."""
    cfg = compose_train(
        tmp_path / dtype,
        [
            f"model.net.dtype={dtype}",
            "trainer.precision=bf16-mixed",
            "trainer.max_steps=2",
            "trainer.val_check_interval=1000",
            "model.optimizer.lr=1e-5",
            "model.scheduler=null",  # no warm-up: the first step already moves every weight by about lr
            "export.enabled=false",
            "data.num_workers=0",
        ],
    )
    module = train(cfg)["module"]
    before = MossTTSD.from_config(MossTTSDConfig.tiny(), seed=cfg.seed).model.language_model.layers[0]
    after = unwrap(module.model).model.language_model.layers[0]
    weight = after.mlp.up_proj.weight
    assert weight.dtype == getattr(torch, dtype)
    return (weight.float() != before.mlp.up_proj.weight.to(weight.dtype).float()).float().mean().item()


def test_fp32_master_weights_keep_updates_that_bf16_rounds_away(tmp_path):
    # Weights of ~0.02 have a bf16 spacing of ~8e-5: an update of 1e-5 is lost unless the master copy is fp32
    # (in bf16 only weights near zero, where the spacing is finer, move: about 15 % here).
    assert changed_fraction(tmp_path, "float32") > 0.9
    assert changed_fraction(tmp_path, "bfloat16") < 0.3
