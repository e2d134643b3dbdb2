"""Learning-rate schedule: linear warm-up then cosine decay, sized by the number of optimiser steps.

The schedule itself is transformers' (`cosine` with an optional floor), as the original used; this adapter
only turns the config's ratios into steps. The length comes from `trainer.max_steps`, never from a
dataloader length (streams have none, and Lightning's `estimated_stepping_batches` breaks stateful-loader
resume, pitfall P8).
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from moss.settings import NonNegative, Positive, Probability, Size


def adamw(
    params,
    lr: Positive = 1e-3,
    betas: tuple[Probability, Probability] = (0.9, 0.999),
    eps: Positive = 1e-8,
    weight_decay: NonNegative = 0.0,
    **options,
) -> torch.optim.AdamW:
    """Torch's AdamW, with the limits of its settings declared for the config check (`optim.optimizer.*`)."""
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **options)


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int,
    warmup_ratio: Probability = 0.1,
    warmup_steps: Size | None = None,
    min_lr_ratio: Probability = 0.0,
) -> LambdaLR:
    """Linear warm-up, then cosine decay to `min_lr_ratio * lr` at `total_steps`.

    Warm-up lasts `warmup_steps` (default `ceil(warmup_ratio * total_steps)`, as transformers' Trainer rounds).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}; set trainer.max_steps")
    warmup = math.ceil(warmup_ratio * total_steps) if warmup_steps is None else int(warmup_steps)
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup, num_training_steps=total_steps, min_lr_rate=min_lr_ratio
    )
