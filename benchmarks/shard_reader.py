"""The bounded tar reader (moss/data/tar_reader.py) against WebDataset's tarfile reader, on the same shards.

Writes `--samples` samples of the reference length distribution (as benchmarks/packing.py) into shards, then
reads every sample of every shard with each reader, `--repeats` times, and prints samples/s and MB/s of each
and their ratio (best of the repeats), then one `RESULT {json}` line.

Usage: python benchmarks/shard_reader.py [--samples 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/shard_reader.py` from anywhere
from benchmarks.packing import reference_samples  # noqa: E402
from moss.data import tar_reader  # noqa: E402
from moss.data.writer import write_shards  # noqa: E402
from moss.text.tiny_tokenizer import build_tiny_tokenizer  # noqa: E402


def read_all(urls: list[str], reader: str) -> int:
    count = 0
    for url in urls:
        if reader == "bounded":
            samples = tar_reader.samples(url)
        else:
            samples = wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples())
        count += sum(1 for _ in samples)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    samples = reference_samples(args.samples, build_tiny_tokenizer(), np.random.default_rng(0))
    with tempfile.TemporaryDirectory() as folder:
        write_shards(samples, folder, prefix="bench", max_samples=250)
        urls = sorted(str(p) for p in Path(folder).glob("*.tar"))
        megabytes = sum(Path(u).stat().st_size for u in urls) / 1e6
        results = {}
        for reader in ("webdataset", "bounded"):
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                assert read_all(urls, reader) == len(samples)
                best = min(best, time.perf_counter() - start)
            results[reader] = {"samples_per_s": len(samples) / best, "mb_per_s": megabytes / best}
    ratio = results["bounded"]["samples_per_s"] / results["webdataset"]["samples_per_s"]
    for reader, r in results.items():
        print(f"{reader:<11} {r['samples_per_s']:>10.0f} samples/s {r['mb_per_s']:>8.0f} MB/s")
    print(f"bounded / webdataset: {ratio:.2f}x ({len(urls)} shards, {megabytes:.0f} MB)")
    print("RESULT " + json.dumps({"readers": results, "ratio_bounded_vs_webdataset": ratio}))


if __name__ == "__main__":
    main()
