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
from moss.model.loss import finetune_channel_weights, normalized_weights
from moss.training import run_checkpoint as ckpt
from moss.training.model_setup import training_model
from moss.training.objective import SetLoss, StepLoss, host_metrics, is_log_step
from moss.training.sharding import is_sharded, shard_model


class MossTTSDLitModule(L.LightningModule):
    """Fine-tunes MOSS-TTSD with LoRA (`peft` given) or fully (`peft=None`).

    Args:
        config: the architecture (also tells the data module the speech offset and channel count).
        net: factory `net(config=...) -> MossTTSD`, e.g. a `_partial_` of `MossTTSD.from_pretrained`.
        optimizer: factory `optimizer(params) -> Optimizer`.
        scheduler: factory `scheduler(optimizer, total_steps=...)`, stepped every optimiser step.
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
        peft: dict | None = None,
        channel_weights: Sequence[float] | None = None,
        gradient_checkpointing: bool | str = False,
        speedups: dict | None = None,
        ce_chunk_rows: int | None = None,
        path: str | None = None,
        adapter_only_checkpoints: bool = True,
    ):
        super().__init__()
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

    def forward(self, batch: dict):
        return self.model(**model_inputs(batch))

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        """Move the batch, except what the model reads on the host (`HOST_KEYS`): reading those back would sync."""
        host = {key: batch.pop(key) for key in HOST_KEYS if key in batch}
        batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        batch.update(host)
        return batch

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """This micro-batch's share of the step loss `sum_c w_c * CE_sum_c(step) / N_c(step)` (`StepLoss`).

        Lightning divides by `accumulate_grad_batches` and DDP averages over ranks; the returned scale undoes
        both, so the step's gradient is exactly that of the step loss however the step is split.
        """
        out = self(batch)
        accumulate = self.trainer.accumulate_grad_batches
        if batch_idx % accumulate == 0 or self.step_loss.counts is None:
            counts = batch.get("step_label_counts", out.channel_label_counts)
            self.step_loss.start(counts.to(out.channel_loss_sums.device, non_blocking=True), self._reduce)
        return self.step_loss(out.channel_loss_sums) * accumulate * self.trainer.world_size

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
        if checkpoint.get(ckpt.ADAPTER_ONLY):
            ckpt.check_trainable(checkpoint, ckpt.trainable_keys(self.model))
            self.strict_loading = False  # the frozen base comes from `net`, not from the checkpoint

    def _reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    def _log_metrics(self, metrics: dict) -> None:
        loss_key = next(iter(metrics))
        self.log(loss_key, metrics.pop(loss_key), prog_bar=True, batch_size=1)
        self.log_dict(metrics, batch_size=1)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Runs after the step's last backward: one norm computation serves clipping and `train/grad_norm`
        # (pre-clip), and on logging steps the step's metrics are read back together.
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        max_norm = float(gradient_clip_val) if gradient_clip_val else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if is_log_step(self.trainer) and (result := self.step_loss.result(self._reduce)) is not None:
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a replicated DTensor
            self._log_metrics(host_metrics("train", *result, **{"train/grad_norm": norm}))
            self.log("train/lr", torch.tensor(float(optimizer.param_groups[0]["lr"])), batch_size=1)

    def configure_optimizers(self):
        params = [p for p in self.trainer.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=self.trainer.max_steps)  # never a loader length
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
