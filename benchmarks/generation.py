"""Generation speed: frames/s and real-time factor for 30 s and 300 s of speech, tiny and real-size models.

Random weights would end speech at once, so channel 0 is kept inside the speech range (a wrapper masks the
other logits) until the requested number of frames is generated: each step then costs exactly what a real
one does (one row of 8 channels, 12.5 frames per second of audio). Greedy decoding, KV cache, batch 1 after
a 200-row text prompt. The real-time factor is wall time / audio time (below 1 is faster than real time).

Usage: python benchmarks/generation.py [--device cpu|cuda] [--sizes tiny real] [--seconds 30 300] [--dtype ...]
Prints a table and a final `RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from moss.audio import FRAME_RATE
from moss.generation import GenerationConfig, generate
from moss.model import MossTTSD, MossTTSDConfig


class SpeechOnly(nn.Module):
    """Wraps a MossTTSD so that channel 0 can only pick codebook-0 codes (speech goes on until max_new_tokens)."""

    def __init__(self, model: MossTTSD):
        super().__init__()
        self.inner, self.config, self.model = model, model.config, model.model
        self.lo, self.hi = model.config.speech_token_range

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        first = out.logits[0].clone()
        first[..., : self.lo] = -torch.inf
        first[..., self.hi :] = -torch.inf
        out.logits = (first, *out.logits[1:])
        return out


def measure(model: SpeechOnly, seconds: float, device: torch.device, prompt_rows: int = 200) -> dict:
    config = model.config
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, config.speech_token_range[0], (prompt_rows + config.channels - 1,), generator=g)
    ids = torch.full((1, prompt_rows + config.channels - 1, config.channels), config.speech_pad_token)
    ids[0, :, 0] = text
    mask = torch.ones(ids.shape[:2], dtype=torch.long)
    frames = int(seconds * FRAME_RATE)
    settings = GenerationConfig(max_new_tokens=frames - config.channels + 1)
    ids, mask = ids.to(device), mask.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = generate(model, ids, mask, settings)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    generated = out.sequences.shape[1] - out.prompt_rows
    return {
        "frames": generated,
        "wall_s": wall,
        "frames_per_s": generated / wall,
        "rtf": wall / (generated / FRAME_RATE),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "real"], choices=["tiny", "real"])
    parser.add_argument("--seconds", nargs="+", type=float, default=[30.0, 300.0])
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--profile", action="store_true", help="print the Python functions of a 5 s run by time")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    results = {}
    for size in args.sizes:
        config = MossTTSDConfig.tiny() if size == "tiny" else MossTTSDConfig.v05()
        with torch.device(device):
            model = MossTTSD(config, attn_implementation="sdpa").to(dtype).eval()
        wrapped = SpeechOnly(model)
        measure(wrapped, 1.0, device)  # warm-up: kernels, allocator
        if args.profile:
            import cProfile
            import pstats

            with cProfile.Profile() as profiler:
                measure(wrapped, 5.0, device)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
        for seconds in args.seconds:
            key = f"{size} {seconds:g} s"
            results[key] = measure(wrapped, seconds, device)
            print(f"{key}: {results[key]}", flush=True)
        del model, wrapped
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\nMOSS-TTSD generation, greedy, KV cache, batch 1, {name}, {str(dtype).replace('torch.', '')}")
    print(f"{'model / speech':<18}{'frames':>8}{'wall s':>9}{'frames/s':>10}{'RTF':>8}")
    for key, r in results.items():
        print(f"{key:<18}{r['frames']:>8}{r['wall_s']:>9.1f}{r['frames_per_s']:>10.1f}{r['rtf']:>8.3f}")
    print("\nRESULT " + json.dumps({"device": name, "dtype": str(dtype), "results": results}))


if __name__ == "__main__":
    main()
