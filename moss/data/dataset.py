"""Streaming shard sets into delayed training examples.

`ShardStream` reads WebDataset tars (local paths, globs, brace lists, or any URL WebDataset can open) and
splits the shard list by rank and by dataloader worker in this one place. Training streams repeat with a
fresh shard order every pass (step-based: no rank waits for another at an epoch end); validation streams
make exactly one pass. Bad samples and unreadable shards are skipped with a reason, counted, and logged.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from moss.data.schema import MANIFEST, SampleError, ShardSample
from moss.model.delay import apply_delay_pattern, apply_delay_pattern_labels
from moss.text.prompt import PromptBuilder

log = logging.getLogger(__name__)


def expand_shards(spec: str | list[str], name: str = "data.train_shards") -> list[str]:
    """Resolve a shard spec to a sorted list of URLs.

    Accepts a directory (its `*.tar`), a glob, a brace list (`shard-{000000..000009}.tar`), a list of any of
    these, or remote URLs (`pipe:`, `s3://`, `https://`: passed through).

    Raises:
        FileNotFoundError: nothing matches, with the override that fixes it.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        item = str(item)
        for url in wds.shardlists.expand_urls(item):
            if "://" in url or url.startswith("pipe:"):
                urls.append(url)
            elif os.path.isdir(url):
                urls.extend(sorted(glob.glob(os.path.join(url, "*.tar"))))
            else:
                urls.extend(sorted(glob.glob(url)))
    if not urls:
        raise FileNotFoundError(
            f"no shards match {name}={spec!r}; set {name}=/path/to/shards or a glob like '.../*.tar'"
        )
    return sorted(set(urls))


def manifest_samples(urls: list[str]) -> int | None:
    """Samples of a local shard set according to its manifest(s), or None when no manifest covers it."""
    names = {Path(u).name for u in urls}
    total, covered = 0, set()
    for folder in {Path(u).parent for u in urls if "://" not in u}:
        file = folder / MANIFEST
        if file.is_file():
            for entry in json.loads(file.read_text())["shards"]:
                if entry["shard"] in names:
                    total += entry["samples"]
                    covered.add(entry["shard"])
    return total if covered == names else None


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed, else from the launcher's environment, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ExampleBuilder:
    """Shard sample -> delayed example `{"input_ids", "labels"}` int64 `[T + C - 1, C]`, plus `key`."""

    def __init__(self, prompt: PromptBuilder, text_pad_id: int, max_rows: int | None = None):
        self.prompt = prompt
        self.text_pad_id = text_pad_id
        self.max_rows = max_rows

    def __call__(self, sample: ShardSample) -> dict:
        grid, labels = self.prompt(sample.text, sample.codes, sample.ref_text, sample.ref_codes)
        rows = grid.shape[0] + grid.shape[1] - 1
        if self.max_rows is not None and rows > self.max_rows:
            raise SampleError(f"{sample.key}: {rows} rows exceed data.max_rows={self.max_rows}")
        input_ids = apply_delay_pattern(torch.from_numpy(grid), self.text_pad_id, self.prompt.speech_pad)
        return {
            "key": sample.key,
            "input_ids": input_ids,
            "labels": apply_delay_pattern_labels(torch.from_numpy(labels)),
        }


class ShardStream(IterableDataset):
    """Examples from a shard set, split by rank and worker, optionally shuffled and repeated.

    Args:
        urls: shard URLs (see `expand_shards`).
        builder: turns a `ShardSample` into a training example.
        repeat: loop forever with a new shard order per pass (training); False = exactly one pass.
        shuffle: shuffle shard order per pass and samples within a buffer of `shuffle_buffer`.
        seed: base seed; the pass number and the worker's slot are mixed in.
    """

    def __init__(
        self,
        urls: list[str],
        builder: ExampleBuilder,
        repeat: bool,
        shuffle: bool,
        seed: int = 0,
        shuffle_buffer: int = 256,
    ):
        super().__init__()
        self.urls, self.builder = list(urls), builder
        self.repeat, self.shuffle, self.seed, self.shuffle_buffer = repeat, shuffle, seed, shuffle_buffer
        self.skipped: Counter = Counter()

    def _slot(self) -> tuple[int, int]:
        rank, world = rank_and_world()
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return rank * workers + worker, world * workers

    def _shards(self, epoch: int, slot: int, slots: int) -> list[str]:
        order = list(self.urls)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order[slot::slots]

    def _skip(self, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        if self.skipped[reason] <= 10 or self.skipped[reason] % 1000 == 0:
            log.warning("skipped sample (%s, %d so far): %s", reason, self.skipped[reason], detail)

    def _samples(self, shards: list[str]) -> Iterator[dict]:
        def handler(err: Exception) -> bool:
            self._skip("unreadable shard", repr(err))
            return True

        for raw in wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples(handler=handler)):
            try:
                yield self.builder(ShardSample.from_wds(raw))
            except SampleError as err:
                self._skip("bad sample", str(err))

    def __iter__(self) -> Iterator[dict]:
        slot, slots = self._slot()
        if slots > len(self.urls):
            raise RuntimeError(
                f"{len(self.urls)} shards cannot feed {slots} readers (ranks x dataloader workers); "
                f"lower data.num_workers or write more shards (at least {slots})"
            )
        rng = random.Random(self.seed * 7919 + slot)
        epoch = 0
        while True:
            stream = self._samples(self._shards(epoch, slot, slots))
            yield from _buffered_shuffle(stream, self.shuffle_buffer, rng) if self.shuffle else stream
            if not self.repeat:
                return
            epoch += 1


def _buffered_shuffle(stream: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    buffer: list[dict] = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer
