"""XY-Tokenizer speed: encode and decode, batch 1 vs batch N, real-size architecture with random weights.

Measures audio seconds processed per wall-clock second (real-time factor inverse) on the chosen device.
Prints a table and a final `RESULT {json}` line.

Usage: python benchmarks/codec.py [--device cpu|cuda] [--clips 8] [--seconds 5] [--batch 8] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from moss.codec import XYTokenizer, XYTokenizerConfig


def clips(n: int, seconds: float) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = int(seconds * 16000 * (0.8 + 0.4 * i / max(1, n - 1)))  # 0.8x .. 1.2x: realistic padding
        t = torch.arange(length) / 16000
        out.append(0.3 * torch.sin(2 * math.pi * (150 + 20 * i) * t) + 0.02 * torch.randn(length, generator=g))
    return out


def timed(fn, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="tiny widths (a smoke run)")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = XYTokenizerConfig.tiny() if args.tiny else XYTokenizerConfig.real()
    codec = XYTokenizer.from_config(config, seed=0).to(args.device)
    params = sum(p.numel() for p in codec.parameters())
    audio = clips(args.clips, args.seconds)
    total_seconds = sum(a.numel() for a in audio) / 16000
    codec.encode(audio[:1], batch_size=1)  # warm-up (allocator, kernels)
    rows, result = [], {"device": args.device, "params": params, "audio_seconds": total_seconds}
    for batch in (1, args.batch):
        codes, enc_s = timed(lambda b=batch: codec.encode(audio, batch_size=b), args.device)
        _, dec_s = timed(lambda b=batch, c=codes: codec.decode(c, batch_size=b), args.device)
        rows.append((batch, total_seconds / enc_s, total_seconds / dec_s))
        result[f"encode_audio_s_per_s_batch{batch}"] = total_seconds / enc_s
        result[f"decode_audio_s_per_s_batch{batch}"] = total_seconds / dec_s
    print(
        f"\nXY-Tokenizer ({params / 1e6:.0f} M params, random weights) on {args.device}: "
        f"{args.clips} clips, {total_seconds:.1f} s of audio"
    )
    print(f"{'batch':>6}{'encode audio-s/s':>20}{'decode audio-s/s':>20}")
    for batch, enc, dec in rows:
        print(f"{batch:>6}{enc:>20.2f}{dec:>20.2f}")
    result["encode_batch_speedup"] = rows[1][1] / rows[0][1]
    result["decode_batch_speedup"] = rows[1][2] / rows[0][2]
    print(
        f"batch {args.batch} / batch 1: encode {result['encode_batch_speedup']:.2f}x, "
        f"decode {result['decode_batch_speedup']:.2f}x"
    )
    print("\nRESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
