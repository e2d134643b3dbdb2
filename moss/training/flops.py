"""What a training step computes, in three accountings, and what a GPU can compute: the terms of MFU.

FLOPs of one step over real rows (a row is one position of the token grid), per convention:

* `ours` (MFU, the README's figure): `k * N` per row, with `k = 6` for full fine-tuning (forward 2N, backward
  4N) and `k = 4` with a frozen base (LoRA: no weight gradients), plus causal attention, forward and backward,
  counted as what a causal kernel does: `6 * layers * d_attn * s^2` per sample of `s` rows (half the square);
* `foundry` (llm-foundry's MFU, for comparison with published figures): the same, but attention counted over
  the full square, `12 * layers * d_attn * s^2`, as llm-foundry's `flops_per_batch` does;
* `hfu` (hardware FLOPs utilisation): `ours` plus what gradient checkpointing recomputes, one more forward of
  the decoder layers: `2 N_layers` per row and `2 * layers * d_attn * s^2` per sample.

`N` counts the decoder layers and the 8 output heads (the heads' matmuls are real compute; embedding lookups
are not). `tests/training/test_flops.py` checks `foundry` and `ours` against torch's FLOP counter on real steps.

Peak dense bf16 throughput is the project's own table of datasheet figures: Lightning's (2.6.6) does not know
"NVIDIA H200", and lists the 2:4-sparse figure for H100 NVL. Unknown cards fall back to Lightning's table,
then to `callbacks.throughput.peak_tflops`.
"""

from __future__ import annotations

import torch

CONVENTIONS = ("ours", "foundry", "hfu")

# Dense bf16 tensor-core TFLOPs per GPU (datasheets; never the 2:4-sparse figure). Matched by substring of
# `torch.cuda.get_device_name`, first match wins (so the specific names come before the general ones).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.5),
    ("H200 NVL", 835.0),
    ("H200", 989.5),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.5),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H800", 989.5),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
)


def peak_tflops_of(name: str) -> float | None:
    """Dense bf16 peak of the GPU called `name` (as CUDA reports it), from the project's table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of `device` in TFLOPs: the project's table, then Lightning's; None on the CPU."""
    if device.type != "cuda":
        return None
    if (known := peak_tflops_of(torch.cuda.get_device_name(device))) is not None:
        return known
    from lightning.fabric.utilities.throughput import get_available_flops

    flops = get_available_flops(device, torch.bfloat16)
    return flops / 1e12 if flops else None


def flop_model(moss) -> dict:
    """Counts for the FLOP model of a MossTTSD: compute parameters, layers and attention width."""
    lm = moss.decoder
    layer_params = sum(p.numel() for n, p in lm.named_parameters() if n.startswith("layers.") and "lora_" not in n)
    head_params = sum(h.weight.numel() for h in moss.lm_heads)
    cfg = lm.config
    return {
        "params": layer_params + head_params,
        "head_params": head_params,
        "layers": cfg.num_hidden_layers,
        "d_attn": cfg.num_attention_heads * cfg.head_dim,
    }


def step_flops(
    counts: dict, rows: int, sum_sq_rows: int, lora: bool, convention: str = "ours", recompute: bool = False
) -> float:
    """FLOPs of training on `rows` real rows whose samples' squared lengths sum to `sum_sq_rows`.

    `recompute` (gradient checkpointing) only changes `hfu`, which counts the recomputed forward.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r} is not one of {CONVENTIONS}")
    params, attention = counts["params"], counts["layers"] * counts["d_attn"] * sum_sq_rows
    flops = (4 if lora else 6) * params * rows + (12 if convention == "foundry" else 6) * attention
    if convention == "hfu" and recompute:  # the decoder layers' forward again (the heads are not checkpointed)
        flops += 2 * (params - counts.get("head_params", 0)) * rows + 2 * attention
    return float(flops)
