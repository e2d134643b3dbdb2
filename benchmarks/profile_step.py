"""Where the time of one training step goes: the real-size LoRA step under torch.profiler, top GPU kernels.

Same model and data as benchmarks/gpu_train.py (random weights, bf16 base, LoRA, autocast bf16, reference
lengths packed into 16,384-row micro-batches). After warm-up steps, profiles `--steps` steps and prints the
step time, the kernels by total GPU time (the largest first) and that time grouped into gemm / attention / loss /
elementwise / copy, then one `RESULT {json}` line.

Usage: python benchmarks/profile_step.py [--attn varlen_sdpa] [--ckpt] [--steps 2] [--rows 25] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/profile_step.py` from anywhere
from benchmarks.gpu_train import layouts, reference_examples, train_step  # noqa: E402
from moss.model import MossTTSD, MossTTSDConfig, speedups
from moss.model.lora import apply_lora

# Kernel (or, on the CPU, operator) names -> where the time goes; the first matching category wins.
CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "varlen", "sdpa", "scaled_dot_product")),
    ("loss", ("cross_entropy", "log_softmax", "logsumexp", "nll_loss", "softmax_backward")),
    ("gemm", ("gemm", "cutlass", "cublas", "nvjet", "xmma", "aten::mm", "aten::addmm", "aten::bmm", "matmul")),
    ("copy", ("memcpy", "memset", "copy", "aten::cat", "contiguous", "_to_copy", "fill_")),
)


def kernel_category(name: str) -> str:
    """gemm, attention, loss, copy or elementwise (everything else: norms, activations, casts, reductions)."""
    lowered = name.lower()
    for category, needles in CATEGORIES:
        if any(needle.lower() in lowered for needle in needles):
            return category
    return "elementwise"


def time_by_category(events, cuda: bool) -> dict[str, float]:
    """Milliseconds per category: device kernels on CUDA; operators' own (self) time on the CPU."""
    totals: dict[str, float] = {}
    for e in events:
        if cuda:
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = e.device_time_total
        else:
            us = e.self_cpu_time_total
        category = kernel_category(e.key)
        totals[category] = totals.get(category, 0.0) + us / 1e3
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attn", default="varlen_sdpa")
    parser.add_argument("--ckpt", action="store_true", help="gradient checkpointing on")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25, help="kernels to list")
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--fused-lora", action="store_true", help="moss.model.lora.FusedLoraLinear")
    parser.add_argument("--selective", action="store_true", help="selective checkpointing (with --ckpt)")
    parser.add_argument("--liger", action="store_true", help="model.speedups.liger (CUDA; eager fallback elsewhere)")
    parser.add_argument("--static-varlen", action="store_true", help="model.speedups.static_varlen")
    parser.add_argument("--compile", action="store_true", help="model.speedups.compile (compiled in the warm-up)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    config = MossTTSDConfig.tiny() if args.tiny else MossTTSDConfig.v05()
    budget = 2048 if args.tiny else 16384
    with torch.device(device):
        base = MossTTSD(config, attn_implementation=args.attn)
    base = base.to(torch.bfloat16 if cuda else torch.float32)
    base.freeze_unused_token_table()
    if args.ckpt:
        base.gradient_checkpointing_enable("selective" if args.selective else "full")
    speedups.use_liger(base, args.liger)
    base.varlen_bucket = 64 if args.static_varlen or args.compile else 0
    if args.compile:
        speedups.compile_layers(base)
    model = apply_lora(base, lora_dropout=args.lora_dropout, fused=args.fused_lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    examples = reference_examples(24, config, np.random.default_rng(0), budget)
    packs = layouts(examples, budget, config.pad_token_id or 0)["packed"]

    for i in range(args.warmup):
        train_step(model, optimizer, packs[i % len(packs)], device)
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in range(args.steps):
            train_step(model, optimizer, packs[i % len(packs)], device)
        if cuda:
            torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / args.steps
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=args.rows))
    sort = "device_time_total" if cuda else "cpu_time_total"
    top = sorted(events, key=lambda e: -getattr(e, sort))[: args.rows]
    groups = {k: v / args.steps for k, v in sorted(time_by_category(events, cuda).items(), key=lambda kv: -kv[1])}
    whole = sum(groups.values()) or 1.0
    print("\nper step: " + ", ".join(f"{k} {v:.1f} ms ({v / whole:.0%})" for k, v in groups.items()))
    result = {
        "attn": args.attn,
        "ms_per_step_by_category": groups,
        "ckpt": ("selective" if args.selective else "full") if args.ckpt else False,
        "fused_lora": args.fused_lora,
        "speedups": {"liger": args.liger, "static_varlen": bool(base.varlen_bucket), "compile": args.compile},
        "step_s": wall,
        "ms_per_step": {e.key[:70]: getattr(e, sort) / 1e3 / args.steps for e in top},
    }
    print(f"step: {wall * 1e3:.0f} ms (profiled)")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
