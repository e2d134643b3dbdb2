"""XY-Tokenizer speed: encode and decode per batch size and precision, real-size architecture, random weights.

Audio seconds processed per wall-clock second, the median of `--passes` passes over the same clips, each
case after a warm-up pass of its own (same clips, batch size and precision, so kernel plans and allocator
state are built before the clock starts). Clips vary in length (0.8x-1.2x of `--seconds`), as real audio
does; batches group clips of similar length. Also reported: whether batching changes any code (it must not),
and how many codes bfloat16 autocast keeps equal to float32 (all codebooks, and codebook 0).
Prints a table, a `RESULT` line per case and a final `RESULT {json}` line.

Usage: python benchmarks/codec.py [--device cpu|cuda] [--clips 32] [--seconds 10] [--batch 1 16] [--passes 3]
    [--dtypes float32 bfloat16] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
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


def timed(fn, device: str, passes: int):
    """`fn()` once untimed (warm-up), then the median wall time of `passes` runs; returns (result, seconds)."""
    result = fn()
    times = []
    for _ in range(passes):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def agreement(codes: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float]:
    """Fraction of codes equal to the reference: all codebooks, and codebook 0."""
    a, b = torch.cat(codes).cpu(), torch.cat(reference).cpu()
    return float((a == b).float().mean()), float((a[:, 0] == b[:, 0]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: float32, and bfloat16 on CUDA")
    parser.add_argument("--tiny", action="store_true", help="tiny widths (a smoke run)")
    args = parser.parse_args()
    dtypes = args.dtypes or (["float32", "bfloat16"] if args.device == "cuda" else ["float32"])
    torch.manual_seed(0)
    config = XYTokenizerConfig.tiny() if args.tiny else XYTokenizerConfig.real()
    codec = XYTokenizer.from_config(config, seed=0).to(args.device)
    params = sum(p.numel() for p in codec.parameters())
    audio = clips(args.clips, args.seconds)
    total = sum(a.numel() for a in audio) / 16000
    result = {"device": args.device, "params": params, "audio_seconds": total, "cases": {}}
    reference = None  # float32 codes at the first batch size
    for name in dtypes:
        dtype = None if name == "float32" else getattr(torch, name)
        for batch in args.batch:
            codes, enc_s = timed(
                lambda b=batch, d=dtype: codec.encode(audio, batch_size=b, dtype=d), args.device, args.passes
            )
            _, dec_s = timed(
                lambda b=batch, c=codes, d=dtype: codec.decode(c, batch_size=b, dtype=d), args.device, args.passes
            )
            reference = reference or codes
            same, same0 = agreement(codes, reference)
            case = {
                "dtype": name,
                "batch": batch,
                "encode_audio_s_per_s": total / enc_s,
                "decode_audio_s_per_s": total / dec_s,
            }
            case.update({"codes_equal_float32_batch1": same, "codebook0_equal": same0})
            result["cases"][f"{name} b{batch}"] = case
            print("RESULT " + json.dumps({f"{name} b{batch}": case}), flush=True)
    what = f"{args.clips} clips, {total:.1f} s of audio"
    print(f"\nXY-Tokenizer ({params / 1e6:.0f} M params, random weights) on {args.device}: {what}")
    print(f"{'case':<16}{'encode audio-s/s':>18}{'decode audio-s/s':>18}{'codes = ref':>13}{'cb0 = ref':>11}")
    for key, c in result["cases"].items():
        print(
            f"{key:<16}{c['encode_audio_s_per_s']:>18.1f}{c['decode_audio_s_per_s']:>18.1f}"
            f"{c['codes_equal_float32_batch1']:>13.4f}{c['codebook0_equal']:>11.4f}"
        )
    first, last = f"{dtypes[0]} b{args.batch[0]}", f"{dtypes[0]} b{args.batch[-1]}"
    for kind in ("encode", "decode"):
        speedup = result["cases"][last][f"{kind}_audio_s_per_s"] / result["cases"][first][f"{kind}_audio_s_per_s"]
        result[f"{kind}_batch_speedup"] = speedup
    print(
        f"batch {args.batch[-1]} / batch {args.batch[0]} ({dtypes[0]}): encode {result['encode_batch_speedup']:.2f}x, "
        f"decode {result['decode_batch_speedup']:.2f}x"
    )
    print("\nRESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
