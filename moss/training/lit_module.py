"""MossTTSDLitModule: the training system (model + LoRA + loss weights + optimiser + logging), kept thin.

The model is built in `configure_model` from an injected factory, so sharded strategies can build it on
the right device; the loss lives in `moss.model.loss`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from moss.model import MossTTSD, MossTTSDConfig
from moss.model.lora import apply_lora, unwrap

FINETUNE_CHANNEL_WEIGHTS = (8, 2, 1, 1, 1, 1, 1, 1)


class MossTTSDLitModule(L.LightningModule):
    """Fine-tunes MOSS-TTSD with LoRA (`peft` given) or fully (`peft=None`).

    Args:
        config: the architecture (also tells the data module the speech offset and channel count).
        net: factory `net(config=...) -> MossTTSD`, e.g. a `_partial_` of `MossTTSD.from_pretrained`.
        optimizer: factory `optimizer(params) -> Optimizer`.
        scheduler: factory `scheduler(optimizer, total_steps=...)`, stepped every optimiser step.
        peft: keyword arguments of `moss.model.lora.apply_lora`, or None for full fine-tuning.
        channel_weights: loss weight per channel, normalised to sum 1.
        gradient_checkpointing: non-reentrant activation checkpointing of the decoder layers.
        ce_chunk_rows: rows per logits chunk in the loss.
        path: the checkpoint folder `net` loads (recorded in the hyperparameters for provenance).
    """

    def __init__(
        self,
        config: MossTTSDConfig,
        net: Callable[..., MossTTSD],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable | None = None,
        peft: dict | None = None,
        channel_weights: Sequence[float] = FINETUNE_CHANNEL_WEIGHTS,
        gradient_checkpointing: bool = False,
        ce_chunk_rows: int = 1024,
        path: str | None = None,
    ):
        super().__init__()
        # Plain containers only: Lightning checkpoints are read back with torch.load(weights_only=True).
        peft = OmegaConf.to_container(peft, resolve=True) if isinstance(peft, DictConfig) else peft
        channel_weights = [float(w) for w in channel_weights]
        self.save_hyperparameters(ignore=["config", "net", "optimizer", "scheduler"], logger=False)
        self.config = config
        self.net_factory, self.optimizer_factory, self.scheduler_factory = net, optimizer, scheduler
        self.model: torch.nn.Module | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = self.net_factory(config=self.config)
        model.set_channel_weights(self.hparams.channel_weights)
        model.ce_chunk_rows = self.hparams.ce_chunk_rows
        # The Qwen3 token table is never used (inputs arrive as summed channel embeddings): keep it out of
        # the optimiser and out of DDP's gradient buckets.
        model.model.language_model.embed_tokens.requires_grad_(False)
        if self.hparams.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.model = apply_lora(model, **self.hparams.peft) if self.hparams.peft else model

    @property
    def moss(self) -> MossTTSD:
        """The underlying MossTTSD (unwrapped from peft)."""
        return unwrap(self.model)

    def forward(self, batch: dict):
        return self.model(
            batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            labels=batch["labels"],
        )

    def _log_losses(self, stage: str, out, batch_size: int) -> None:
        metrics = {f"{stage}/loss_ch{c}": loss for c, loss in enumerate(out.channel_losses.detach())}
        self.log_dict(metrics, batch_size=batch_size, sync_dist=stage == "val")
        self.log(f"{stage}/loss", out.loss.detach(), prog_bar=True, batch_size=batch_size, sync_dist=stage == "val")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self(batch)
        self._log_losses("train", out, batch["input_ids"].shape[0])
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
        return out.loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._log_losses("val", self(batch), batch["input_ids"].shape[0])

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # One norm computation serves both clipping and the `train/grad_norm` metric (pre-clip norm).
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        max_norm = float(gradient_clip_val) if gradient_clip_val else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.log("train/grad_norm", norm, batch_size=1)

    def configure_optimizers(self):
        params = [p for p in self.trainer.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        total = self.trainer.max_steps
        if total is None or total < 1:
            raise ValueError("the LR schedule needs trainer.max_steps (optimiser steps), e.g. trainer.max_steps=10000")
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
