"""`varlen_sdpa`: packed-sequence attention from PyTorch's own kernels, no flash-attn package needed.

With packed micro-batches, `sdpa` and `eager` isolate samples through a dense block-diagonal mask: correct,
but every row still attends over the whole pack (cost ~ L^2) and the mask disables the fused causal kernels.
This implementation takes the pack's sample boundaries (`cu_seqlens`: cumulative row offsets over the
flattened `[B * L]` rows, as the collator writes them) and attends causally within each sample only
(cost ~ sum of s_i^2):

* on CUDA in bf16/fp16 (torch >= 2.10): one `torch.nn.attention.varlen.varlen_attn` call per layer over
  the whole pack (PyTorch's flash varlen kernel);
* elsewhere (CPU, float32, an older torch): causal SDPA per sample, from host-side boundaries; inside a
  compiled layer (`moss.model.speedups`), one SDPA call with a block-diagonal mask from device boundaries.

`MossTTSD.forward(..., cu_seqlens=, max_seqlen=)` turns the boundaries into the keyword arguments below once
per forward pass (a device copy for the kernel, a host list for the loop), so no layer syncs the device.
It is registered with transformers' `AttentionInterface` and has no mask function, so transformers builds no
mask for it. It refuses masks and KV caches: it is for training and scoring packed batches (use `sdpa` to
generate).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

try:  # torch >= 2.10, CUDA only
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch
    varlen_attn = None

# Backend: torch 2.11-2.13 always run varlen_attn on flash; torch 2.14 may pick cuDNN on Hopper/Blackwell,
# but never for causal (window) or grouped calls, which ours are. So no backend choice is made here.
NAME = "varlen_sdpa"
# torch >= 2.12 takes `enable_gqa`; torch 2.10/2.11 pass the heads to the flash kernel unchecked, and the flash
# kernel (forward and backward) reads grouped key/value heads natively: they are never repeated.
_NATIVE_GQA = varlen_attn is not None and "enable_gqa" in inspect.signature(varlen_attn).parameters
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def uses_varlen_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether attention on this device and dtype runs the one-call varlen kernel (else the per-sample loop)."""
    return varlen_attn is not None and device.type == "cuda" and dtype in _KERNEL_DTYPES


def varlen_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    varlen_bounds: list[int] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each segment. query `[B, H, T, D]`, key/value `[B, H_kv, T, D]` -> `[B, T, H, D]`.

    Args:
        module: the attention layer (unused; transformers' interface).
        query: `[B, H, T, D]`.
        key: `[B, H_kv, T, D]`.
        value: `[B, H_kv, T, D]`.
        attention_mask: must be None.
        dropout: attention dropout probability (0 in training MOSS-TTSD).
        scaling: softmax scale (None: 1/sqrt(D)).
        cu_seq_lens_q: int32 segment offsets over the `B * T` rows, on the attention's device (kernel path).
        max_length_q: longest segment (kernel path).
        varlen_bounds: the same offsets as a host list (per-sample path).
        **kwargs: other transformers attention arguments (ignored).

    Without boundaries, every row of the batch is one sequence (an unpadded, unpacked batch).

    Raises:
        ValueError: with an attention mask or mismatched query/key lengths (a cache).
    """
    batch, heads, length, dim = query.shape
    if attention_mask is not None or key.shape[2] != length:
        raise ValueError(
            "varlen_sdpa attention runs on packed training batches only (sample boundaries, no mask, no cache); "
            "use model.net.attn_implementation=sdpa for padded batches or generation"
        )
    if cu_seq_lens_q is None:  # every row of the batch is one sequence
        varlen_bounds = list(range(0, batch * length + 1, length))
        cu_seq_lens_q = torch.tensor(varlen_bounds, dtype=torch.int32).to(query.device, non_blocking=True)
        max_length_q = length
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    if uses_varlen_kernel(query.device, dtype) and dropout == 0.0:
        return _varlen_kernel(query.to(dtype), key.to(dtype), value.to(dtype), cu_seq_lens_q, max_length_q, scaling)
    if torch.compiler.is_compiling():
        return _masked_sdpa(query, key, value, cu_seq_lens_q, dropout, scaling)
    bounds = varlen_bounds if varlen_bounds is not None else cu_seq_lens_q.tolist()
    return _per_sample_sdpa(query, key, value, bounds, dropout, scaling)


def _varlen_kernel(query, key, value, cu_seqlens, max_seqlen, scaling) -> tuple[torch.Tensor, None]:
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, kv_heads, dim)
    v = value.transpose(1, 2).reshape(batch * length, kv_heads, dim)
    extra = {"enable_gqa": True} if kv_heads != heads and _NATIVE_GQA else {}
    out = varlen_attn(
        q, k, v, cu_seqlens, cu_seqlens, int(max_seqlen), int(max_seqlen), scale=scaling, window_size=(-1, 0), **extra
    )
    return out.reshape(batch, length, heads, dim), None


def _per_sample_sdpa(query, key, value, bounds: list[int], dropout: float, scaling) -> tuple[torch.Tensor, None]:
    batch, heads, length, dim = query.shape
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
        for start, end in zip(bounds[:-1], bounds[1:], strict=True)
        if end > start
    ]
    out = torch.cat(pieces, dim=2).reshape(heads, batch, length, dim)
    return out.permute(1, 2, 0, 3).contiguous(), None


def boundary_kwargs(attn: str, cu_seqlens, max_seqlen: int | None, length: int, bucket: int, device) -> dict:
    """A packed batch's boundaries as attention implementation `attn` takes them, with no device-to-host read.

    `cu_seqlens` (host or device) counts rows over the flattened `[B * length]`; `bucket` > 0 pads it to a
    multiple of `bucket` segments with `max_seqlen` = `length` (static shapes, `moss.model.speedups`); the
    kernel's copy goes to `device`.
    """
    if attn not in (NAME, "flash_attention_2"):
        return {}  # sdpa / eager / flex_attention: transformers isolates segments from the restarting position_ids
    if bucket:  # no segment crosses a pack row, so the row length bounds every segment
        cu_seqlens, max_seqlen = pad_boundaries(cu_seqlens, bucket), length
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # a device sync unless cu_seqlens is on the host
    cu = cu_seqlens.to(device=device, dtype=torch.int32, non_blocking=True)
    if attn == "flash_attention_2":
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_seqlen, "max_length_k": max_seqlen}
    kwargs = {"cu_seq_lens_q": cu, "max_length_q": int(max_seqlen)}
    if cu_seqlens.device.type == "cpu":
        kwargs["varlen_bounds"] = cu_seqlens.tolist()  # for the per-sample loop (CPU, float32): no device read
    return kwargs


def pad_boundaries(cu_seqlens: torch.Tensor, bucket: int) -> torch.Tensor:
    """`cu_seqlens` with empty segments appended, up to a multiple of `bucket` segments (+1 offsets).

    An empty segment (two equal offsets) holds no row: every attention implementation gives the same output.
    """
    segments = cu_seqlens.numel() - 1
    padded = -(-max(segments, 1) // bucket) * bucket
    if padded == segments:
        return cu_seqlens
    return torch.cat([cu_seqlens, cu_seqlens[-1:].expand(padded - segments)])


def _masked_sdpa(query, key, value, cu_seqlens: torch.Tensor, dropout: float, scaling) -> tuple[torch.Tensor, None]:
    """One SDPA call over all rows with a block-diagonal causal mask built from device boundaries.

    Quadratic in the pack length, but shape-static: it is what a compiled layer runs off the varlen kernel
    (the per-sample loop reads host boundaries, which a compiled graph would specialise on, pack by pack).
    """
    batch, heads, length, dim = query.shape
    rows = torch.arange(batch * length, device=query.device, dtype=cu_seqlens.dtype)
    segment = torch.searchsorted(cu_seqlens[1:].contiguous(), rows, right=True)
    mask = (segment[:, None] == segment[None, :]) & (rows[:, None] >= rows[None, :])
    q = query.transpose(0, 1).reshape(1, heads, batch * length, dim)
    k = key.transpose(0, 1).reshape(1, key.shape[1], batch * length, dim)
    v = value.transpose(0, 1).reshape(1, value.shape[1], batch * length, dim)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=heads != key.shape[1]
    )
    return out.reshape(heads, batch, length, dim).permute(1, 2, 0, 3).contiguous(), None


AttentionInterface.register(NAME, varlen_sdpa_attention)
