"""MossTTSDLitModule: the training system (model + LoRA + loss weights + optimiser + logging), kept thin.

The model is built in `configure_model` from an injected factory, so sharded strategies can build it on
the right device; the loss lives in `moss.model.loss`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from moss.data.batch import PackedBatch, StepBatch
from moss.model import MossTTSD, MossTTSDConfig
from moss.model.lora import apply_lora
from moss.model.loss import DEFAULT_CHUNK_ROWS, finetune_channel_weights, normalized_weights
from moss.model.speedups import Speedups, apply_speedups
from moss.settings import Count, NonNegative, Positive
from moss.training import run_checkpoint as ckpt
from moss.training.objective import SetLoss, StepLoss, host_metrics, is_log_step
from moss.training.sharding import is_sharded, shard_model


class MossTTSDLitModule(L.LightningModule):
    """Fine-tunes MOSS-TTSD with LoRA (`peft` given) or fully (`peft=None`).

    Args:
        config: the architecture (also tells the data module the speech offset and channel count).
        net: factory `net(config=...) -> MossTTSD`, e.g. a `_partial_` of `MossTTSD.from_pretrained`.
        optimizer: factory `optimizer(params) -> Optimizer`.
        scheduler: factory `scheduler(optimizer, total_steps=...)`, stepped every optimiser step.
        gradient_clip_val: the gradients' total norm is clipped to this before each step (None: not clipped).
        peft: keyword arguments of `moss.model.lora.apply_lora`, or None for full fine-tuning.
        channel_weights: loss weight per channel, normalised to sum 1; None: the original's fine-tuning weights.
        gradient_checkpointing: checkpointing of the decoder layers: false, true (= full) or selective.
        speedups: switches of `moss.model.speedups.apply_speedups` (liger, compile, static_varlen, varlen_bucket).
        ce_chunk_rows: rows per logits chunk in the loss (None: `DEFAULT_CHUNK_ROWS`).
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
        gradient_clip_val: Positive | None = None,
        peft: dict | None = None,
        channel_weights: Sequence[NonNegative] | None = None,
        gradient_checkpointing: bool | Literal["full", "selective"] = False,
        speedups: Speedups | None = None,
        ce_chunk_rows: Count | None = None,
        path: str | None = None,
        adapter_only_checkpoints: bool = True,
    ):
        super().__init__()
        self.automatic_optimization = False  # the whole optimiser step is `training_step`
        # Plain containers only: Lightning checkpoints are read back with torch.load(weights_only=True).
        peft, speedups = (
            OmegaConf.to_container(c, resolve=True) if isinstance(c, DictConfig) else c for c in (peft, speedups)
        )
        if channel_weights is None:
            channel_weights = finetune_channel_weights(config.channels)
        channel_weights = [float(w) for w in channel_weights]
        self.save_hyperparameters(ignore=["config", "net", "optimizer", "scheduler"], logger=False)
        self.config = config
        self.base = ckpt.describe_base(net, config)
        self.net_factory, self.optimizer_factory, self.scheduler_factory = net, optimizer, scheduler
        self.model: torch.nn.Module | None = None
        weights = normalized_weights(channel_weights, config.channels)
        self.step_loss, self.val_loss = StepLoss(weights), SetLoss(weights)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        device = self._trainer.strategy.root_device if self._trainer else self.device
        model = training_model(self.net_factory(config=self.config), self.hparams, device.type)
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over the data-parallel dimension
            model = shard_model(model, self.device_mesh["data_parallel"])
        self.model = model

    def forward(self, batch: PackedBatch):
        return self.model(**batch.model_inputs())

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # The x-axis of every logger is a counter Lightning saves before it counts the step being saved, and on
        # resume it corrects that by one or not depending on where the save happened: resumed runs logged their
        # steps one off. Each training batch here is one optimiser step, so the counter is the global step.
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.trainer.global_step

    def training_step(self, step: StepBatch, batch_idx: int) -> None:
        """One optimiser step: a backward per micro-batch, clipping, the update, the schedule, the metrics.

        Every micro-batch's loss is divided by the label counts of the whole step over all ranks (`StepLoss`),
        so the gradient is that of the step loss however the step is split; gradients cross ranks once, in the
        last backward.
        """
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        counts = step.label_counts.to(self.device, non_blocking=True)
        self.step_loss.start(counts, self._reduce, ranks=self.trainer.world_size)
        for i, micro in enumerate(step.micro):
            with optimizer.toggle_model(sync_grad=i == len(step) - 1):
                self.manual_backward(self.step_loss(self(micro).channel_loss_sums))
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.hparams.gradient_clip_val or float("inf"))
        log_now = is_log_step(self.trainer)  # before the update moves global_step on
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        if log_now and (result := self.step_loss.result(self._reduce)) is not None:
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a replicated DTensor
            self._log_metrics(host_metrics("train", *result, **{"train/grad_norm": norm}))
            self.log("train/lr", torch.tensor(float(optimizer.param_groups[0]["lr"])), batch_size=1)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self(batch)
        self.val_loss.add(out.channel_loss_sums, out.channel_label_counts)

    def on_validation_epoch_end(self) -> None:
        if (result := self.val_loss.result(self._reduce, self.device)) is not None:
            self._log_metrics(host_metrics("val", *result))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[ckpt.BASE_KEY] = self.base
        if self.hparams.peft and self.hparams.adapter_only_checkpoints and not is_sharded(self.model):
            ckpt.keep_only_trainable(checkpoint, ckpt.trainable_keys(self.model))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        ckpt.follow_moved_run(checkpoint, self.trainer.callbacks)  # before the callbacks read their state
        if checkpoint.get(ckpt.ADAPTER_ONLY):
            ckpt.check_trainable(checkpoint, ckpt.trainable_keys(self.model))
            self.strict_loading = False  # the frozen base comes from `net`, not from the checkpoint

    def _reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    def _log_metrics(self, metrics: dict) -> None:
        loss_key = next(iter(metrics))
        self.log(loss_key, metrics.pop(loss_key), prog_bar=True, batch_size=1)
        self.log_dict(metrics, batch_size=1)

    def configure_optimizers(self):
        params = [p for p in self.trainer.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=self.trainer.max_steps)  # never a loader length
        return [optimizer], [scheduler]  # stepped by training_step, once per optimiser step


def training_model(model: MossTTSD, settings: Mapping, device_type: str) -> torch.nn.Module:
    """The net as it trains: loss settings, the frozen token table, checkpointing, speed-ups, then LoRA.

    `settings` are the module's hyperparameters. Returns the model itself, or its peft wrapper when
    `settings["peft"]` asks for LoRA.
    """
    model.set_channel_weights(settings["channel_weights"])
    model.ce_chunk_rows = settings["ce_chunk_rows"] or DEFAULT_CHUNK_ROWS
    model.freeze_unused_token_table()  # out of the optimiser and out of DDP's gradient buckets
    if settings["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(settings["gradient_checkpointing"])
    apply_speedups(model, device_type, **(settings.get("speedups") or {}))
    return apply_lora(model, **settings["peft"]) if settings["peft"] else model
