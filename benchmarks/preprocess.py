"""Preprocessing throughput: the CPU stage with 1 vs N workers, and with `--encoder`, the codec and the whole run.

The CPU stage validates a record, decodes its audio (soundfile), down-mixes and resamples it to 16 kHz
(torchaudio) -- the work that feeds the encoders. Input: generated stereo 44.1 kHz FLAC dialogues.
Reports audio hours per wall-clock hour and the N/1 ratio. With `--encoder DEVICE` (cpu, cuda, cuda:1),
also: the codec encoder alone on the same audio (a random real-size XY-Tokenizer, or `--tiny-codec`; median
of two passes after a warm-up), and `data_pipelines.preprocess` end to end on that device with N loader
workers, naming the bottleneck (the slower of the two stages) and how close the whole run comes to it.
One `RESULT {json}` line at the end.

Usage: python benchmarks/preprocess.py [--files 48] [--seconds 20] [--workers 2] [--encoder cuda] [--tiny-codec]
    [--codec-dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from data_pipelines.preprocess import _init_loader, _load
from data_pipelines.records import Limits, Loaded, RecordIndex
from data_pipelines.workers import WorkerPool


def make_corpus(folder: Path, files: int, seconds: float) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(files):
        t = np.arange(int(seconds * 44100)) / 44100
        left = 0.3 * np.sin(2 * math.pi * (150 + i) * t) + 0.02 * rng.standard_normal(t.shape)
        right = 0.3 * np.sin(2 * math.pi * (210 + i) * t) + 0.02 * rng.standard_normal(t.shape)
        sf.write(folder / f"d{i}.flac", np.stack([left, right], axis=1).astype(np.float32), 44100)
        lines.append(json.dumps({"file_path": f"d{i}.flac", "full_transcript": "[S1]" + "hello there " * 20}))
    (folder / "in.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "in.jsonl"


def measure(jsonl: Path, workers: int) -> tuple[float, int]:
    """Wall time and 16 kHz samples of loading every record through the pipeline's own worker pool."""
    records = RecordIndex([str(jsonl)])
    tasks = [(r, Limits()) for r in records.take(range(len(records)))]
    pool = WorkerPool(_load, workers, mp.get_context("fork"), initializer=_init_loader)
    try:
        list(pool.map_unordered(tasks[:workers]))  # workers are up and warm before the clock starts
        start = time.perf_counter()
        results = [r for _, r in pool.map_unordered(tasks)]
        wall = time.perf_counter() - start
    finally:
        pool.close()
    samples = sum(r.samples for r in results if isinstance(r, Loaded))
    return wall, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--encoder", default=None, help="also time the codec and the whole run on this device")
    parser.add_argument("--tiny-codec", action="store_true", help="tiny codec widths (a smoke run)")
    parser.add_argument("--codec-dtype", default="float32")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = make_corpus(Path(tmp), args.files, args.seconds)
        rows = {}
        for workers in (1, args.workers):
            wall, samples = measure(jsonl, workers)
            hours = samples / 16000 / 3600
            rows[workers] = {"wall_s": wall, "audio_hours_per_hour": hours / (wall / 3600)}
    ratio = rows[args.workers]["audio_hours_per_hour"] / rows[1]["audio_hours_per_hour"]
    print(f"\nCPU stage (decode + down-mix + resample 44.1k stereo FLAC -> 16k mono), {args.files} x {args.seconds} s")
    print(f"{'workers':>8}{'wall s':>10}{'audio h / h':>14}")
    for workers, r in rows.items():
        print(f"{workers:>8}{r['wall_s']:>10.2f}{r['audio_hours_per_hour']:>14.0f}")
    print(f"{args.workers} workers / 1 worker: {ratio:.2f}x")
    result = {"workers": args.workers, "ratio": ratio, **{f"w{k}": v for k, v in rows.items()}}
    if args.encoder:
        with tempfile.TemporaryDirectory() as tmp:
            result["pipeline"] = pipeline(Path(tmp), args, rows[args.workers]["audio_hours_per_hour"])
    print("\nRESULT " + json.dumps(result))


def pipeline(folder: Path, args, cpu_rate: float) -> dict:
    """Encoder alone and the whole preprocessing run on `args.encoder`, in audio hours per hour."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from data_pipelines.preprocess import preprocess, preprocess_config
    from moss.codec import XYTokenizer, XYTokenizerConfig

    config = XYTokenizerConfig.tiny() if args.tiny_codec else XYTokenizerConfig.real()
    codec = XYTokenizer.from_config(config, seed=0)
    (folder / "codec.yaml").write_text(json.dumps({"generator_params": config.params}))  # YAML is a JSON superset
    save_file({k: v.contiguous() for k, v in codec.state_dict().items()}, str(folder / "codec.safetensors"))
    codec = codec.to(args.encoder)
    dtype = None if args.codec_dtype == "float32" else getattr(torch, args.codec_dtype)
    clips = [torch.randn(int(args.seconds * 16000)) * 0.1 for _ in range(args.files)]
    timings = []
    for _ in range(3):  # a warm-up, then two timed passes
        start = time.perf_counter()
        codec.encode(clips, batch_size=16, dtype=dtype)
        if codec.device.type == "cuda":
            torch.cuda.synchronize(codec.device)
        timings.append(time.perf_counter() - start)
    hours = args.files * args.seconds / 3600
    encoder_rate = hours / (statistics.median(timings[1:]) / 3600)
    (folder / "corpus").mkdir()
    jsonl = make_corpus(folder / "corpus", args.files, args.seconds)
    device = "cpu" if args.encoder == "cpu" else [torch.device(args.encoder).index or 0]
    codec_cfg = OmegaConf.create(
        {"config": str(folder / "codec.yaml"), "checkpoint": str(folder / "codec.safetensors"), "name": "bench"}
    )
    cfg = preprocess_config(
        [jsonl],
        folder / "shards",
        codec_cfg,
        devices=device,
        cpu_workers=args.workers,
        progress=False,
        codec_dtype=args.codec_dtype,
    )
    start = time.perf_counter()
    done = preprocess(cfg)
    whole = hours / ((time.perf_counter() - start) / 3600)
    bottleneck = "CPU loaders" if cpu_rate < encoder_rate else "codec encoder"
    out = {
        "encoder_audio_hours_per_hour": encoder_rate,
        "end_to_end_audio_hours_per_hour": whole,
        "samples": done["samples"],
        "bottleneck": bottleneck,
        "end_to_end_vs_bottleneck": whole / min(cpu_rate, encoder_rate),
    }
    rates = f"encoder alone ({args.encoder}, {args.codec_dtype}): {encoder_rate:.0f} audio h / h"
    print(f"{rates}; CPU stage ({args.workers} workers): {cpu_rate:.0f}")
    share = out["end_to_end_vs_bottleneck"]
    print(f"end to end: {whole:.0f} audio h / h ({done['samples']} samples); bottleneck: {bottleneck} ({share:.0%})")
    return out


if __name__ == "__main__":
    main()
