"""MossTTSDLitModule: the training system (model + LoRA + loss weights + optimiser + logging), kept thin.

The model is built in `configure_model` from an injected factory, so sharded strategies can build it on
the right device; the loss lives in `moss.model.loss`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from moss.data.collate import HOST_KEYS, model_inputs
from moss.model import MossTTSD, MossTTSDConfig
from moss.model.lora import apply_lora, unwrap
from moss.model.loss import weighted_loss
from moss.training.export import BASE_KEY, describe_base
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
        self.base = describe_base(net, config)
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
        return self.model(**model_inputs(batch))

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        """Move the batch, except what the model reads on the host (`HOST_KEYS`): reading those back would sync."""
        host = {key: batch.pop(key) for key in HOST_KEYS if key in batch}
        batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        batch.update(host)
        return batch

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
            local = local.to(out.channel_loss_sums.device, non_blocking=True)
            self._step_counts = self.trainer.strategy.reduce(local, reduce_op="sum")
            self._window_sums = torch.zeros_like(out.channel_loss_sums)
        loss, _ = weighted_loss(out.channel_loss_sums, self._step_counts, self.moss._normalized_weights)
        self._window_sums += out.channel_loss_sums.detach()
        return loss * accumulate * self.trainer.world_size

    def _is_log_step(self) -> bool:
        """Steps whose metrics are read back to the host: first, every `log_every_n_steps` (as loggers write), last."""
        step, trainer = self.trainer.global_step, self.trainer
        return step == 0 or (step + 1) % trainer.log_every_n_steps == 0 or step + 1 >= (trainer.max_steps or 0)

    def _log_losses(self, stage: str, loss: torch.Tensor, channel_losses: torch.Tensor, **extra: torch.Tensor) -> None:
        """Log one stage's losses (and `extra` scalars) from one device-to-host copy.

        Lightning reads every progress-bar value back on every batch; values logged from the host cost nothing
        there, so a step's metrics cross to the host once, here, instead of once per metric and batch.
        """
        values = torch.cat([loss.reshape(1), channel_losses, *(v.reshape(1).float() for v in extra.values())])
        values = values.detach().cpu()
        metrics = {f"{stage}/loss_ch{c}": values[1 + c] for c in range(len(channel_losses))}
        metrics.update({key: values[1 + len(channel_losses) + i] for i, key in enumerate(extra)})
        self.log_dict(metrics, batch_size=1)
        self.log(f"{stage}/loss", values[0], prog_bar=True, batch_size=1)

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
        """Validation loss over the whole set: summed CE / label counts over every batch and rank.

        A rank whose readers had no shard (more ranks than validation shards) adds zeros: every rank joins the
        same reductions, so validation never waits on a rank that skipped it.
        """
        if self._val_sums is None:
            channels = self.moss.config.channels
            self._val_sums = torch.zeros(channels, device=self.device)
            self._val_counts = torch.zeros(channels, dtype=torch.long, device=self.device)
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        counts = self.trainer.strategy.reduce(self._val_counts, reduce_op="sum")
        if int(counts.sum()) == 0:
            return  # no rank had a validation sample
        loss, channel = weighted_loss(sums, counts, self.moss._normalized_weights)
        self._log_losses("val", loss, channel)

    def _trainable_keys(self) -> set[str]:
        return {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[BASE_KEY] = self.base
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
        # Runs after the step's last backward: one norm computation serves clipping and `train/grad_norm`
        # (pre-clip), and on logging steps the step's metrics are read back together.
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        max_norm = float(gradient_clip_val) if gradient_clip_val else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if not self._is_log_step() or self._window_sums is None:
            return
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a replicated DTensor
        sums = self.trainer.strategy.reduce(self._window_sums, reduce_op="sum")
        loss, channel = weighted_loss(sums, self._step_counts, self.moss._normalized_weights)
        self._log_losses("train", loss, channel, **{"train/grad_norm": norm})
        self.log("train/lr", torch.tensor(float(optimizer.param_groups[0]["lr"])), batch_size=1)

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
