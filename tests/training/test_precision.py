"""Full fine-tuning keeps updates smaller than bf16 can represent: fp32 master weights, bf16 compute."""

import lightning as L
import torch

from moss.model import MossTTSD, MossTTSDConfig
from moss.model.lora import unwrap
from tests.conftest import compose_train
from train import train


class MatmulDtypes(L.Callback):
    """Records the dtype a decoder layer's matmul really computed in, during training steps."""

    def on_train_start(self, trainer, pl_module):
        self.seen = set()
        layer = unwrap(pl_module.model).decoder_layers()[0]
        layer.mlp.up_proj.register_forward_hook(lambda module, args, out: self.seen.add(out.dtype))


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
            "trainer.log_every_n_steps=1",
            "+callbacks.dtypes={_target_: tests.training.test_precision.MatmulDtypes}",
        ],
    )
    result = train(cfg)
    module = result["module"]
    probe = next(c for c in result["trainer"].callbacks if type(c).__name__ == "MatmulDtypes")
    assert probe.seen == {torch.bfloat16}  # bf16-mixed: the matmuls ran in bf16 whatever the weights' dtype
    assert torch.isfinite(result["trainer"].callback_metrics["train/loss"])
    before = MossTTSD.from_config(MossTTSDConfig.tiny(), seed=cfg.seed).model.language_model.layers[0]
    after = unwrap(module.model).decoder_layers()[0]
    weight = after.mlp.up_proj.weight
    assert weight.dtype == getattr(torch, dtype)
    return (weight.float() != before.mlp.up_proj.weight.to(weight.dtype).float()).float().mean().item()


def test_fp32_master_weights_keep_updates_that_bf16_rounds_away(tmp_path):
    # Weights of ~0.02 have a bf16 spacing of ~8e-5: an update of 1e-5 is lost unless the master copy is fp32
    # (in bf16 only weights near zero, where the spacing is finer, move: about 15 % here).
    assert changed_fraction(tmp_path, "float32") > 0.9
    assert changed_fraction(tmp_path, "bfloat16") < 0.3
