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


class ShardSetWriter:
    """Write samples into `{prefix}-{index:06d}.tar` shards of at most `max_samples` samples / `max_bytes`.

    A shard is written to `<name>.tmp` and renamed when closed, so a crash never leaves a truncated shard
    under a final name. `close()` writes `manifest.json` listing every shard with its sample and frame counts.
    """

    def __init__(self, out_dir: str | Path, prefix: str = "shard", max_samples: int = 1000, max_bytes: int = 2**30):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_samples, self.max_bytes = prefix, max_samples, max_bytes
        self.shards: list[dict] = []
        self._tar = None
        self._index = 0

    def _open(self) -> None:
        name = f"{self.prefix}-{self._index:06d}.tar"
        self._path = self.out_dir / name
        self._stream = open(str(self._path) + ".tmp", "wb")
        self._tar = wds.TarWriter(self._stream, encoder=False, mtime=0.0)
        self._entry = {"shard": name, "samples": 0, "frames": 0}
        self._bytes = 0

    def _finish(self) -> None:
        self._tar.close()
        self._stream.close()  # TarWriter leaves file objects it did not open to the caller
        os.replace(str(self._path) + ".tmp", self._path)
        self.shards.append(self._entry)
        self._tar = None
        self._index += 1

    def write(self, sample: ShardSample) -> None:
        record = sample.to_wds()
        if self._tar is None:
            self._open()
        self._tar.write(record)
        self._entry["samples"] += 1
        self._entry["frames"] += sample.frames
        self._bytes += sum(len(v) for k, v in record.items() if not k.startswith("__"))
        if self._entry["samples"] >= self.max_samples or self._bytes >= self.max_bytes:
            self._finish()

    def close(self) -> Path:
        """Finish the open shard and write the manifest; returns the manifest path."""
        if self._tar is not None:
            self._finish()
        manifest = {
            "shards": self.shards,
            "samples": sum(s["samples"] for s in self.shards),
            "frames": sum(s["frames"] for s in self.shards),
        }
        path = self.out_dir / MANIFEST
        path.write_text(json.dumps(manifest, indent=2) + "\n")
        return path

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
