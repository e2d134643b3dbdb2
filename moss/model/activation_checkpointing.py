"""Which activations a checkpointed decoder layer keeps: all recomputed (`full`) or matmuls kept (`selective`).

Full checkpointing keeps only each layer's input and recomputes its whole forward in the backward pass: one
more forward of the decoder, about a third more compute. `selective` keeps what is expensive to recompute (the
outputs of matrix multiplications and attention) and recomputes only the cheap pointwise work (norms,
activations, casts, RoPE), through PyTorch's selective activation checkpointing: most of full checkpointing's
memory saving on the pointwise tensors, at a fraction of its recompute cost.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

POLICIES = ("full", "selective")
_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def keep_matmuls_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective policy: save the outputs of matmuls and attention kernels, recompute everything else."""
    if op in _MATMULS or "attention" in str(op) or "varlen" in str(op):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_kwargs(policy: str) -> dict:
    """Keyword arguments for `torch.utils.checkpoint.checkpoint` (non-reentrant: safe with DDP and LoRA)."""
    if policy not in POLICIES:
        raise ValueError(f"gradient checkpointing policy {policy!r} is not one of {POLICIES}")
    kwargs: dict = {"use_reentrant": False}
    if policy == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, keep_matmuls_and_attention)
    return kwargs


def checkpointing_policy(setting: bool | str | None) -> str | None:
    """`model.gradient_checkpointing` as a policy name: false/null -> None, true -> full, or the name itself.

    Raises:
        ValueError: a name that is not a policy.
    """
    if setting in (None, False, "false", "none"):
        return None
    policy = "full" if setting in (True, "true") else str(setting)
    if policy not in POLICIES:
        raise ValueError(f"model.gradient_checkpointing={setting} is not one of false, true, {', '.join(POLICIES)}")
    return policy
