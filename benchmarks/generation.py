"""Generation speed per decoding engine and batch size: frames/s and real-time factor, tiny and real-size models.

Random weights would end speech at once, so channel 0 is kept inside the speech range (a wrapper masks the
other logits) until the requested number of frames is generated: each step then costs exactly what a real
one does (one row of 8 channels, 12.5 frames per second of audio). Greedy decoding after a 200-row text
prompt, with each engine of `moss.generation` (dynamic: transformers' growing cache; static: preallocated
cache read by bucket; graph: static with CUDA graphs; compiled: graph of a torch.compile'd step; the last two
CUDA only) at each batch size. Every measurement follows
a warm-up of the same engine and shapes (for graph: the capture of every bucket it reads), as a service
generating batch after batch sees it. Frames/s count all sequences of the batch; the real-time factor is wall
time / audio time of one sequence (below 1 is faster than real time). Each case prints a `RESULT` line.

Usage: python benchmarks/generation.py [--device cpu|cuda] [--sizes tiny real] [--seconds 30] [--batch 1 32]
    [--engines dynamic static graph] [--dtype ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
from torch import nn

from moss.audio import FRAME_RATE
from moss.generation import ENGINES, GenerationConfig, generate
from moss.model import MossTTSD, MossTTSDConfig


class SpeechOnly(nn.Module):
    """Wraps a MossTTSD so that channel 0 can only pick codebook-0 codes (speech goes on until max_new_tokens)."""

    def __init__(self, model: MossTTSD):
        super().__init__()
        self.inner, self.config, self.model, self.lm_heads = model, model.config, model.model, model.lm_heads
        self.lo, self.hi = model.config.speech_token_range

    @property
    def attn_implementation(self) -> str:
        return self.inner.attn_implementation

    @property
    def decoder(self):
        return self.inner.decoder

    def new_cache(self):
        return self.inner.new_cache()

    def attention(self, name: str):
        return self.inner.attention(name)

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        first = out.logits[0].clone()
        first[..., : self.lo] = -torch.inf
        first[..., self.hi :] = -torch.inf
        out.logits = (first, *out.logits[1:])
        return out


def measure(
    model: SpeechOnly, seconds: float, device: torch.device, engine="dynamic", batch=1, prompt_rows: int = 200
) -> dict:
    config = model.config
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, config.speech_token_range[0], (prompt_rows + config.channels - 1,), generator=g)
    ids = torch.full((batch, prompt_rows + config.channels - 1, config.channels), config.speech_pad_token)
    ids[:, :, 0] = text
    mask = torch.ones(ids.shape[:2], dtype=torch.long)
    frames = int(seconds * FRAME_RATE)
    settings = GenerationConfig(max_new_tokens=frames - config.channels + 1)
    ids, mask = ids.to(device), mask.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = generate(model, ids, mask, settings, engine=engine, check_every=16)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    generated = out.sequences.shape[1] - out.prompt_rows
    return {
        "engine": engine,
        "batch": batch,
        "frames": generated * batch,
        "wall_s": wall,
        "frames_per_s": generated * batch / wall,
        "rtf": wall / (generated / FRAME_RATE),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "real"], choices=["tiny", "real"])
    parser.add_argument("--seconds", nargs="+", type=float, default=[30.0])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--engines", nargs="+", default=None, choices=ENGINES, help="default: all this device runs")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--profile", action="store_true", help="print the Python functions of a 5 s run by time")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    engines = args.engines or [e for e in ENGINES if e not in ("graph", "compiled") or device.type == "cuda"]
    results = {}
    for size in args.sizes:
        config = MossTTSDConfig.tiny() if size == "tiny" else MossTTSDConfig.v05()
        with torch.device(device):
            model = MossTTSD(config, attn_implementation="sdpa").to(dtype).eval()
        wrapped = SpeechOnly(model)
        if args.profile:
            import cProfile
            import pstats

            with cProfile.Profile() as profiler:
                measure(wrapped, 5.0, device)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
        for seconds, batch, engine in itertools.product(args.seconds, args.batch, engines):
            key = f"{size} {seconds:g} s b{batch} {engine}"
            try:
                measure(wrapped, seconds, device, engine, batch)  # warm-up: kernels, allocator, graph captures
                results[key] = measure(wrapped, seconds, device, engine, batch)
            except torch.OutOfMemoryError as err:
                results[key] = {"engine": engine, "batch": batch, "error": str(err).splitlines()[0][:160]}
            if "error" not in results[key] and f"{size} {seconds:g} s b{batch} dynamic" in results:
                base = results[f"{size} {seconds:g} s b{batch} dynamic"]["frames_per_s"]
                results[key]["vs_dynamic"] = results[key]["frames_per_s"] / base
            print("RESULT " + json.dumps({key: results[key]}), flush=True)
        model.__dict__.pop("_static_decoder", None)
        wrapped.__dict__.pop("_static_decoder", None)
        del model, wrapped
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\nMOSS-TTSD generation, greedy, {name}, {str(dtype).replace('torch.', '')}")
    print(f"{'model / speech / batch / engine':<32}{'frames':>8}{'wall s':>9}{'frames/s':>10}{'RTF':>8}{'vs dyn':>8}")
    for key, r in results.items():
        if "error" in r:
            print(f"{key:<32} {r['error']}")
            continue
        ratio = f"{r['vs_dynamic']:.2f}x" if "vs_dynamic" in r else ""
        print(f"{key:<32}{r['frames']:>8}{r['wall_s']:>9.2f}{r['frames_per_s']:>10.1f}{r['rtf']:>8.3f}{ratio:>8}")
    print("\nRESULT " + json.dumps({"device": name, "dtype": str(dtype), "results": results}))


if __name__ == "__main__":
    main()
