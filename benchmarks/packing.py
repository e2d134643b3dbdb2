"""Packing vs padding on the reference length distribution, measured in one run (tiny model, CPU).

Reference distribution (one sample = one dialogue):
    audio duration ~ log-uniform(5 s, 960 s) at 12.5 frames/s  ->  62 .. 12,000 audio frames
    text rows      ~ uniform(60, 400)  (system prompt + transcript + control tokens)
    rows = audio frames + text rows + 1 (end of speech) + 7 (delay pattern)

Prints three tables, then one line `RESULT {json}`:
  1. packing efficiency (real rows / computed rows): best-fit-decreasing packs of 16,384 rows vs the original
     padded batches of 4 (padded to the longest sample of the batch);
  2. training throughput in real frames/s (forward + backward + AdamW step) of the tiny model on the same
     samples: packed (varlen_sdpa) vs padded batch size 4 (sdpa + padding mask) vs batch size 1 (sdpa);
  3. loader throughput from shards to packed micro-batches, in rows/s, 1 worker (in process) and 2 workers.

Usage: python benchmarks/packing.py [--samples 4000] [--train-samples 16] [--budget 16384]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from moss.audio import FRAME_RATE
from moss.data.collate import PaddingCollator
from moss.data.dataset import ShardStream, expand_shards
from moss.data.examples import Example, ExampleBuilder
from moss.data.packing import BestFitPacker, collate_packs
from moss.data.schema import ShardSample
from moss.data.writer import write_shards
from moss.model import MossTTSD, MossTTSDConfig
from moss.model.loss import finetune_channel_weights
from moss.text import PromptBuilder
from moss.text.tiny_tokenizer import TINY_WORDS as WORDS
from moss.text.tiny_tokenizer import build_tiny_tokenizer


def reference_lengths(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    seconds = np.exp(rng.uniform(math.log(5), math.log(960), n))
    return np.maximum(1, np.round(seconds * FRAME_RATE)).astype(int), rng.integers(60, 401, n)


def reference_samples(n: int, tokenizer, rng: np.random.Generator) -> list[ShardSample]:
    """Samples whose prompt grids follow the reference distribution (text sized to hit the text-row target)."""
    frames, text_rows = reference_lengths(n, rng)
    header = len(PromptBuilder(tokenizer, speech_offset=384).head_ids) + 3
    samples = []
    for i, (a, t) in enumerate(zip(frames, text_rows, strict=True)):
        words = rng.choice(WORDS, size=max(1, int(t) - header))
        text = "[S1]" + " ".join(words[: len(words) // 2]) + "[S2]" + " ".join(words[len(words) // 2 :])
        codes = rng.integers(0, 1024, size=(int(a), 8)).astype(np.int16)
        samples.append(ShardSample(f"ref-{i:06d}", codes, text, "benchmark"))
    return samples


NONE = np.zeros((0, 8), np.int32)  # the packer looks at rows only


def efficiency_table(n: int, budget: int, rng: np.random.Generator) -> dict:
    frames, text_rows = reference_lengths(n, rng)
    rows = frames + text_rows + 8
    packer = BestFitPacker(budget)
    packs = [p for r in rows for p in packer.add(Example("", int(r), NONE, NONE))]
    steady = sum(it.rows for p in packs for it in p) / (len(packs) * budget)  # a training stream never ends
    packs += packer.flush()
    packed = rows.sum() / (len(packs) * budget)
    batches = [rows[i : i + 4] for i in range(0, n, 4)]
    padded = rows.sum() / sum(4 * b.max() for b in batches)
    return {
        "samples": n,
        "mean_rows": float(rows.mean()),
        "packed_efficiency": float(steady),
        "packed_efficiency_with_final_flush": float(packed),
        "padded4_efficiency": float(padded),
        "samples_per_pack": n / len(packs),
    }


def train_throughput(examples: list[Example], budget: int) -> dict:
    """Real frames/s of training steps over the same examples, laid out three ways."""
    layouts = {}
    packer = BestFitPacker(budget, window=len(examples), min_fill=0.0)
    packs = [p for e in examples for p in packer.add(e)] + packer.flush()
    layouts["packed (varlen_sdpa)"] = ("varlen_sdpa", [collate_packs([p], budget, 368) for p in packs])
    collate = PaddingCollator(368, max_length=16000)
    layouts["padded bs4 (sdpa)"] = ("sdpa", [collate(examples[i : i + 4]) for i in range(0, len(examples), 4)])
    layouts["bs1 (sdpa)"] = ("sdpa", [collate([e]) for e in examples])
    results = {}
    for name, (attn, batches) in layouts.items():
        model = MossTTSD.from_config(MossTTSDConfig.tiny(), seed=0, attn_implementation=attn)
        model.set_channel_weights(finetune_channel_weights(8))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        real = computed = 0
        start = time.perf_counter()
        for batch in batches:
            out = model(**batch.model_inputs())
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            real += int(batch.stats.real_rows)
            computed += batch.input_ids.shape[0] * batch.input_ids.shape[1]
        wall = time.perf_counter() - start
        results[name] = {
            "steps": len(batches),
            "real_frames_per_s": real / wall,
            "efficiency": real / computed,
            "wall_s": wall,
        }
    return results


def loader_throughput(samples: list[ShardSample], builder: ExampleBuilder, budget: int) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(samples, tmp, prefix="ref", max_samples=max(1, len(samples) // 8))
        urls = expand_shards(tmp)
        for workers in (0, 2):
            stream = ShardStream(
                urls, builder, repeat=False, shuffle=True, seed=0, shuffle_buffer=64, packer={"budget": budget}
            )
            loader = DataLoader(stream, batch_size=None, num_workers=workers)
            start, rows = time.perf_counter(), 0
            for batch in loader:
                rows += int(batch.stats.real_rows)
            wall = time.perf_counter() - start
            results[f"{max(workers, 1)} worker{'s' if workers > 1 else ''}"] = {"rows_per_s": rows / wall, "rows": rows}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4000, help="samples for the efficiency table")
    parser.add_argument("--train-samples", type=int, default=16, help="samples for the training throughput")
    parser.add_argument("--loader-samples", type=int, default=2000, help="samples written to shards for the loader")
    parser.add_argument("--budget", type=int, default=16384)
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    tokenizer = build_tiny_tokenizer()
    builder = ExampleBuilder(PromptBuilder(tokenizer, speech_offset=384), text_pad_id=368, max_rows=args.budget)

    eff = efficiency_table(args.samples, args.budget, rng)
    print(f"\n1. packing efficiency, {eff['samples']} samples, mean {eff['mean_rows']:.0f} rows")
    print(f"   {'layout':<28}{'efficiency':>12}")
    print(f"   {'packed, budget ' + str(args.budget):<28}{eff['packed_efficiency']:>12.2%}  (stream)")
    print(f"   {'  incl. end-of-pass flush':<28}{eff['packed_efficiency_with_final_flush']:>12.2%}")
    print(f"   {'padded, batch size 4':<28}{eff['padded4_efficiency']:>12.2%}")
    print(f"   samples per pack: {eff['samples_per_pack']:.2f}")

    examples = [builder(s) for s in reference_samples(args.train_samples, tokenizer, rng)]
    thr = train_throughput(examples, args.budget)
    base = thr["padded bs4 (sdpa)"]["real_frames_per_s"]
    print(
        f"\n2. training throughput, tiny model, CPU, {len(examples)} samples "
        f"({sum(e.rows for e in examples)} real rows)"
    )
    print(f"   {'layout':<24}{'steps':>7}{'efficiency':>12}{'real frames/s':>15}{'vs padded4':>12}")
    for name, r in thr.items():
        print(
            f"   {name:<24}{r['steps']:>7}{r['efficiency']:>12.2%}{r['real_frames_per_s']:>15.0f}"
            f"{r['real_frames_per_s'] / base:>11.2f}x"
        )

    load = loader_throughput(reference_samples(args.loader_samples, tokenizer, rng), builder, args.budget)
    print(f"\n3. loader: shards -> packed micro-batches ({args.loader_samples} samples)")
    print(f"   {'readers':<12}{'rows/s':>14}{'rows/s per worker':>20}")
    for name, r in load.items():
        per = r["rows_per_s"] / int(name.split()[0])
        print(f"   {name:<12}{r['rows_per_s']:>14.0f}{per:>20.0f}")

    result = {
        "packed_efficiency": eff["packed_efficiency"],
        "padded4_efficiency": eff["padded4_efficiency"],
        "real_frames_per_s": {k: v["real_frames_per_s"] for k, v in thr.items()},
        "packed_over_padded4": thr["packed (varlen_sdpa)"]["real_frames_per_s"] / base,
        "packed_over_bs1": thr["packed (varlen_sdpa)"]["real_frames_per_s"] / thr["bs1 (sdpa)"]["real_frames_per_s"],
        "loader_rows_per_s": {k: v["rows_per_s"] for k, v in load.items()},
    }
    print("\nRESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
