"""Learning-rate schedule: linear warm-up then cosine decay, computed from the number of optimiser steps.

The length comes from `trainer.max_steps`, never from a dataloader length (streams have none, and
Lightning's `estimated_stepping_batches` breaks stateful-loader resume, pitfall P8).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int,
    warmup_ratio: float = 0.1,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warm-up, then cosine decay to `min_lr_ratio * lr` at `total_steps`.

    Warm-up lasts `warmup_steps` (default `ceil(warmup_ratio * total_steps)`); with `min_lr_ratio=0` this is
    the transformers `cosine` schedule the original used.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}; set trainer.max_steps")
    warmup = math.ceil(warmup_ratio * total_steps) if warmup_steps is None else int(warmup_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
