"""Per-channel cross-entropy that never materialises a whole sequence's channel-0 logits.

Channel 0 has 152,697 classes: the fp32 logits of one 16k-row pack would take 10 GB, plus as much again for
their gradient. `linear_cross_entropy` computes CE straight from hidden states and the (tied) head weight in
chunks of rows, and recomputes each chunk in backward instead of keeping it, so peak extra memory is one
chunk of logits.

The functions return per-channel *sums* and *counts*, never means: the caller divides by the valid-label
count of a whole optimiser step (all micro-batches and ranks), which is the only normalisation that makes
packing, gradient accumulation and data parallelism give the same gradient (DESIGN invariant 3).

Layout: `labels` are `[B, T, C]` with -100 = ignore, *not* shifted: position t is scored against label t+1,
as the original `ForCausalLMLoss` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
DEFAULT_CHUNK_ROWS = 1024


@dataclass
class ChannelCE:
    """Cross-entropy summed per channel: `sums` [C] float32, `counts` [C] int64 valid targets."""

    sums: torch.Tensor
    counts: torch.Tensor


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token targets: `out[:, t] = labels[:, t + 1]`, last row `ignore_index`. labels `[B, T, C]`."""
    tail = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], tail], dim=1)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_n CE(hidden[n] @ weight.T, target[n]) over rows whose targets are all valid, chunked."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, compute_dtype):
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_rows):
                h = hidden[start : start + chunk_rows].to(compute_dtype)
                logits = (h @ w.T).float()
                t = targets[start : start + chunk_rows]
                total += (torch.logsumexp(logits, dim=-1) - logits.gather(1, t[:, None]).squeeze(1)).sum()
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_rows = chunk_rows
        ctx.compute_dtype = compute_dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, targets = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dt = ctx.compute_dtype
        w = weight.to(dt)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        rows = torch.arange(min(ctx.chunk_rows, hidden.shape[0]), device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk_rows):
                h = hidden[start : start + ctx.chunk_rows].to(dt)
                t = targets[start : start + ctx.chunk_rows]
                probs = torch.softmax((h @ w.T).float(), dim=-1)
                probs[rows[: t.shape[0]], t] -= 1.0
                g = (probs * grad_total).to(dt)
                if need_h:
                    grad_h[start : start + ctx.chunk_rows] = (g @ w).to(hidden.dtype)
                if need_w:
                    grad_w += (g.T @ h).float()
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    ignore_index: int = IGNORE_INDEX,
    check_range: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE of `hidden @ weight.T` against `targets`, chunked over rows.

    Args:
        hidden: `[N, H]` final hidden states.
        weight: `[V, H]` output head (tied embedding) of one channel.
        targets: `[N]` class ids; `ignore_index` rows are skipped before any logit is computed.
        chunk_rows: rows per chunk; peak extra memory is about `2 * chunk_rows * V * 4` bytes.
        ignore_index: target value that contributes nothing.
        check_range: raise on a target outside the head (one device sync; callers that checked already skip it).

    Returns:
        (sum of CE in float32, number of valid targets as int64).

    Raises:
        ValueError: a target outside `[0, V)`.
    """
    valid = targets != ignore_index
    idx = valid.nonzero().squeeze(1)
    count = idx.numel()
    if count == 0:
        # Keep the graph connected so DDP sees every parameter used, with an exact zero.
        return (hidden.sum() * 0.0).float() + (weight.sum() * 0.0).float(), valid.sum()
    t = targets.index_select(0, idx)
    if check_range:
        _check_targets(t[:, None], [weight.shape[0]])
    h = hidden.index_select(0, idx)
    total = _LinearCrossEntropy.apply(h, weight, t, int(chunk_rows), _compute_dtype(hidden, weight))
    return total, valid.sum()


def _check_targets(targets: torch.Tensor, classes: Sequence[int]) -> None:
    """Raise if any non-ignored target of `targets` `[N, C]` is outside `[0, classes[c])`."""
    limit = torch.tensor(classes, device=targets.device)
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= limit))
    if bad.any():
        row, channel = bad.nonzero()[0].tolist()
        value = int(targets[row, channel])
        raise ValueError(f"label {value} outside [0, {classes[channel]}) for a head of {classes[channel]} classes")


def channel_cross_entropy(
    hidden: torch.Tensor,
    head_weights: Sequence[torch.Tensor],
    labels: torch.Tensor,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> ChannelCE:
    """Per-channel summed CE of next-token prediction.

    Args:
        hidden: `[B, T, H]` final hidden states.
        head_weights: C weights `[V_c, H]` (channel 0 = text + codebook 0, 1..C-1 = codebooks).
        labels: `[B, T, C]` un-shifted labels, -100 = ignore.
        chunk_rows: rows per logits chunk.

    Returns:
        ChannelCE with `sums` [C] float32 and `counts` [C] int64.
    """
    targets = shift_labels(labels)
    # One range check (one device sync) for all channels, instead of one per channel.
    _check_targets(targets.reshape(-1, targets.shape[-1]), [w.shape[0] for w in head_weights])
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    sums, counts = [], []
    for c, weight in enumerate(head_weights):
        s, n = linear_cross_entropy(flat_h, weight, targets[..., c].reshape(-1), chunk_rows, check_range=False)
        sums.append(s)
        counts.append(n)
    return ChannelCE(torch.stack(sums), torch.stack(counts))


def normalized_weights(weights: Sequence[float]) -> torch.Tensor:
    """Channel weights scaled to sum to 1 (the original divides by their sum); a CPU tensor."""
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32, device="cpu")
    if w.ndim != 1 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"channel weights must be non-negative with a positive sum, got {list(weights)}")
    return w / w.sum()


def weighted_loss(sums: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine summed CE into `(loss, channel_losses)`.

    `channel_losses[c] = sums[c] / counts[c]` (0 for a channel without valid labels) and
    `loss = sum_c weights[c] * channel_losses[c]`. Pass step-wide counts (all micro-batches and ranks)
    to get the exact per-step objective of DESIGN invariant 3.
    """
    channel_losses = sums / counts.clamp(min=1).to(sums.dtype)
    return (weights.to(sums.device) * channel_losses).sum(), channel_losses
