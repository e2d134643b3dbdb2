"""Statistics of a shard set from its manifests and skip reports (no tar is opened).

python -m data_pipelines.inspect_shards dir=/data/shards
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from moss.audio import FRAME_RATE
from moss.cli import command, run

EDGES_SECONDS = (0, 5, 10, 30, 60, 120, 300, 600, 960, 1700, float("inf"))


def shard_set_stats(folder: str | Path) -> dict:
    """Samples, hours, shards, a duration histogram and skip counts of the shard set in `folder`.

    Raises:
        FileNotFoundError: no manifest in `folder`.
    """
    folder = Path(folder)
    manifests = sorted(folder.glob("manifest*.json"))
    if not manifests:
        raise FileNotFoundError(f"no manifest*.json in {folder}; is it a shard set written by data_pipelines?")
    shards, frames = [], []
    for manifest in manifests:
        for entry in json.loads(manifest.read_text())["shards"]:
            shards.append(entry["shard"])
            frames.extend(entry.get("sample_frames", []))
    reasons: Counter = Counter()
    for report in sorted(folder.glob("skipped*.jsonl")):
        for line in report.read_text().splitlines():
            reasons[json.loads(line)["reason"].split(" (")[0]] += 1
    seconds = np.asarray(frames, dtype=np.float64) / FRAME_RATE
    counts, _ = np.histogram(seconds, bins=np.asarray(EDGES_SECONDS))
    return {
        "shards": len(shards),
        "samples": len(frames),
        "hours": float(seconds.sum() / 3600),
        "mean_seconds": float(seconds.mean()) if len(frames) else 0.0,
        "histogram": {
            f"{lo:g}-{hi:g} s": int(n) for lo, hi, n in zip(EDGES_SECONDS, EDGES_SECONDS[1:], counts, strict=False)
        },
        "skipped": dict(reasons),
    }


def render(stats: dict) -> str:
    """The statistics as a printable table with a text histogram."""
    lines = [
        f"shards:  {stats['shards']}",
        f"samples: {stats['samples']}  ({stats['hours']:.2f} h, mean {stats['mean_seconds']:.1f} s)",
        "duration histogram:",
    ]
    peak = max(stats["histogram"].values(), default=0) or 1
    lines += [f"  {label:>12} {n:>8}  {'#' * round(40 * n / peak)}" for label, n in stats["histogram"].items()]
    lines.append("skipped: " + (", ".join(f"{r}: {n}" for r, n in stats["skipped"].items()) or "none"))
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="inspect_shards")
@command
def main(cfg: DictConfig) -> None:
    """Hydra entry point: `python -m data_pipelines.inspect_shards dir=...`."""
    print(render(shard_set_stats(cfg.dir)))


if __name__ == "__main__":
    run(main, Path(__file__).parents[1] / "conf", "inspect_shards")
