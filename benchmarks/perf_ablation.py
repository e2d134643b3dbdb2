"""Where training speed comes from: the same samples trained with each speed-up switched on in turn.

Real-size MOSS-TTSD v0.5 LoRA (r16, dropout 0.05; random weights, bf16 base, autocast bf16), 16,384-row packs of
the reference length distribution, as benchmarks/gpu_train.py. Stages, each one pass after a warm-up:

  baseline          peft's LoRA layer, gradient checkpointing of whole layers (the recipe before this study)
  ckpt=selective    matmul and attention outputs kept, pointwise work recomputed
  ckpt=off          no checkpointing (lora_v05's default: fits 80 GB at 16k rows)
  +fused lora       + moss.model.lora.FusedLoraLinear (model.peft.fused=true)
  +liger            + Liger's RMSNorm, RoPE and SwiGLU kernels (model.speedups.liger=true)
  +static varlen    + max_seqlen = pack length, boundaries padded to 64 segments (model.speedups.static_varlen)
  +compile          + torch.compile of every decoder layer (model.speedups.compile=true; its compilation
                    happens in the warm-up steps)

Grouped key/value heads reach the varlen kernel unrepeated in every stage (moss.model.varlen).

Each stage prints real rows/s, MFU in our accounting and llm-foundry's, HFU, peak memory, the loss of the first
pack and the norm of its LoRA gradient relative to the baseline (both computed from the same adapter weights,
restored before every stage), then a `RESULT {json}` line, so a time-out loses only the stage in progress; the
last line is `RESULT` with every stage. `--tiny` runs it on a tiny model on any device (a smoke test).

Usage: python benchmarks/perf_ablation.py [--samples 24] [--warmup 2] [--tiny] [--stages NAME ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/perf_ablation.py` from anywhere
from benchmarks.gpu_train import layouts, reference_examples, train_pass  # noqa: E402
from moss.model import MossTTSD, MossTTSDConfig, speedups  # noqa: E402
from moss.model.lora import apply_lora, use_fused_lora  # noqa: E402
from moss.model.loss import finetune_channel_weights  # noqa: E402
from moss.training.flops import flop_model, peak_tflops, step_flops  # noqa: E402

# name -> (gradient checkpointing, fused LoRA, Liger, static varlen shapes, compiled layers); each adds one switch.
STAGES = {
    "baseline": ("full", False, False, False, False),
    "ckpt=selective": ("selective", False, False, False, False),
    "ckpt=off": (False, False, False, False, False),
    "+fused lora": (False, True, False, False, False),
    "+liger": (False, True, True, False, False),
    "+static varlen": (False, True, True, True, False),
    "+compile": (False, True, True, True, True),
}


def switch(base: MossTTSD, liger: bool, static: bool, compiled: bool) -> None:
    """Set the `moss.model.speedups` switches of `base` in place (compiled layers can be switched off again)."""
    on_cuda = next(base.parameters()).is_cuda
    if liger and on_cuda and (problem := speedups.liger_problem()):
        raise RuntimeError(problem)  # off CUDA (--tiny on a CPU) the Liger classes run their eager fallback
    speedups.use_liger(base, liger)
    base.varlen_bucket = 64 if static or compiled else 0
    for layer in base.decoder_layers():
        layer._compiled_call_impl = None
    if compiled:
        speedups.compile_layers(base)


def first_pack(model, batch: dict, device: torch.device) -> tuple[float, float]:
    """Loss and LoRA-gradient norm of one pack (dropout off: the same numbers for every stage's layer)."""
    model.eval()  # no dropout: the stages must see the same function
    model.zero_grad(set_to_none=True)
    # Eager, so a compiled stage compiles only the training graphs it times.
    with torch.compiler.set_stance("force_eager"), torch.autocast(device.type, torch.bfloat16, device.type == "cuda"):
        loss = model(**batch.to(device).model_inputs()).loss
    loss.backward()
    norm = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None))
    model.zero_grad(set_to_none=True)
    model.train()
    return float(loss), float(norm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--stages", nargs="*", default=list(STAGES))
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and device.type != "cuda":
        raise SystemExit("perf_ablation.py: no CUDA device; the real-size ablation runs on a GPU only (use --tiny)")
    torch.manual_seed(0)
    config = MossTTSDConfig.tiny() if args.tiny else MossTTSDConfig.v05()
    budget = 2048 if args.tiny else 16384
    with torch.device(device):
        base = MossTTSD(config, attn_implementation="varlen_sdpa")
    base = base.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    base.set_channel_weights(finetune_channel_weights(config.channels))
    base.freeze_unused_token_table()
    model = apply_lora(base, lora_dropout=0.05)
    with torch.no_grad():  # B starts at zero: give the adapters values, so their gradients compare meaningfully
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3, generator=torch.Generator(device=p.device).manual_seed(len(name)))
    start_weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    counts, peak = flop_model(base), args.peak_tflops or peak_tflops(device)
    packs = layouts(reference_examples(args.samples, config, np.random.default_rng(0), budget), budget, 0)["packed"]
    results, reference = {}, None
    for name in args.stages:
        checkpointing, fused, liger, static, compiled = STAGES[name]
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in start_weights:
                    p.copy_(start_weights[n])
        use_fused_lora(model, fused)
        (base.gradient_checkpointing_enable(checkpointing) if checkpointing else base.gradient_checkpointing_disable())
        loss = norm = float("nan")
        try:
            switch(base, liger, static, compiled)
            loss, norm = first_pack(model, packs[0], device)
            reference = reference or (loss, norm)
            timed = train_pass(model, packs, "varlen_sdpa", checkpointing, args.warmup, device, counts, fused)
        except Exception as err:  # noqa: BLE001 - a stage that fails (memory, a kernel, a compiler) is reported, not fatal
            timed = {"error": f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"}
        ratio = norm / reference[1] if reference else float("nan")
        result = {"stage": name, "first_pack_loss": loss, "grad_norm_vs_baseline": ratio, **timed}
        if "error" not in timed:
            rows, sum_sq, wall = timed["real_rows"], timed["sum_sq_rows"], timed["wall_s"]
            for key, convention in (("mfu", "ours"), ("mfu_foundry", "foundry"), ("hfu", "hfu")):
                flops = step_flops(counts, rows, sum_sq, True, convention, recompute=bool(checkpointing))
                result[key] = flops / wall / 1e12 / peak if peak else None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results[name] = result
        print("RESULT " + json.dumps(result), flush=True)
    print(f"\n{'stage':<18}{'rows/s':>10}{'MFU':>7}{'foundry':>9}{'HFU':>7}{'peak GB':>9}{'loss':>9}{'|g|/base':>10}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<18} {r['error']}")
            continue
        pct = lambda v: f"{v:.1%}" if v is not None else "n/a"  # noqa: E731
        gb = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "n/a"
        print(
            f"{name:<18}{r['real_frames_per_s']:>10.0f}{pct(r['mfu']):>7}{pct(r['mfu_foundry']):>9}{pct(r['hfu']):>7}"
            f"{gb:>9}{r['first_pack_loss']:>9.4f}{r['grad_norm_vs_baseline']:>10.4f}"
        )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print("RESULT " + json.dumps({"device": name, "peak_tflops": peak, "stages": results}))


if __name__ == "__main__":
    main()
