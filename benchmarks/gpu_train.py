"""One prepared GPU benchmark (H100/H200): LoRA training of the real-size MOSS-TTSD v0.5 architecture.

Random weights (bf16 base, float32 LoRA r16/alpha32 rsLoRA), autocast bf16, on the reference length
distribution (audio log-uniform 5-960 s at 12.5 frames/s + 60-400 text rows). Every layout trains on the
*same* samples, one pass after a warm-up, so real frames/s compare directly:
  * packed 16,384-row micro-batches: varlen_sdpa (one varlen kernel call per layer), with gradient
    checkpointing on and off; sdpa over the same packs (dense block mask) for comparison;
  * the original layout: padded batches of 1 (the original's default) and of 4 (sdpa + padding mask).
Then the cross-entropy implementations alone on one 16k-row channel-0 pack (fused / chunked / liger).
Prints real frames/s, ratios to the padded baselines, MFU (FLOP model in moss/training/flops.py, peak
from the device name or --peak-tflops) and peak memory per configuration, then one `RESULT {json}` line.
About 2-3 minutes on one H100.

Usage: python benchmarks/gpu_train.py [--samples 48] [--warmup 2] [--budget 16384] [--tiny] [--only NAME ...]
(--tiny runs the same code on a tiny model on any device, as a smoke test.)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time

import numpy as np
import torch

from moss.data.collate import PaddingCollator
from moss.data.examples import Example
from moss.data.packing import BestFitPacker, collate_packs
from moss.model import MossTTSD, MossTTSDConfig
from moss.model.lora import apply_lora, use_fused_lora
from moss.model.loss import finetune_channel_weights, linear_cross_entropy
from moss.training.flops import flop_model, peak_tflops, step_flops

# name -> (layout, attention, gradient checkpointing)
CONFIGS = {
    "packed varlen_sdpa ckpt=on": ("packed", "varlen_sdpa", True),
    "packed varlen_sdpa ckpt=off": ("packed", "varlen_sdpa", False),
    "packed sdpa ckpt=on": ("packed", "sdpa", True),
    "packed flash_attention_2 ckpt=on": ("packed", "flash_attention_2", True),
    "padded bs1 sdpa ckpt=on": ("bs1", "sdpa", True),
    "padded bs4 sdpa ckpt=on": ("bs4", "sdpa", True),
}


def reference_examples(n: int, config: MossTTSDConfig, rng: np.random.Generator, max_rows: int) -> list[Example]:
    """Delayed-grid-shaped random samples with the reference lengths (prompt rows unlabelled)."""
    out = []
    for i in range(n):
        frames = int(round(math.exp(rng.uniform(math.log(5), math.log(960))) * 12.5))
        text = int(rng.integers(60, 401))
        rows = min(frames + text + 8, max_rows)
        ids = np.stack([rng.integers(0, v, rows) for v in config.channel_vocab_sizes], axis=1).astype(np.int64)
        labels = ids.copy()
        labels[: min(text, rows)] = -100
        out.append(Example(str(i), rows, ids, labels))
    return out


def layouts(examples: list[Example], budget: int, pad_id: int) -> dict[str, list]:
    """The same samples as packed micro-batches, padded batches of 4 and single samples."""
    packer = BestFitPacker(budget, window=len(examples), min_fill=0.0)
    packs = [p for e in examples for p in packer.add(e)] + packer.flush()
    packs.sort(key=lambda p: -sum(e.rows for e in p))
    collate = PaddingCollator(pad_id, max_length=budget)
    ordered = sorted(examples, key=lambda e: -e.rows)  # longest first: a warm-up that sees peak memory
    return {
        "packed": [collate_packs([p], budget, text_pad_id=pad_id) for p in packs],
        "bs4": [collate(examples[i : i + 4]) for i in range(0, len(examples), 4)],
        "bs1": [collate([e]) for e in ordered],
    }


def train_step(model, optimizer, batch: dict, device: torch.device) -> None:
    """One optimiser step on one micro-batch (bf16 autocast on CUDA)."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = model(**batch.to(device).model_inputs())
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_pass(
    model, batches: list[dict], attn: str, checkpointing, warmup: int, device, flops, fused_lora: bool = False
) -> dict:
    """One timed pass over `batches` after `warmup` untimed steps (checkpointing: False, True or "selective")."""
    moss = model.get_base_model()
    moss.set_attn_implementation(attn)
    use_fused_lora(model, fused_lora)
    if checkpointing:
        moss.gradient_checkpointing_enable(checkpointing)
    else:
        moss.gradient_checkpointing_disable()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    cuda = device.type == "cuda"
    for batch in batches[:warmup]:
        train_step(model, optimizer, batch, device)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for batch in batches:
        train_step(model, optimizer, batch, device)
    if cuda:
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    real = sum(int(b.stats.real_rows) for b in batches)
    computed = sum(b.input_ids.shape[0] * b.input_ids.shape[1] for b in batches)
    sum_sq = sum(int(b.stats.sum_sq_rows) for b in batches)
    return {
        "real_rows": real,
        "sum_sq_rows": sum_sq,
        "real_frames_per_s": real / wall,
        "tflops": step_flops(flops, real, sum_sq, lora=True) / wall / 1e12,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "efficiency": real / computed,
        "steps": len(batches),
        "wall_s": wall,
    }


def loss_benchmark(config: MossTTSDConfig, rows: int, device, repeats: int = 3) -> dict:
    """Channel-0 cross-entropy alone (hidden bf16 [rows, H], head [V, H]): time and agreement per impl."""
    g = torch.Generator(device=device).manual_seed(0)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden = torch.randn(rows, config.hidden_size, device=device, dtype=dt, generator=g)
    weight = torch.randn(config.vocab_size, config.hidden_size, device=device, dtype=dt, generator=g) * 0.02
    targets = torch.randint(0, config.vocab_size, (rows,), device=device, generator=g)
    impls = ["chunked", "fused"] + (
        ["liger"] if device.type == "cuda" and importlib.util.find_spec("liger_kernel") else []
    )
    out, reference = {}, None
    for impl in impls:
        for train_head in (False, True):
            h = hidden.clone().requires_grad_()
            w = weight.clone().requires_grad_(train_head)
            try:
                times = []
                for _ in range(repeats + 1):
                    h.grad = w.grad = None
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    start = time.perf_counter()
                    total, _ = linear_cross_entropy(h, w, targets, num_valid=rows, impl=impl)
                    total.backward()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    times.append(time.perf_counter() - start)
            except Exception as err:  # e.g. liger incompatible with this torch/triton: report, go on
                out[impl] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
                break
            key = f"{impl} {'head trained' if train_head else 'head frozen'}"
            value, grad = float(total.detach()), h.grad.float()
            if reference is None and not train_head:
                reference = (value, grad)
            entry = {"ms": 1e3 * min(times[1:])}
            if not train_head:
                entry["rel_err_loss"] = abs(value - reference[0]) / abs(reference[0])
                entry["max_err_grad"] = float((grad - reference[1]).abs().max())
            out[key] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget", type=int, default=16384)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--only", nargs="*", default=None, help="configuration names to run (default: all)")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and device.type != "cuda":
        raise SystemExit("gpu_train.py: no CUDA device; the real-size benchmark runs on a GPU only (use --tiny here)")
    # The padded baselines stand for the original's flash-attention batches: keep SDPA on its flash/efficient
    # kernels (cuDNN's would build a new plan for every padded length).
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.manual_seed(0)
    config = MossTTSDConfig.tiny() if args.tiny else MossTTSDConfig.v05()
    budget = min(args.budget, 2048) if args.tiny else args.budget
    with torch.device(device):
        base = MossTTSD(config, attn_implementation="sdpa").to(
            torch.bfloat16 if device.type == "cuda" else torch.float32
        )
    base.set_channel_weights(finetune_channel_weights(8))
    base.freeze_unused_token_table()
    model = apply_lora(base)
    flops = flop_model(base)
    peak = args.peak_tflops or peak_tflops(device)
    examples = reference_examples(args.samples, config, np.random.default_rng(0), budget)
    data = layouts(examples, budget, config.pad_token_id or 0)
    results = {}
    for name, (layout, attn, checkpointing, *fused) in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            continue
        try:
            results[name] = train_pass(
                model, data[layout], attn, checkpointing, args.warmup, device, flops, fused_lora=bool(fused)
            )
        except (torch.OutOfMemoryError, RuntimeError) as err:  # e.g. out of memory without checkpointing: report it
            results[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{name}: {results[name]}", flush=True)
    losses = loss_benchmark(config, budget, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    size = "tiny" if args.tiny else "v0.5 (2.05 B)"
    print(f"\nMOSS-TTSD {size} LoRA, {name}, budget {budget} rows, {args.samples} samples (the same in every layout)")
    print(f"{'configuration':<36}{'real frames/s':>14}{'vs bs1':>8}{'vs bs4':>8}{'MFU':>7}{'peak GB':>9}{'fill':>7}")
    base1 = results.get("padded bs1 sdpa ckpt=on", {}).get("real_frames_per_s")
    base4 = results.get("padded bs4 sdpa ckpt=on", {}).get("real_frames_per_s")
    for key, r in results.items():
        if "error" in r:
            print(f"{key:<36}  {r['error']}")
            continue
        rate = r["real_frames_per_s"]
        mfu = f"{r['tflops'] / peak:.1%}" if peak else "n/a"
        memory = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "n/a"
        vs1 = f"{rate / base1:.2f}x" if base1 else "n/a"
        vs4 = f"{rate / base4:.2f}x" if base4 else "n/a"
        print(f"{key:<36}{rate:>14.0f}{vs1:>8}{vs4:>8}{mfu:>7}{memory:>9}{r['efficiency']:>7.1%}")
    print(f"\nchannel-0 cross-entropy, {budget} rows x {config.vocab_size} classes, forward + backward:")
    for key, r in losses.items():
        print(f"  {key:<24} {r}")
    print("\nRESULT " + json.dumps({"device": name, "peak_tflops": peak, "results": results, "loss": losses}))


if __name__ == "__main__":
    main()
