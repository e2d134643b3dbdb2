"""Writes shard sets: bounded tar shards, each renamed into place only when complete, plus a manifest.

This is the one writer of the project: the preprocessing pipelines, the built-in tiny corpus and the tests
all go through it, so test data cannot drift from the schema.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds

from moss.data.schema import MANIFEST, ShardSample
from moss.outputs import atomic_write


def write_shard(path: str | Path, samples: Iterable[ShardSample]) -> dict:
    """Write one tar shard atomically (`moss.outputs.atomic_write`), on disk before it has its name.

    The entry is `{"shard", "samples", "frames", "sample_frames"}` (per-sample audio frames, for statistics).
    """
    path, frames = Path(path), []

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as stream:
            tar = wds.TarWriter(stream, encoder=False, mtime=0.0)
            try:
                for sample in samples:
                    tar.write(sample.to_wds())
                    frames.append(sample.frames)
                tar.close()
            except BaseException:
                tar.tarstream.fileobj.closed = True  # discarded: its end is never written (not even at exit)
                raise
            stream.flush()
            os.fsync(stream.fileno())

    atomic_write(path, write)
    return {"shard": path.name, "samples": len(frames), "frames": sum(frames), "sample_frames": frames}


def write_manifest(path: str | Path, entries: list[dict]) -> Path:
    """Write a manifest listing `entries` (atomically), with totals."""
    path = Path(path)
    manifest = {
        "shards": entries,
        "samples": sum(e["samples"] for e in entries),
        "frames": sum(e["frames"] for e in entries),
    }
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1) + "\n"))


class ShardSetWriter:
    """Write samples into `{prefix}-{index:06d}.tar` shards of at most `max_samples` samples.

    `close()` writes `manifest.json` listing every shard with its sample and frame counts.
    """

    def __init__(self, out_dir: str | Path, prefix: str = "shard", max_samples: int = 1000):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_samples = prefix, max_samples
        self.shards: list[dict] = []
        self._pending: list[ShardSample] = []

    def write(self, sample: ShardSample) -> None:
        self._pending.append(sample.validate())
        if len(self._pending) >= self.max_samples:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            name = f"{self.prefix}-{len(self.shards):06d}.tar"
            self.shards.append(write_shard(self.out_dir / name, self._pending))
            self._pending = []

    def close(self) -> Path:
        """Finish the open shard and write the manifest; returns the manifest path."""
        self._flush()
        return write_manifest(self.out_dir / MANIFEST, self.shards)

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_shards(samples: Iterable[ShardSample], out_dir: str | Path, **kwargs) -> Path:
    """Write all `samples` as a shard set in `out_dir`; returns the manifest path."""
    with ShardSetWriter(out_dir, **kwargs) as writer:
        for sample in samples:
            writer.write(sample)
    return Path(out_dir) / MANIFEST
