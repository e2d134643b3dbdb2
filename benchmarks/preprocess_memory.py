"""Peak memory of a preprocessing run on long audio, for several `records_per_shard`, measured in one run.

Each run encodes `--records` records of `--minutes` minutes (16 kHz WAV, the tiny random codec: the memory
of loading, batching and writing, not of a real codec's activations) into one shard, in a fresh process.
The encoder process should hold at most one `batch_seconds` batch plus a few loaded records whatever the
shard size, so its peak stays flat as `records_per_shard` grows. Prints one `RESULT {json}` line.

Usage: python benchmarks/preprocess_memory.py [--records 1000] [--minutes 10] [--small 10] [--batch-seconds 600]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml
from safetensors.torch import save_file

from moss.codec import XYTokenizer, XYTokenizerConfig

REPO = Path(__file__).resolve().parents[1]


def corpus(folder: Path, records: int, minutes: float, files: int = 8) -> Path:
    """`records` JSONL lines over `files` distinct long WAV files (reused: disk, not memory, is the limit)."""
    rng = np.random.default_rng(0)
    for i in range(files):
        wave = (0.1 * rng.standard_normal(int(minutes * 60 * 16000))).astype(np.float32)
        sf.write(folder / f"long{i}.wav", wave, 16000, subtype="PCM_16")
    text = "[S1]" + "words spoken here " * int(minutes * 20)
    lines = [json.dumps({"file_path": f"long{i % files}.wav", "full_transcript": text}) for i in range(records)]
    (folder / "in.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "in.jsonl"


def codec(folder: Path) -> tuple[Path, Path]:
    config = XYTokenizerConfig.tiny()
    (folder / "codec.yaml").write_text(yaml.safe_dump({"generator_params": config.params}))
    model = XYTokenizer.from_config(config, seed=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "codec.safetensors"))
    return folder / "codec.yaml", folder / "codec.safetensors"


def run(jsonl: Path, codec_files, out: Path, records: int, workers: int, batch_seconds: float) -> dict:
    args = [
        sys.executable,
        "-m",
        "data_pipelines.preprocess",
        f"inputs=[{jsonl}]",
        f"output_dir={out}",
        f"codec.config={codec_files[0]}",
        f"codec.checkpoint={codec_files[1]}",
        "devices=cpu",
        f"cpu_workers={workers}",
        f"records_per_shard={records}",
        f"limit={records}",
        f"batch_seconds={batch_seconds}",
        "limits.max_chars_per_second=1000",
        "progress=false",
    ]
    start = time.perf_counter()
    text = subprocess.run(args, cwd=REPO, check=True, capture_output=True, text=True).stdout
    main, children = map(float, re.search(r"peak memory: (\d+) MB .*?, (\d+) MB", text).groups())
    return {"records": records, "wall_s": time.perf_counter() - start, "main_mb": main, "loader_mb": children}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--small", type=int, default=10, help="records of the comparison run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-seconds", type=float, default=600, help="audio per encoding round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        jsonl = corpus(folder, args.records, args.minutes)
        files = codec(folder)
        rows = [
            run(jsonl, files, folder / f"out{n}", n, args.workers, args.batch_seconds)
            for n in (args.small, args.records)
        ]
    print(f"\nrecords of {args.minutes:g} min, one shard each run, {args.workers} loader processes")
    print(f"{'records':>8}{'wall s':>9}{'audio h':>9}{'encoder MB':>12}{'loader MB':>11}")
    for r in rows:
        hours = r["records"] * args.minutes / 60
        print(f"{r['records']:>8}{r['wall_s']:>9.0f}{hours:>9.1f}{r['main_mb']:>12.0f}{r['loader_mb']:>11.0f}")
    growth = rows[1]["main_mb"] / rows[0]["main_mb"]
    print(f"encoder peak, {args.records} / {args.small} records per shard: {growth:.2f}x")
    print("\nRESULT " + json.dumps({"minutes": args.minutes, "runs": rows, "growth": growth}))


if __name__ == "__main__":
    main()
