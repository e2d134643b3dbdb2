"""The net as it trains: loss settings, the frozen token table, checkpointing, speed-ups, then LoRA."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from moss.model import MossTTSD
from moss.model.lora import apply_lora
from moss.model.loss import DEFAULT_CHUNK_ROWS
from moss.model.speedups import apply_speedups


def training_model(model: MossTTSD, settings: Mapping, device_type: str) -> torch.nn.Module:
    """Prepare a freshly built `model` for training with the LitModule's hyperparameters `settings`.

    Returns the model itself, or its peft wrapper when `settings["peft"]` asks for LoRA.
    """
    model.set_channel_weights(settings["channel_weights"])
    model.ce_chunk_rows = settings["ce_chunk_rows"] or DEFAULT_CHUNK_ROWS
    model.freeze_unused_token_table()  # out of the optimiser and out of DDP's gradient buckets
    if settings["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(settings["gradient_checkpointing"])
    apply_speedups(model, device_type, **(settings.get("speedups") or {}))
    return apply_lora(model, **settings["peft"]) if settings["peft"] else model
