"""CPU stage of the preprocessing pipeline: 1 vs N worker processes, measured in one run.

The CPU stage validates a record, decodes its audio (soundfile), down-mixes and resamples it to 16 kHz
(torchaudio) -- the work that feeds the encoders. Input: generated stereo 44.1 kHz FLAC dialogues.
Reports audio hours per wall-clock hour and the N/1 ratio, then one `RESULT {json}` line.

Usage: python benchmarks/preprocess.py [--files 48] [--seconds 20] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

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
    print("\nRESULT " + json.dumps({"workers": args.workers, "ratio": ratio, **{f"w{k}": v for k, v in rows.items()}}))


if __name__ == "__main__":
    main()
