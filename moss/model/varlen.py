"""`varlen_sdpa`: packed-sequence attention from PyTorch's own SDPA kernels, no flash-attn package needed.

With packed micro-batches, `sdpa` and `eager` isolate samples through a dense block-diagonal mask: correct,
but every row still attends over the whole pack (cost ~ L^2) and the mask disables the fused causal kernels.
This implementation takes the pack's sample boundaries (`varlen_bounds`, cumulative row offsets over the
flattened `[B * L]` rows, from the collator's `cu_seqlens`) and runs causal SDPA on each sample separately
(cost ~ sum of s_i^2), using the fastest backend PyTorch has for the device (its built-in flash kernel on
CUDA, the fused CPU kernel on CPU).

It is registered with transformers' `AttentionInterface`; transformers builds no mask for it. It refuses
2-D masks and KV caches, so it is for training on packed batches only (use `sdpa` for generation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "varlen_sdpa"


def varlen_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    varlen_bounds: list[int] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each segment. query `[B, H, T, D]`, key/value `[B, H_kv, T, D]` -> `[B, T, H, D]`.

    Without `varlen_bounds`, every row is one sequence (an unpadded, unpacked batch).

    Raises:
        ValueError: with an attention mask or mismatched query/key lengths (a cache).
    """
    batch, heads, length, dim = query.shape
    if varlen_bounds is None:
        varlen_bounds = list(range(0, batch * length + 1, length))
    if attention_mask is not None or key.shape[2] != length:
        raise ValueError(
            "varlen_sdpa attention runs on packed training batches only (sample boundaries, no mask, no cache); "
            "use model.net.attn_implementation=sdpa for padded batches or generation"
        )
    gqa = heads != key.shape[1]
    q = query.transpose(0, 1).reshape(1, heads, batch * length, dim)
    k = key.transpose(0, 1).reshape(1, key.shape[1], batch * length, dim)
    v = value.transpose(0, 1).reshape(1, value.shape[1], batch * length, dim)
    pieces = [
        F.scaled_dot_product_attention(
            q[:, :, start:end],
            k[:, :, start:end],
            v[:, :, start:end],
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
            enable_gqa=gqa,
        )
        for start, end in zip(varlen_bounds[:-1], varlen_bounds[1:], strict=True)
        if end > start
    ]
    out = torch.cat(pieces, dim=2).reshape(heads, batch, length, dim)
    return out.permute(1, 2, 0, 3).contiguous(), None


AttentionInterface.register(NAME, varlen_sdpa_attention)
