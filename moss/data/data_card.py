"""A data card per run: what the training and validation sets contain, written and printed before training.

`runs/<name>/data_card.json` holds per split (`train`, or `train/<source>` per source of `data.sources`; `val`) the
totals from the manifests (shards, samples, hours: exact, whatever the size of the set) and, from up to
`max_samples` samples read evenly across the shards, estimates: hours per speaker tag and turn lengths (a sample's
duration shared among its turns by their text units), the speaking rate (text units per second: words, or
characters of Chinese, Japanese and Korean), the share the training checks would leave out (over the row limit,
malformed), and the overlap of validation with training (the same audio codes or the same normalised transcript).
Warnings go to the log and the card: validation that overlaps training, a split that is mostly left out.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from moss.audio import FRAME_RATE
from moss.data.dataset import expand_shards, manifest_entries
from moss.data.examples import ExampleBuilder, OverLongSample
from moss.data.schema import SampleError, ShardSample
from moss.data.stages import tar_samples
from moss.evaluation.metrics import scoring_units
from moss.evaluation.turns import script_turns
from moss.outputs import atomic_write

log = logging.getLogger(__name__)
TURN_SECONDS = (0, 1, 2, 5, 10, 20, 30, 60)  # histogram bin edges (the last bin is open)
UNITS_PER_SECOND = (0, 1, 2, 3, 4, 5, 6, 8, 10)
MOSTLY_LEFT_OUT = 0.5


def data_card(splits: dict[str, object], builder: ExampleBuilder, max_samples: int = 2000) -> dict:
    """The card of shard sets `splits` (name -> shard spec), checked with the run's `builder`."""
    card, hashes = {"max_samples": max_samples, "splits": {}, "warnings": []}, {}
    for name, spec in splits.items():
        if not spec:
            continue
        source = name.partition("/")[2]  # train/<source>: one of data.sources
        urls = expand_shards(spec, f"data.sources.{source}.shards" if source else f"data.{name}_shards")
        summary, hashes[name] = _split_card(urls, builder, max_samples)
        card["splits"][name] = summary
        left = summary["read"]["left_out_share"]
        if left is not None and left > MOSTLY_LEFT_OUT:
            card["warnings"].append(
                f"{name}: {left:.0%} of the samples read would be left out ({dict(summary['read']['left_out'])}); "
                f"see the row limit (data.packing.budget / data.max_rows) and data_report/"
            )
    train = [h for name, h in hashes.items() if name == "train" or name.startswith("train/")]
    if train and "val" in hashes:
        seen = {kind: set().union(*(h[kind] for h in train)) for kind in ("audio", "transcript")}
        overlap = {kind: len(hashes["val"][kind] & seen[kind]) for kind in ("audio", "transcript")}
        card["val_overlaps_train"] = overlap
        if any(overlap.values()):
            read = card["splits"]["val"]["read"]["samples"]
            card["warnings"].append(
                f"validation overlaps training: of {read} validation samples read, {overlap['audio']} have the same "
                f"audio codes and {overlap['transcript']} the same transcript as a training sample read; val/loss "
                f"flatters the model by as much as they weigh"
            )
    return card


def _split_card(urls: list[str], builder: ExampleBuilder, max_samples: int) -> tuple[dict, dict]:
    entries = manifest_entries(urls)
    totals = {"shards": len(urls)}
    if entries is not None:
        frames = sum(int(e.get("frames", 0)) for e in entries)
        samples = sum(int(e.get("samples", 0)) for e in entries)
        totals.update(samples=samples, hours=round(frames / FRAME_RATE / 3600, 4))
    speaker_seconds, turn_lengths, rates, left_out = Counter(), [], [], Counter()
    hashes = {"audio": set(), "transcript": set()}
    read = 0
    per_shard = totals["samples"] / len(urls) if entries is not None and urls else None
    for sample in _spread_samples(urls, max_samples, left_out, per_shard):
        read += 1
        try:
            builder(sample)
        except OverLongSample:
            left_out["over the row limit"] += 1
        except SampleError:
            left_out["malformed"] += 1
        seconds = sample.frames / FRAME_RATE
        turns = script_turns(sample.text)
        units = [len(scoring_units(t.text)) for t in turns]
        for turn, count in zip(turns, units, strict=True):
            share = seconds * count / max(1, sum(units))
            speaker_seconds[f"S{turn.speaker}" if turn.speaker else "untagged"] += share
            turn_lengths.append(share)
        if seconds > 0:
            rates.append(sum(units) / seconds)
        hashes["audio"].add(hashlib.sha1(np.ascontiguousarray(sample.codes).tobytes()).hexdigest())
        hashes["transcript"].add(" ".join(scoring_units(sample.text)))
    skipped = sum(left_out.values())
    estimates = {
        "samples": read,
        "left_out": dict(left_out),
        "left_out_share": round(skipped / (read + left_out["unreadable"]), 4) if read else None,
        "hours_per_speaker": {k: round(v / 3600, 4) for k, v in sorted(speaker_seconds.items())},
        "turn_seconds": _histogram(turn_lengths, TURN_SECONDS),
        "units_per_second": _histogram(rates, UNITS_PER_SECOND),
        "median_units_per_second": round(float(np.median(rates)), 3) if rates else None,
    }
    return {**totals, "read": estimates}, hashes


def _spread_samples(urls: list[str], count: int, left_out: Counter, per_shard: float | None):
    """Up to `count` samples from shards spread evenly over the set (every k-th shard, read whole)."""
    if count <= 0:
        return
    shards_needed = -(-count // max(1, int(per_shard))) if per_shard else len(urls)
    step, taken = max(1, len(urls) // max(1, shards_needed)), 0
    for url in urls[::step]:
        for raw in tar_samples(url, handler=lambda err: True):
            try:
                sample = ShardSample.from_wds(raw).validate()
            except SampleError:
                left_out["unreadable"] += 1
                continue
            yield sample
            taken += 1
            if taken >= count:
                return


def _histogram(values: list[float], edges: tuple) -> dict[str, int]:
    labels = [f"{a}-{b}" for a, b in zip(edges, edges[1:], strict=False)] + [f"{edges[-1]}+"]
    counts = np.histogram(values, bins=[*edges, float("inf")])[0] if values else [0] * len(labels)
    return dict(zip(labels, (int(c) for c in counts), strict=True))


def write_data_card(card: dict, path: Path) -> Path:
    """Write the card (atomically), log its summary and warnings; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(card, indent=1) + "\n"))
    for name, split in card["splits"].items():
        read = split["read"]
        log.info(
            "data %s: %s shards, %s samples, %s h; hours per speaker %s; %.0f%% of %d read would be left out",
            name,
            split["shards"],
            split.get("samples", "?"),
            split.get("hours", "?"),
            read["hours_per_speaker"],
            100 * (read["left_out_share"] or 0),
            read["samples"],
        )
    for warning in card["warnings"]:
        log.warning("data card: %s", warning)
    return path
