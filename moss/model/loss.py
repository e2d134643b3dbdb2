"""Per-channel cross-entropy that never materialises a whole sequence's channel-0 logits.

Channel 0 has 152,697 classes: the fp32 logits of one 16k-row pack would take 10 GB, plus as much again for
their gradient. `linear_cross_entropy` computes CE straight from hidden states and the (tied) head weight in
chunks of rows, so peak extra memory is one chunk of logits. Three implementations:

* `fused` (default): each chunk's gradient is computed in the forward pass, as the loss is a plain sum; backward
  only scales it. One matmul per chunk less than recomputing (16k rows of channel 0 on an H100: 66 ms vs 193).
* `chunked`: the reference; keeps only its inputs and recomputes each chunk's logits in backward.
* `liger`: Liger-Kernel's Triton kernel (CUDA, optional package; 199 ms on the same H100 measurement).

No implementation reads anything back from the device when the caller passes host-side label counts: valid
rows are selected with `nonzero_static`, and label ranges are checked by asynchronous device assertions.

The functions return per-channel *sums* and *counts*, never means: the caller divides by the valid-label
count of a whole optimiser step (all micro-batches and ranks), which is the only normalisation that makes
packing, gradient accumulation and data parallelism give the same gradient (DESIGN invariant 3).

Layout: `labels` are `[B, T, C]` with -100 = ignore, *not* shifted: position t is scored against label t+1,
as the original `ForCausalLMLoss` does.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # the label of a position without a target (the one definition; CE and data use it)
DEFAULT_CHUNK_ROWS = 1024
HEAD_ALIGN = 64  # head rows are padded to a multiple of this for the matmuls (see `_aligned`)
CHUNK_CLASSES = 152_704  # chunk sizes are set for a head this wide (channel 0, aligned); smaller heads take more rows


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


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The reference: sum_n CE(hidden[n] @ weight.T, target[n]), chunked; logits recomputed in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, compute_dtype):
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_rows):
                logits = (hidden[start : start + chunk_rows].to(compute_dtype) @ w.T).float()
                t = targets[start : start + chunk_rows]
                total += (torch.logsumexp(logits, dim=-1) - logits.gather(1, t[:, None]).squeeze(1)).sum()
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_rows = chunk_rows
        ctx.compute_dtype = compute_dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, targets = ctx.saved_tensors
        grads = _chunk_gradients(
            hidden, weight, targets, ctx.chunk_rows, ctx.compute_dtype, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )[1:]
        return *(None if g is None else (g * grad_total).to(g.dtype) for g in grads), None, None, None


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Same sum, with the gradient computed during the forward pass, chunk by chunk (no recompute).

    The gradient for an upstream gradient of 1 is known in forward; backward only scales it. This saves the
    reference's second `hidden @ weight.T`: one matmul over the 152,697-class head per channel-0 row.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, compute_dtype, need_h, need_w):
        total, grad_h, grad_w = _chunk_gradients(hidden, weight, targets, chunk_rows, compute_dtype, need_h, need_w)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        scaled = [None if g is None else (g * grad_total).to(g.dtype) for g in (grad_h, grad_w)]
        return *scaled, None, None, None, None, None


def _gpu_layout(weight: torch.Tensor) -> bool:
    """Whether the head gets the GPU layout (aligned rows, chunks sized by head width); tests force it on CPU."""
    return weight.is_cuda


def _aligned(weight: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """The head in the compute dtype, its rows padded with zeros to a multiple of `HEAD_ALIGN`.

    MOSS-TTSD's heads have 152,697 and 1,025 classes: odd row strides of the logits that keep GPU matmuls off
    their aligned fast kernels. The padded classes are masked to -inf before the softmax, so nothing changes.
    """
    w = weight.to(dt)
    pad = -w.shape[0] % HEAD_ALIGN if _gpu_layout(w) else 0  # on CPU the padding only costs (measured)
    return torch.nn.functional.pad(w, (0, 0, 0, pad)) if pad else w


def _chunk_gradients(hidden, weight, targets, chunk_rows, dt, need_h, need_w):
    """(sum of CE, d sum / d hidden or None, d sum / d weight or None), one chunk of logits at a time.

    Per chunk: logits in the compute dtype, then one float32 copy shifted by the row maximum that becomes the
    softmax in place (exp, sum, divide): the log-sum-exp and the gradient share one pass over the classes.
    """
    classes = weight.shape[0]
    w = _aligned(weight, dt)
    # On a GPU, chunks hold about `chunk_rows` rows of the largest head: small heads (1,025 codes) take more rows
    # at once (fewer kernel launches). On CPU, smaller chunks stay in cache and are faster (measured).
    if _gpu_layout(w):
        chunk_rows = max(int(chunk_rows), int(chunk_rows) * (CHUNK_CLASSES // w.shape[0]))
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=weight.device) if need_w else None
    rows = torch.arange(min(chunk_rows, hidden.shape[0]), device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows].to(dt)
            t = targets[start : start + chunk_rows]
            logits = h @ w.T
            logits[:, classes:] = -torch.inf  # the alignment padding (an empty slice without it)
            top = logits.amax(dim=-1, keepdim=True).float()
            target_logit = logits.gather(1, t[:, None]).float()
            probs = torch.sub(logits, top, out=torch.empty(logits.shape, dtype=torch.float32, device=h.device))
            sums = probs.exp_().sum(dim=-1, keepdim=True)
            total += (top + sums.log() - target_logit).sum()  # log-sum-exp minus the target's logit
            if not (need_h or need_w):
                continue
            probs.div_(sums)  # softmax
            probs[rows[: t.shape[0]], t] -= 1.0
            g = probs.to(dt)
            if need_h:
                grad_h[start : start + chunk_rows] = (g @ w).to(hidden.dtype)
            if need_w:
                grad_w += (g.T @ h).float()
    return total, grad_h, (grad_w[:classes].to(weight.dtype) if need_w else None)


def _liger_sum(hidden, weight, targets, compute_dtype):
    """Liger-Kernel's fused linear CE (Triton, CUDA), summed; it reads one count back to the host per call."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    dt = compute_dtype
    return liger_fused_linear_cross_entropy(hidden.to(dt), weight.to(dt), targets, reduction="sum").float()


CE_IMPLEMENTATIONS = ("fused", "chunked", "liger")


def check_ce_impl(name: str) -> str:
    """Validate a loss implementation name, with the fix in the message."""
    if name not in CE_IMPLEMENTATIONS:
        raise ValueError(f"unknown cross-entropy implementation {name!r}; choose one of {CE_IMPLEMENTATIONS}")
    if name == "liger" and importlib.util.find_spec("liger_kernel") is None:
        raise ValueError("ce_impl='liger' needs the liger-kernel package (CUDA + Triton); use model.net.ce_impl=fused")
    return name


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    ignore_index: int = IGNORE_INDEX,
    check_range: bool = True,
    num_valid: int | None = None,
    impl: str = "fused",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE of `hidden @ weight.T` against `targets`, chunked over rows.

    Args:
        hidden: `[N, H]` final hidden states.
        weight: `[V, H]` output head (tied embedding) of one channel.
        targets: `[N]` class ids; `ignore_index` rows are dropped before any logit is computed.
        chunk_rows: rows per chunk; peak extra memory is about `2 * chunk_rows * V * 4` bytes.
        ignore_index: target value that contributes nothing.
        check_range: assert that targets lie in `[0, V)` (asynchronously: no device sync).
        num_valid: the number of valid targets when the caller knows it on the host (the collators count
            labels): the valid rows are then selected without reading anything back from the device.
        impl: `fused` (gradient computed in the forward pass, the default), `chunked` (the reference: logits
            recomputed in backward) or `liger` (Liger-Kernel's Triton kernel, CUDA only).

    Returns:
        (sum of CE in float32, number of valid targets as an int64 tensor).

    Raises:
        RuntimeError: (on CPU at once, on an accelerator at its next sync) a target outside `[0, V)`, or
            `num_valid` that does not match the targets.
    """
    valid = targets != ignore_index
    if check_range:
        _check_targets(targets[:, None], [weight.shape[0]])
    if num_valid is None:
        idx = valid.nonzero().squeeze(1)  # reads the count back: one device sync
    else:
        idx = torch.nonzero_static(valid, size=int(num_valid)).squeeze(1)
        torch._assert_async(valid.sum() == int(num_valid), f"num_valid={int(num_valid)} does not match the targets")
    if idx.numel() == 0:
        # Keep the graph connected so DDP sees every parameter used, with an exact zero.
        return (hidden.sum() * 0.0).float() + (weight.sum() * 0.0).float(), valid.sum()
    t = targets.index_select(0, idx)
    h = hidden.index_select(0, idx)
    dt = _compute_dtype(hidden, weight)
    if impl == "fused":
        grad = torch.is_grad_enabled()
        total = _FusedLinearCrossEntropy.apply(
            h, weight, t, int(chunk_rows), dt, grad and h.requires_grad, grad and weight.requires_grad
        )
    elif impl == "chunked":
        total = _ChunkedLinearCrossEntropy.apply(h, weight, t, int(chunk_rows), dt)
    else:
        total = _liger_sum(h, weight, t, dt)
    return total, valid.sum()


def _check_targets(targets: torch.Tensor, classes: Sequence[int]) -> None:
    """Targets `[N, C]`: every non-ignored one must lie in `[0, classes[c])`.

    An asynchronous device assertion: it never reads anything back to the host (on CPU it raises at once; on
    an accelerator a violation fails the next synchronising call instead of indexing out of range).
    """
    limit = torch.tensor(classes).to(targets.device, non_blocking=True)
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= limit))
    ranges = ", ".join(f"channel {c}: [0, {v})" for c, v in enumerate(classes))
    torch._assert_async(~bad.any(), f"a label lies outside its channel's head ({ranges}); check the data's codes")


def channel_cross_entropy(
    hidden: torch.Tensor,
    head_weights: Sequence[torch.Tensor],
    labels: torch.Tensor,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    label_counts: Sequence[int] | None = None,
    impl: str = "fused",
) -> ChannelCE:
    """Per-channel summed CE of next-token prediction.

    Args:
        hidden: `[B, T, H]` final hidden states.
        head_weights: C weights `[V_c, H]` (channel 0 = text + codebook 0, 1..C-1 = codebooks).
        labels: `[B, T, C]` un-shifted labels, -100 = ignore.
        chunk_rows: rows per logits chunk.
        label_counts: valid shifted labels per channel, known on the host (avoids one device sync per
            channel); None to count on the device.
        impl: see `linear_cross_entropy`.

    Returns:
        ChannelCE with `sums` [C] float32 and `counts` [C] int64.
    """
    targets = shift_labels(labels)
    # One range check for all channels, instead of one per channel.
    _check_targets(targets.reshape(-1, targets.shape[-1]), [w.shape[0] for w in head_weights])
    counts_host = [int(n) for n in label_counts.tolist()] if torch.is_tensor(label_counts) else label_counts
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    sums, counts = [], []
    for c, weight in enumerate(head_weights):
        s, n = linear_cross_entropy(
            flat_h,
            weight,
            targets[..., c].reshape(-1),
            chunk_rows,
            check_range=False,
            num_valid=None if counts_host is None else counts_host[c],
            impl=impl,
        )
        sums.append(s)
        counts.append(n)
    return ChannelCE(torch.stack(sums), torch.stack(counts))


def finetune_channel_weights(channels: int) -> list[float]:
    """The original's fine-tuning loss weights: text 8, the first codebook 2, every other codebook 1."""
    return [8.0, 2.0] + [1.0] * (channels - 2)


def normalized_weights(weights: Sequence[float], channels: int | None = None) -> torch.Tensor:
    """Channel weights scaled to sum to 1 (the original divides by their sum); a CPU tensor.

    Raises:
        ValueError: not one weight per channel (when `channels` is given), negative, or summing to 0.
    """
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32, device="cpu")
    if channels is not None and w.shape != (channels,):
        raise ValueError(
            f"channel_weights has {len(weights)} values, the model {channels} channels: give one weight per "
            f"channel, or null for the fine-tuning default {finetune_channel_weights(channels)}"
        )
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
    return (weights.to(sums.device, non_blocking=True) * channel_losses).sum(), channel_losses
