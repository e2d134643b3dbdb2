"""The chunked linear cross-entropy equals a float64 plain-CE reference, in value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from moss.model.loss import channel_cross_entropy, linear_cross_entropy, shift_labels, weighted_loss


def reference(hidden, weights, labels):
    """Plain CE in float64 with materialised logits: sums and counts per channel."""
    targets = shift_labels(labels)
    sums, counts = [], []
    for c, w in enumerate(weights):
        logits = hidden.double() @ w.double().T
        t = targets[..., c]
        sums.append(F.cross_entropy(logits.reshape(-1, w.shape[0]), t.reshape(-1), reduction="sum", ignore_index=-100))
        counts.append((t != -100).sum())
    return torch.stack(sums), torch.stack(counts)


@pytest.mark.parametrize("impl", ["fused", "chunked"])
@pytest.mark.parametrize("chunk_rows", [1, 7, 4096])
@pytest.mark.parametrize("host_counts", [False, True])
@pytest.mark.parametrize("gpu_layout", [False, True])
def test_values_and_gradients_match_float64(chunk_rows, impl, host_counts, gpu_layout, monkeypatch):
    if gpu_layout:  # heads padded to 64-row multiples (-inf logits) and chunks sized by head width, as on CUDA
        monkeypatch.setattr("moss.model.loss._gpu_layout", lambda weight: True)
        monkeypatch.setattr("moss.model.loss.CHUNK_CLASSES", 3 * 128)  # 97-class head: 3 x chunk_rows per chunk
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=g, requires_grad=True)
    weights = [torch.randn(v, 16, generator=g, requires_grad=True) for v in (97, 13, 13)]
    labels = torch.stack([torch.randint(0, w.shape[0], (3, 11), generator=g) for w in weights], -1)
    labels[torch.rand(labels.shape, generator=g) < 0.3] = -100
    counts = (shift_labels(labels) != -100).sum((0, 1)) if host_counts else None
    ce = channel_cross_entropy(hidden, weights, labels, chunk_rows=chunk_rows, label_counts=counts, impl=impl)
    leaves64 = [t.detach().double().requires_grad_() for t in (hidden, *weights)]
    ref_sums, ref_counts = reference(leaves64[0], leaves64[1:], labels)
    assert torch.equal(ce.counts, ref_counts)
    torch.testing.assert_close(ce.sums.double(), ref_sums, rtol=1e-6, atol=1e-5)
    w = torch.tensor([0.5, 0.3, 0.2])
    loss, _ = weighted_loss(ce.sums, ce.counts, w)
    ref_loss = (w.double() * ref_sums / ref_counts).sum()
    grads = torch.autograd.grad(loss, [hidden, *weights])
    ref_grads = torch.autograd.grad(ref_loss, leaves64)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_channel_without_labels_contributes_exact_zero_and_keeps_the_graph():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    labels = torch.full((2, 5, 1), -100)
    ce = channel_cross_entropy(hidden, [weight], labels)
    assert ce.sums.item() == 0 and ce.counts.item() == 0
    loss, per_channel = weighted_loss(ce.sums, ce.counts, torch.ones(1))
    assert per_channel.item() == 0
    loss.backward()
    assert weight.grad is not None and torch.count_nonzero(weight.grad) == 0


def test_shift_scores_row_t_against_label_t_plus_1():
    labels = torch.arange(6).reshape(1, 3, 2)
    assert shift_labels(labels).tolist() == [[[2, 3], [4, 5], [-100, -100]]]


def test_out_of_range_label_is_reported():
    with pytest.raises(RuntimeError, match=r"outside its channel's head \(channel 0: \[0, 10\)\)"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 12, -100, 3]))


def test_wrong_host_count_is_caught():
    with pytest.raises(RuntimeError, match="num_valid=2 does not match"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 5, -100, 3]), num_valid=2)


def test_fused_computes_no_gradients_in_no_grad_passes(monkeypatch):
    import moss.model.loss as loss

    calls = []
    real = loss._chunk_gradients

    def spy(hidden, weight, targets, chunk_rows, dt, need_h, need_w):
        calls.append((need_h, need_w))
        return real(hidden, weight, targets, chunk_rows, dt, need_h, need_w)

    monkeypatch.setattr(loss, "_chunk_gradients", spy)
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    targets = torch.randint(0, 10, (6,))
    with torch.no_grad():
        linear_cross_entropy(hidden, weight, targets)
    linear_cross_entropy(hidden, weight, targets)
    assert calls == [(False, False), (True, True)]


def test_bf16_autocast_runs_in_the_autocast_dtype_and_stays_close():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(64, 32, generator=g), torch.randn(200, 32, generator=g) * 0.1
    targets = torch.randint(0, 200, (64,), generator=g)
    exact, _ = linear_cross_entropy(hidden, weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        approx, _ = linear_cross_entropy(hidden, weight, targets)
    assert approx.dtype == torch.float32
    torch.testing.assert_close(approx, exact, rtol=2e-2, atol=0)


@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_frozen_head_gets_no_gradient_work(impl):
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(10, 8)  # frozen (LoRA): only the hidden-state gradient is needed
    total, _ = linear_cross_entropy(hidden, weight, torch.randint(0, 10, (6,)), impl=impl)
    total.backward()
    assert hidden.grad is not None and weight.grad is None
