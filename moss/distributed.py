"""Where this process stands in a distributed job: the one place that reads rank and world size.

Inside a training job `torch.distributed` is initialised and answers; before that (and in tools that never
initialise it, such as preprocessing under torchrun or SLURM) the launcher's environment does.
"""

from __future__ import annotations

import os

import torch.distributed as dist


def is_initialized() -> bool:
    """True inside an initialised process group (collectives may be called)."""
    return dist.is_available() and dist.is_initialized()


def launcher_rank() -> tuple[int, int, int | None]:
    """(global rank, world size, local rank) set by torchrun or SLURM; (0, 1, None) when run directly."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_NTASKS" in env:
        return int(env.get("SLURM_PROCID", 0)), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, None


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from the process group when there is one, else from torchrun's environment, else (0, 1).

    SLURM's task variables are not used here: a single process started inside a multi-task allocation is
    still one rank.
    """
    if is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
