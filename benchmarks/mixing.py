"""What mixing weighted sources (`data.sources`) costs the loader, measured in one run (CPU, in process).

The same reference samples (benchmarks/packing.py's length distribution) are written as two shard sets, then read
into packed micro-batches of `--budget` rows twice, alternately, `--repeats` times (best of each):
  * one source: both sets as one shard list;
  * two sources mixed 0.8 / 0.2 (the `Mixer` stage: a weighted draw per sample, one reader per source).
Each reads `--batches` micro-batches in the process (one loader worker's work). Also times the draw alone
(the mixer over two in-memory sources) as microseconds per sample, beside the same draw by torchdata.nodes'
`MultiNodeWeightedSampler` (the candidate library mixer), whose resume is checked too: its continuation after
a `state_dict` round trip against the uninterrupted one.

Prints rows/s of each and their ratio, then one line `RESULT {json}`.

Usage: python benchmarks/mixing.py [--samples 2000] [--batches 150] [--repeats 3] [--budget 16384]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/mixing.py` from anywhere
from benchmarks.packing import reference_samples  # noqa: E402
from moss.data.dataset import ShardStream, expand_shards  # noqa: E402
from moss.data.examples import ExampleBuilder  # noqa: E402
from moss.data.mixing import Mixer, Source  # noqa: E402
from moss.data.writer import write_shards  # noqa: E402
from moss.text import PromptBuilder  # noqa: E402
from moss.text.tiny_tokenizer import build_tiny_tokenizer  # noqa: E402


def read_rows(sources, builder: ExampleBuilder, budget: int, batches: int) -> tuple[float, int, int]:
    """Seconds, real rows and samples of `batches` packed micro-batches of a training stream over `sources`."""
    stream = ShardStream(
        sources, builder, repeat=True, shuffle=True, seed=0, shuffle_buffer=64, packer={"budget": budget}
    )
    start, rows, samples = time.perf_counter(), 0, 0
    for n, batch in enumerate(stream, 1):
        rows, samples = rows + int(batch.stats.real_rows), samples + batch.stats.num_samples
        if n == batches:
            break
    return time.perf_counter() - start, rows, samples


class InMemory:
    """A stand-in reader: the same item forever (the draw is all that is timed)."""

    def __iter__(self):
        item = ((0, 0, 0), None)
        while True:
            yield item

    def state_dict(self) -> dict:
        return {}


def draw_cost(samples: int) -> float:
    """Microseconds per sample of the mixer's weighted draw."""
    mixer = Mixer([InMemory(), InMemory()], [Source("a", ("-",), 0.8), Source("b", ("-",), 0.2)], seed=0)
    start = time.perf_counter()
    for n, _ in enumerate(mixer, 1):
        if n == samples:
            break
    return (time.perf_counter() - start) / samples * 1e6


def nodes_sampler(seed: int = 0):
    """torchdata.nodes' weighted sampler over two endless in-memory sources, 0.8 / 0.2."""
    import itertools

    import torchdata.nodes as tn

    nodes = {name: tn.IterableWrapper((name, i) for i in itertools.count()) for name in ("a", "b")}
    return tn.MultiNodeWeightedSampler(nodes, {"a": 0.8, "b": 0.2}, "CYCLE_FOREVER", rank=0, world_size=1, seed=seed)


def nodes_draw_cost(samples: int) -> tuple[float, bool]:
    """Microseconds per sample of torchdata.nodes' weighted draw, and whether its resume continues exactly."""
    sampler = nodes_sampler()
    sampler.reset()
    start = time.perf_counter()
    for _ in range(samples):
        next(sampler)
    cost = (time.perf_counter() - start) / samples * 1e6
    sampler = nodes_sampler()
    sampler.reset()
    for _ in range(1000):
        next(sampler)
    state = sampler.state_dict()
    expected = [next(sampler) for _ in range(1000)]
    resumed = nodes_sampler()
    resumed.reset(state)
    return cost, [next(resumed) for _ in range(1000)] == expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=int, default=16384)
    args = parser.parse_args()
    tokenizer = build_tiny_tokenizer()
    builder = ExampleBuilder(PromptBuilder(tokenizer, speech_offset=384), text_pad_id=368, max_rows=args.budget)
    samples = reference_samples(args.samples, tokenizer, np.random.default_rng(0))
    cut = len(samples) // 2
    with tempfile.TemporaryDirectory() as folder:
        for name, part in (("a", samples[:cut]), ("b", samples[cut:])):
            write_shards(part, Path(folder) / name, prefix=name, max_samples=max(1, len(part) // 8))
        a, b = (tuple(expand_shards(str(Path(folder) / name))) for name in ("a", "b"))
        layouts = {
            "one source": [Source("train", a + b)],
            "two sources 0.8/0.2": [Source("a", a, 0.8), Source("b", b, 0.2)],
        }
        best = {name: 0.0 for name in layouts}
        rows_read = {}
        for _ in range(args.repeats):
            for name, sources in layouts.items():
                seconds, rows, count = read_rows(sources, builder, args.budget, args.batches)
                best[name], rows_read[name] = max(best[name], rows / seconds), rows
                mean_rows = rows / count
    draw_us = draw_cost(200_000)
    nodes_us, nodes_exact = nodes_draw_cost(200_000)
    ratio = best["two sources 0.8/0.2"] / best["one source"]
    for name, rate in best.items():
        print(f"{name:<22}{rate:>14,.0f} rows/s  ({rows_read[name]:,} rows in {args.batches} micro-batches)")
    print(f"mixed / one source: {ratio:.3f}x")
    print(
        f"the draw alone: {draw_us:.2f} us per sample = {mean_rows / draw_us * 1e6:,.0f} rows/s "
        f"at {mean_rows:.0f} rows per sample"
    )
    print(
        f"torchdata.nodes MultiNodeWeightedSampler: {nodes_us:.2f} us per sample ({nodes_us / draw_us:.1f}x the "
        f"mixer's); resume continues exactly: {nodes_exact}"
    )
    result = {"rows_per_s": best, "ratio_mixed_vs_one": ratio, "draw_us_per_sample": draw_us, "mean_rows": mean_rows}
    result.update(nodes_draw_us_per_sample=nodes_us, nodes_resume_exact=nodes_exact)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
