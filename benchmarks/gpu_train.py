"""One prepared GPU benchmark (H100/H200): LoRA training steps of the real-size MOSS-TTSD v0.5 architecture.

Random weights (bf16 base, float32 LoRA r16/alpha32 rsLoRA), autocast bf16, the exact step objective, on the
reference length distribution (audio log-uniform 5-960 s at 12.5 frames/s + 60-400 text rows):
  * packed 16,384-row micro-batches with attention sdpa (dense block mask), flex_attention, varlen_sdpa and
    flash_attention_2 (when flash-attn is importable), gradient checkpointing on and off;
  * the original layout as baseline: padded batches of 4 (sdpa + padding mask), checkpointing on.
Prints real frames/s, MFU (FLOP model in moss/training/callbacks.py, peak from the device name or
--peak-tflops) and peak memory per configuration, then one `RESULT {json}` line. About 5-8 minutes on one H100.

Usage: python benchmarks/gpu_train.py [--steps 6] [--warmup 2] [--budget 16384] [--tiny]
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
from moss.data.packing import BestFitPacker, collate_packs
from moss.model import MossTTSD, MossTTSDConfig
from moss.model.lora import apply_lora
from moss.training.callbacks import flop_model, peak_tflops, step_flops


def reference_examples(n: int, config: MossTTSDConfig, rng: np.random.Generator, max_rows: int) -> list[dict]:
    """Delayed-grid-shaped random samples with the reference lengths (prompt rows unlabelled)."""
    out = []
    for i in range(n):
        frames = int(round(math.exp(rng.uniform(math.log(5), math.log(960))) * 12.5))
        text = int(rng.integers(60, 401))
        rows = min(frames + text + 8, max_rows)
        ids = np.stack([rng.integers(0, v, rows) for v in config.channel_vocab_sizes], axis=1).astype(np.int64)
        labels = ids.copy()
        labels[: min(text, rows)] = -100
        out.append({"key": str(i), "rows": rows, "input_ids": ids, "labels": labels})
    return out


def batches(examples: list[dict], budget: int, packed: bool, pad_id: int) -> list[dict]:
    if packed:
        packer = BestFitPacker(budget, window=len(examples), min_fill=0.0)
        packs = [p for e in examples for p in packer.add(e)] + packer.flush()
        packs.sort(key=lambda p: -sum(e["rows"] for e in p))
        return [collate_packs([p], budget, text_pad_id=pad_id) for p in packs]
    collate = PaddingCollator(pad_id, max_length=16000)
    return [collate(examples[i : i + 4]) for i in range(0, len(examples) - 3, 4)]


def run(model, data: list[dict], attn: str, checkpointing: bool, steps: int, warmup: int, device, flops) -> dict:
    lm = model.get_base_model().model.language_model
    lm.set_attn_implementation(attn)
    (lm.activation_checkpointing_enable if checkpointing else lm.activation_checkpointing_disable)()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    real = sum_sq = 0
    start = None
    for i in range(warmup + steps):
        batch = data[i % len(data)]
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        kwargs = {}
        if "cu_seqlens" in batch and attn == "varlen_sdpa":
            kwargs["varlen_bounds"] = batch["cu_seqlens"].tolist()
        if "cu_seqlens" in batch and attn == "flash_attention_2":
            cu = batch["cu_seqlens"].to(device)
            kwargs = dict(
                cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=batch["max_seqlen"], max_length_k=batch["max_seqlen"]
            )
        mask = batch.get("attention_mask")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(
                batch["input_ids"].to(device),
                labels=batch["labels"].to(device),
                attention_mask=None if mask is None else mask.to(device),
                position_ids=None if "position_ids" not in batch else batch["position_ids"].to(device),
                **kwargs,
            )
        loss = (out.channel_loss_sums / out.channel_label_counts.clamp(min=1)).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            real += int(batch["real_rows"])
            sum_sq += int(batch["sum_sq_rows"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    achieved = step_flops(flops, real, sum_sq, lora=True) / wall / 1e12
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"real_frames_per_s": real / wall, "tflops": achieved, "peak_memory_gb": peak_mem}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget", type=int, default=16384)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = MossTTSDConfig.tiny() if args.tiny else MossTTSDConfig.v05()
    budget = min(args.budget, 2048) if args.tiny else args.budget
    with torch.device(device):
        base = MossTTSD(config, attn_implementation="sdpa").to(
            torch.bfloat16 if device.type == "cuda" else torch.float32
        )
    base.model.language_model.embed_tokens.requires_grad_(False)
    model = apply_lora(base)
    flops = flop_model(base)
    peak = args.peak_tflops or peak_tflops(device)
    examples = reference_examples(args.samples, config, np.random.default_rng(0), budget)
    pad_id = config.pad_token_id or 0
    packed, padded = batches(examples, budget, True, pad_id), batches(examples, budget, False, pad_id)
    configs = [("sdpa", True, True), ("varlen_sdpa", True, True), ("varlen_sdpa", True, False)]
    if device.type == "cuda":  # flex_attention has no backward on CPU; flash-attn is CUDA-only
        configs.append(("flex_attention", True, True))
        if importlib.util.find_spec("flash_attn") is not None:
            configs.append(("flash_attention_2", True, True))
    configs.append(("sdpa", False, True))
    results = {}
    for attn, is_packed, checkpointing in configs:
        name = f"{'packed' if is_packed else 'padded bs4'} {attn} ckpt={'on' if checkpointing else 'off'}"
        try:
            results[name] = run(
                model, packed if is_packed else padded, attn, checkpointing, args.steps, args.warmup, device, flops
            )
        except (torch.OutOfMemoryError, RuntimeError) as err:  # e.g. out of memory without checkpointing: report it
            results[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base_rate = results.get("padded bs4 sdpa ckpt=on", {}).get("real_frames_per_s")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"\nMOSS-TTSD {'tiny' if args.tiny else 'v0.5 (2.05 B)'} LoRA, {name}, budget {budget} rows, "
        f"{args.steps} timed steps"
    )
    print(f"{'configuration':<40}{'real frames/s':>15}{'vs padded':>11}{'MFU':>8}{'peak GB':>9}")
    for key, r in results.items():
        if "error" in r:
            print(f"{key:<40}  {r['error']}")
            continue
        mfu = f"{r['tflops'] / peak:.1%}" if peak else "n/a"
        ratio = f"{r['real_frames_per_s'] / base_rate:.2f}x" if base_rate else "n/a"
        memory = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "n/a"
        print(f"{key:<40}{r['real_frames_per_s']:>15.0f}{ratio:>11}{mfu:>8}{memory:>9}")
    print("\nRESULT " + json.dumps({"device": name, "peak_tflops": peak, "results": results}))


if __name__ == "__main__":
    main()
