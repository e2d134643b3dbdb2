"""What reading shards from object storage costs the loader, against the local disk, measured in one run.

The same reference samples (benchmarks/packing.py's length distribution) are written as one shard set on the
local disk and uploaded to a local S3 server (SeaweedFS's `weed`, as in the tests). A loader worker's work, one
pass of packed micro-batches over the set, is timed reading each (best of `--repeats`, alternately): rows/s
and their ratio. Then the retry path: one object read with every `--fail-every`-th ranged request failing once
(a dropped connection), without the waits (the extra requests alone) and with them (what a user waits).

A local server measures our path (ranged requests, retries, the tar reader), not a network: a store across a
network adds its latency per request, which the 8 MiB requests and the reader's read-ahead thread amortise.

Prints both, then one line `RESULT {json}`.

Usage: python benchmarks/object_storage.py [--samples 2000] [--repeats 3] [--budget 16384] [--fail-every 4]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/object_storage.py` from anywhere
from benchmarks.packing import reference_samples  # noqa: E402
from moss.data import storage  # noqa: E402
from moss.data.dataset import ShardStream, expand_shards  # noqa: E402
from moss.data.examples import ExampleBuilder  # noqa: E402
from moss.data.writer import write_shards  # noqa: E402
from moss.text import PromptBuilder  # noqa: E402
from moss.text.tiny_tokenizer import build_tiny_tokenizer  # noqa: E402
from tests.s3 import S3Server  # noqa: E402


def one_pass(urls: list[str], builder: ExampleBuilder, budget: int) -> tuple[float, int]:
    """Seconds and real rows of one pass of packed micro-batches over `urls` (one reader's work)."""
    stream = ShardStream(urls, builder, repeat=False, shuffle=False, packer={"budget": budget})
    start, rows = time.perf_counter(), 0
    for batch in stream:
        rows += int(batch.stats.real_rows)
    return time.perf_counter() - start, rows


def read_with_failures(url: str, fail_every: int, wait: bool) -> tuple[float, int]:
    """Seconds and requests to read `url` whole when every `fail_every`-th request fails once."""
    stream = storage.ObjectStream(url, block=256 << 10)
    real, requests = stream.fs.cat_file, [0]

    def flaky(path, start=None, end=None, **kwargs):
        requests[0] += 1
        if fail_every and requests[0] % fail_every == 0:
            raise ConnectionResetError("dropped by the benchmark")
        return real(path, start=start, end=end, **kwargs)

    stream.fs.cat_file = flaky
    sleep = storage.time.sleep
    storage.time.sleep = sleep if wait else (lambda s: None)
    try:
        begin = time.perf_counter()
        while stream.read(1 << 20):
            pass
        return time.perf_counter() - begin, requests[0]
    finally:
        storage.time.sleep = sleep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=int, default=16384)
    parser.add_argument("--fail-every", type=int, default=4)
    args = parser.parse_args()
    tokenizer = build_tiny_tokenizer()
    builder = ExampleBuilder(PromptBuilder(tokenizer, speech_offset=384), text_pad_id=368)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        samples = reference_samples(args.samples, tokenizer, np.random.default_rng(0))
        write_shards(samples, folder / "set", prefix="set", max_samples=250)
        server = S3Server(folder / "s3")
        try:
            os.environ.update(server.env)
            server.bucket("bench")
            server.upload(folder / "set", "s3://bench/set")
            local, remote = expand_shards(str(folder / "set")), expand_shards("s3://bench/set/")
            best = {"local disk": float("inf"), "S3 server": float("inf")}
            rows = 0
            for _ in range(args.repeats):
                for name, urls in (("local disk", local), ("S3 server", remote)):
                    seconds, rows = one_pass(urls, builder, args.budget)
                    best[name] = min(best[name], seconds)
            rates = {name: rows / seconds for name, seconds in best.items()}
            ratio = rates["S3 server"] / rates["local disk"]
            print(f"one reader, {len(local)} shards, {rows} rows per pass (best of {args.repeats}):")
            for name, rate in rates.items():
                print(f"  {name:<12} {rate:12,.0f} rows/s")
            print(f"  S3 / local: {ratio:.2f}x")
            logging.getLogger("moss.data.storage").setLevel(logging.ERROR)  # one warning per retry otherwise
            clean, requests = read_with_failures(remote[0], 0, wait=False)
            failing, failed_requests = read_with_failures(remote[0], args.fail_every, wait=False)
            waiting, _ = read_with_failures(remote[0], args.fail_every, wait=True)
            print(
                f"retry path, one {Path(local[0]).stat().st_size / 2**20:.1f} MiB object in 256 KiB requests: "
                f"{clean * 1000:.0f} ms without failures ({requests} requests); every {args.fail_every}th failing "
                f"once: {failing * 1000:.0f} ms without the waits ({failed_requests} requests), "
                f"{waiting * 1000:.0f} ms with them"
            )
        finally:
            server.stop()
    result = {
        "rows_per_s": rates,
        "s3_over_local": ratio,
        "retry": {"clean_s": clean, "failing_no_wait_s": failing, "failing_with_waits_s": waiting},
        "requests": {"clean": requests, "failing": failed_requests},
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
