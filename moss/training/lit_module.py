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
from moss.model.loss import weighted_loss
from moss.training.sharding import is_sharded, shard_model

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
        adapter_only_checkpoints: with LoRA, Lightning checkpoints hold only the trainable weights (tens of MB
            instead of the 4 GB base); resuming rebuilds the base from `net` first. Not used under FSDP.
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
        adapter_only_checkpoints: bool = True,
    ):
        super().__init__()
        # Plain containers only: Lightning checkpoints are read back with torch.load(weights_only=True).
        peft = OmegaConf.to_container(peft, resolve=True) if isinstance(peft, DictConfig) else peft
        channel_weights = [float(w) for w in channel_weights]
        self.save_hyperparameters(ignore=["config", "net", "optimizer", "scheduler"], logger=False)
        self.config = config
        self.net_factory, self.optimizer_factory, self.scheduler_factory = net, optimizer, scheduler
        self.model: torch.nn.Module | None = None
        self._step_counts: torch.Tensor | None = None
        self._window_sums: torch.Tensor | None = None
        self._val_sums: torch.Tensor | None = None
        self._val_counts: torch.Tensor | None = None

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
        model = apply_lora(model, **self.hparams.peft) if self.hparams.peft else model
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over the data-parallel dimension
            model = shard_model(model, self.device_mesh["data_parallel"])
        self.model = model

    @property
    def moss(self) -> MossTTSD:
        """The underlying MossTTSD (unwrapped from peft)."""
        return unwrap(self.model)

    def forward(self, batch: dict):
        kwargs = {}
        input_ids, labels, position_ids = batch["input_ids"], batch["labels"], batch.get("position_ids")
        attn = self.moss.attn_implementation
        if attn == "varlen_sdpa":
            if "cu_seqlens" not in batch:
                raise ValueError("attn_implementation=varlen_sdpa needs packed batches: set data.packing (or use sdpa)")
            kwargs = {"varlen_bounds": batch["cu_seqlens"].tolist()}
        elif "cu_seqlens" in batch and attn == "flash_attention_2":
            # Varlen kernels take explicit boundaries over one flattened row (pitfall P2: never inferred).
            input_ids, labels = input_ids.reshape(1, -1, input_ids.shape[-1]), labels.reshape(1, -1, labels.shape[-1])
            position_ids = position_ids.reshape(1, -1)
            cu = batch["cu_seqlens"]
            kwargs = dict(
                cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch["max_seqlen"], max_length_k=batch["max_seqlen"]
            )
        return self.model(
            input_ids,
            attention_mask=batch.get("attention_mask"),
            position_ids=position_ids,
            labels=labels,
            use_cache=False,  # with a cache, transformers would let packed samples attend to each other
            **kwargs,
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Loss of this micro-batch, normalised by the label counts of the whole optimiser step.

        Each channel's summed CE is divided by its valid-label count over all micro-batches of the step and
        all ranks (DESIGN invariant 3). Lightning divides by `accumulate_grad_batches` and DDP averages over
        ranks; both are undone by the returned scale, so the step's gradient is exactly that of
        `sum_c w_c * CE_sum_c(step) / N_c(step)`, however the step is split.
        """
        out = self(batch)
        accumulate, first = self.trainer.accumulate_grad_batches, batch_idx % self.trainer.accumulate_grad_batches
        if first == 0 or self._step_counts is None:
            local = batch.get("step_label_counts", out.channel_label_counts)
            self._step_counts = self.trainer.strategy.reduce(local.to(out.channel_loss_sums.device), reduce_op="sum")
            self._window_sums = torch.zeros_like(out.channel_loss_sums)
        weights = self.moss._normalized_weights
        loss, _ = weighted_loss(out.channel_loss_sums, self._step_counts, weights)
        self._window_sums += out.channel_loss_sums.detach()
        if first == accumulate - 1:
            step_loss, channel = weighted_loss(
                self.trainer.strategy.reduce(self._window_sums, reduce_op="sum"), self._step_counts, weights
            )
            self._log_losses("train", channel, step_loss)
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
        return loss * accumulate * self.trainer.world_size

    def _log_losses(self, stage: str, channel_losses: torch.Tensor, loss: torch.Tensor) -> None:
        metrics = {f"{stage}/loss_ch{c}": value for c, value in enumerate(channel_losses)}
        self.log_dict(metrics, batch_size=1)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=1)

    def on_validation_epoch_start(self) -> None:
        self._val_sums, self._val_counts = None, None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self(batch)
        if self._val_sums is None:
            self._val_sums, self._val_counts = (
                torch.zeros_like(out.channel_loss_sums),
                torch.zeros_like(out.channel_label_counts),
            )
        self._val_sums += out.channel_loss_sums
        self._val_counts += out.channel_label_counts

    def on_validation_epoch_end(self) -> None:
        """Validation loss over the whole set: summed CE / label counts over every batch and rank."""
        if self._val_sums is None:
            return
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        counts = self.trainer.strategy.reduce(self._val_counts, reduce_op="sum")
        loss, channel = weighted_loss(sums, counts, self.moss._normalized_weights)
        self._log_losses("val", channel, loss)

    def _trainable_keys(self) -> set[str]:
        return {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.hparams.peft and self.hparams.adapter_only_checkpoints and not is_sharded(self.model):
            keep = self._trainable_keys()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
            checkpoint["adapter_only"] = True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if not checkpoint.get("adapter_only"):
            return
        missing = self._trainable_keys() - set(checkpoint["state_dict"])
        if missing:
            raise KeyError(
                f"adapter-only checkpoint lacks trainable weights {sorted(missing)[:5]} ({len(missing)}); "
                f"was it written with the same peft settings?"
            )
        self.strict_loading = False  # the frozen base comes from `net`, not from the checkpoint

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
