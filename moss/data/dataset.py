"""Streaming shard sets into micro-batches, with a resumable position.

`ShardStream` is the one place where shards are split by rank and dataloader worker. Each reader walks its
shards in an order fixed by (seed, pass); training streams repeat with a new order every pass (step-based:
no rank waits for another at an epoch end), validation streams make exactly one pass. Samples go through a
shuffle buffer, become delayed examples, and leave as packed micro-batches (`BestFitPacker`) or padded
batches (`PaddingCollator`), built inside the loader worker.

The stream is resumable exactly: its state is the read position (pass, shard, sample), the shuffle RNG, and
*where* the samples waiting in the shuffle buffer and the packer came from; restoring re-reads those few
samples. `torchdata`'s `StatefulDataLoader` collects this state from every worker for the checkpoint.

Bad samples and unreadable shards are skipped with a reason, counted, logged, and appended to a JSONL
report when `report_dir` is set.
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

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from moss.data.collate import PaddingCollator
from moss.data.packing import BestFitPacker, collate_packs
from moss.data.schema import MANIFEST, SampleError, ShardSample
from moss.model.delay import apply_delay_pattern, apply_delay_pattern_labels
from moss.model.loss import IGNORE_INDEX
from moss.text.prompt import PromptBuilder

log = logging.getLogger(__name__)
IDLE_PASSES = 3  # whole passes in a row without one usable example end a training stream with an error


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
        for url in wds.shardlists.expand_urls(str(item)):
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
    """Samples of a local shard set according to its manifest(s), or None when no manifest covers it.

    A folder may hold one `manifest.json` or one `manifest-<slot>.json` per preprocessing rank.
    """
    names = {Path(u).name for u in urls}
    total, covered = 0, set()
    for folder in {Path(u).parent for u in urls if "://" not in u}:
        for file in sorted(folder.glob(MANIFEST.replace(".json", "*.json"))):
            for entry in json.loads(file.read_text())["shards"]:
                if entry["shard"] in names:
                    total += entry["samples"]
                    covered.add(entry["shard"])
    return total if covered == names else None


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed, else from the launcher's environment, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ExampleBuilder:
    """Shard sample -> delayed example `{"key", "rows", "input_ids", "labels"}` (int32 `[T + C - 1, C]`)."""

    def __init__(
        self,
        prompt: PromptBuilder,
        text_pad_id: int,
        max_rows: int | None = None,
        truncate=False,
        vocab_size: int | None = None,
        speech_vocab_size: int | None = None,
    ):
        self.prompt = prompt
        self.text_pad_id = text_pad_id
        self.max_rows = max_rows
        self.truncate = truncate
        self.vocab_size, self.speech_vocab_size = vocab_size, speech_vocab_size

    def _check_range(self, key: str, input_ids: np.ndarray, labels: np.ndarray) -> None:
        """Every id inside its channel's embedding and head, so no bad grid reaches an index error on device."""
        for limit, columns in ((self.vocab_size, slice(0, 1)), (self.speech_vocab_size, slice(1, None))):
            if limit is None:
                continue
            ids, targets = input_ids[:, columns], labels[:, columns]
            if ids.min(initial=0) < 0 or ids.max(initial=0) >= limit or targets.max(initial=0) >= limit:
                raise SampleError(f"{key}: ids outside the model's vocabulary ({limit} for channels {columns})")

    def __call__(self, sample: ShardSample) -> dict:
        if sample.grid is not None:  # imported from the original preprocessing: the grid as stored
            grid, labels = sample.grid, sample.grid_labels
            if grid.shape[1] != self.prompt.channels:
                raise SampleError(f"{sample.key}: grid has {grid.shape[1]} channels, the model {self.prompt.channels}")
        else:
            grid, labels = self.prompt(sample.text, sample.codes, sample.ref_text, sample.ref_codes)
        input_ids = apply_delay_pattern(grid.astype(np.int32), self.text_pad_id, self.prompt.speech_pad)
        labels = apply_delay_pattern_labels(labels.astype(np.int32))
        self._check_range(sample.key, input_ids, labels)
        rows = input_ids.shape[0]
        if self.max_rows is not None and rows > self.max_rows:
            if not self.truncate:
                raise SampleError(f"{sample.key}: {rows} rows exceed the limit of {self.max_rows} (over-long)")
            input_ids, labels, rows = input_ids[: self.max_rows], labels[: self.max_rows], self.max_rows
        return {"key": sample.key, "rows": rows, "input_ids": input_ids, "labels": labels}


class ShardStream(IterableDataset):
    """Micro-batches from a shard set, split by rank and worker, optionally shuffled and repeated.

    Args:
        urls: shard URLs (see `expand_shards`).
        builder: turns a `ShardSample` into a delayed example.
        repeat: loop forever with a new shard order per pass (training); False = exactly one pass.
        shuffle: shuffle shard order per pass and samples within a buffer of `shuffle_buffer`.
        seed: base seed; the pass and the reader's slot are mixed in.
        shuffle_buffer: samples held for shuffling (raw codes, a few kB each).
        packer: a `BestFitPacker` factory argument dict (`budget`, `window`, ...), or None for padded batches.
        packs_per_batch: packs per micro-batch (packed mode).
        batch_size: samples per micro-batch (padded mode).
        report_dir: folder for the per-reader JSONL skip reports, or None.
    """

    def __init__(
        self,
        urls: list[str],
        builder: ExampleBuilder,
        repeat: bool,
        shuffle: bool,
        seed: int = 0,
        shuffle_buffer: int = 256,
        packer: dict | None = None,
        packs_per_batch: int = 1,
        batch_size: int = 1,
        report_dir: str | None = None,
    ):
        super().__init__()
        self.urls, self.builder = list(urls), builder
        self.repeat, self.shuffle, self.seed, self.shuffle_buffer = repeat, shuffle, seed, shuffle_buffer
        self.packer_args, self.packs_per_batch, self.batch_size = packer, packs_per_batch, batch_size
        self.report_dir = report_dir
        pad = builder.text_pad_id
        self.padder = PaddingCollator(pad, builder.prompt.speech_pad, max_length=builder.max_rows or 10**9)
        self.skipped: Counter = Counter()
        self._built = self._attempted = 0  # examples built / tried (over-long ones fail), for the idle check
        self._quiet = False  # a validation pass whose skips this run's report already holds
        self._restored: dict | None = None
        self._state: dict = {}

    # ------------------------------------------------------------------ reader slot and shard order
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

    # ------------------------------------------------------------------ skip accounting
    def _skip(self, reason: str, detail: str, epoch: int = 0) -> None:
        """Count, log and report a bad sample once per run: in the first pass, where every shard is read once.

        Later passes meet the same samples again (possibly in another reader) and skip them silently.
        """
        if epoch > 0:
            return
        self.skipped[reason] += 1
        if self._quiet:
            return
        if self.skipped[reason] <= 10 or self.skipped[reason] % 1000 == 0:
            log.warning("skipped (%s, %d so far): %s", reason, self.skipped[reason], detail)
        if self.report_dir:
            os.makedirs(self.report_dir, exist_ok=True)
            with open(self._report_path(), "a") as f:
                f.write(json.dumps({"reason": reason, "detail": detail}) + "\n")

    def _report_path(self) -> str:
        kind = "train" if self.repeat else "val"
        return os.path.join(self.report_dir, f"skipped-{kind}-reader{self._slot()[0]:04d}.jsonl")

    # ------------------------------------------------------------------ reading
    def _read_shard(self, url: str, start: int = 0, epoch: int = 0) -> Iterator[tuple[int, ShardSample | None]]:
        """(index, sample or None if bad) for every sample of one shard from `start` on."""

        def handler(err: Exception) -> bool:
            self._skip("unreadable shard", f"{url}: {err!r}", epoch)
            return True

        pipeline = wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=handler))
        for index, raw in enumerate(pipeline):
            if index < start:
                continue
            try:
                yield index, ShardSample.from_wds(raw)
            except SampleError as err:
                self._skip("bad sample", str(err), epoch)
                yield index, None
            except Exception as err:  # noqa: BLE001 - a sample no check foresaw is skipped, not fatal
                self._skip("bad sample", f"{url}:{raw.get('__key__')}: {type(err).__name__}: {err}", epoch)
                yield index, None

    def _fetch(self, locations: list[list[int]], slot: int, slots: int) -> dict[tuple, ShardSample]:
        """Re-read the samples at `[pass, shard position, index]` locations (restoring buffers)."""
        wanted: dict[tuple[int, int], set[int]] = {}
        for epoch, pos, index in locations:
            wanted.setdefault((epoch, pos), set()).add(index)
        found = {}
        for (epoch, pos), indices in wanted.items():
            url = self._shards(epoch, slot, slots)[pos]
            for index, sample in _read_plain(url):
                if index in indices:
                    found[(epoch, pos, index)] = sample
        return found

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Position, RNG and the origins of buffered samples (called in the worker after every batch)."""
        return {**self._state, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self._restored = state
        self.skipped = Counter(state.get("skipped", {}))

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict]:
        slot, slots = self._slot()
        # Validation streams read the same samples at every validation: report them at the first one only.
        self._quiet = bool(not self.repeat and self.report_dir and os.path.exists(self._report_path()))
        if self.repeat and slots > len(self.urls):  # a one-pass stream may leave readers idle, a training one not
            raise RuntimeError(
                f"{len(self.urls)} shards cannot feed {slots} readers (ranks x dataloader workers); "
                f"lower data.num_workers or write more shards (at least {slots})"
            )
        state = self._restored or {
            "epoch": 0,
            "shard": 0,
            "index": 0,
            "rng": None,
            "buffer": [],
            "pending": [],
            "ages": [],
            "ready": [],
        }
        self._restored = None
        rng = random.Random(self.seed * 7919 + slot)
        if state["rng"] is not None:
            rng.setstate(_as_rng_state(state["rng"]))
        ready_locs = [loc for group in state["ready"] for loc in group]
        refetched = self._fetch(state["buffer"] + state["pending"] + ready_locs, slot, slots)
        buffer = [(tuple(loc), refetched[tuple(loc)]) for loc in state["buffer"]]
        packer = BestFitPacker(**self.packer_args) if self.packer_args else None
        pending = [self._example(refetched[tuple(loc)], tuple(loc)) for loc in state["pending"]]
        # `ready` holds packs (packed mode) or examples (padded mode) that wait for a full micro-batch.
        ready: list = [[self._example(refetched[tuple(loc)], tuple(loc)) for loc in group] for group in state["ready"]]
        if packer is not None:
            packer.pending, packer.ages = pending, list(state["ages"])
        else:
            ready = pending
        epoch, shard, index = state["epoch"], state["shard"], state["index"]

        def snapshot(next_epoch, next_shard, next_index):
            self._state = {
                "epoch": next_epoch,
                "shard": next_shard,
                "index": next_index,
                "rng": rng.getstate(),
                "buffer": [list(loc) for loc, _ in buffer],
                "pending": [list(ex["loc"]) for ex in (packer.pending if packer is not None else ready)],
                "ages": list(packer.ages) if packer is not None else [],
                "ready": [[list(ex["loc"]) for ex in pack] for pack in ready] if packer is not None else [],
            }

        idle_passes = 0
        while True:
            shards = self._shards(epoch, slot, slots)
            whole_pass, valid, built, attempted = shard == 0 and index == 0, 0, self._built, self._attempted
            for pos in range(shard, len(shards)):
                for i, sample in self._read_shard(shards[pos], start=index if pos == shard else 0, epoch=epoch):
                    if sample is None:
                        continue
                    valid += 1
                    item = (epoch, pos, i), sample
                    if self.shuffle:
                        buffer.append(item)
                        if len(buffer) <= self.shuffle_buffer:
                            continue
                        item = buffer.pop(rng.randrange(len(buffer)))
                    yield from self._emit([item], packer, ready, snapshot, (epoch, pos, i + 1))
                index = 0
                snapshot(epoch, pos + 1, 0)
            shard = 0
            # Idle: nothing valid, or samples reached the builder and none became an example (all over-long).
            idle = valid == 0 or (self._attempted > attempted and self._built == built)
            idle_passes = idle_passes + 1 if whole_pass and idle else 0
            if (self.repeat and whole_pass and valid == 0) or idle_passes >= IDLE_PASSES:
                raise RuntimeError(
                    f"reader {slot} found no usable sample (each invalid, over-long or outside the model's "
                    f"vocabulary) in {'a whole pass' if valid == 0 else f'{idle_passes} passes'} over its "
                    f"{len(shards)} shards "
                    f"({', '.join(shards[:3])}{', ...' if len(shards) > 3 else ''}); "
                    + (f"reasons in {self._report_path()}" if self.report_dir else "see the warnings above")
                )
            if not self.repeat:
                rng.shuffle(buffer)
                rest, buffer[:] = list(buffer), []
                yield from self._emit(rest, packer, ready, snapshot, (epoch + 1, 0, 0), final=True)
                return
            epoch += 1

    def _example(self, sample: ShardSample, loc: tuple) -> dict:
        example = self.builder(sample)
        example["loc"] = loc
        self._built += 1
        return example

    def _emit(self, items, packer, ready, snapshot, position, final=False) -> Iterator[dict]:
        """Turn samples into micro-batches; `ready` collects packs (or samples, padded mode) not yet batched."""
        for loc, sample in items:
            self._attempted += 1
            try:
                example = self._example(sample, loc)
            except SampleError as err:
                self._skip("over-long sample" if "over-long" in str(err) else "bad sample", str(err), loc[0])
                continue
            if packer is not None:
                ready.extend(packer.add(example))
            else:
                ready.append(example)
            while len(ready) >= self._group:
                group, ready[:] = ready[: self._group], ready[self._group :]
                snapshot(*position)
                yield self._collate(group)
        if final:
            if packer is not None:
                ready.extend(packer.flush())
            while ready:
                group, ready[:] = ready[: self._group], ready[self._group :]
                snapshot(*position)
                yield self._collate(group)

    def placeholder_batch(self) -> dict:
        """A micro-batch in this stream's format without a single label: it adds nothing to a loss.

        Validation feeds it to a rank whose readers ran out before the others' (uneven shards, or more ranks
        than shards), so every rank runs the same forwards; see `loader.EvenBatches`.
        """
        prompt = self.builder.prompt
        if self.packer_args:
            packs = [[] for _ in range(self._group)]
            batch = collate_packs(
                packs, self.packer_args["budget"], self.builder.text_pad_id, prompt.speech_pad, prompt.channels
            )
        else:
            ids = np.full((prompt.channels, prompt.channels), prompt.speech_pad, dtype=np.int64)
            ids[:, 0] = self.builder.text_pad_id
            labels = np.full_like(ids, IGNORE_INDEX)
            batch = self.padder([{"key": "placeholder", "rows": len(ids), "input_ids": ids, "labels": labels}])
        batch["skipped"], batch["reader"] = dict(self.skipped), -1
        return batch

    @property
    def _group(self) -> int:
        return self.packs_per_batch if self.packer_args else self.batch_size

    def _collate(self, group: list) -> dict:
        if self.packer_args:
            prompt = self.builder.prompt
            batch = collate_packs(
                group, self.packer_args["budget"], self.builder.text_pad_id, prompt.speech_pad, prompt.channels
            )
        else:
            batch = self.padder(group)
        batch["skipped"] = dict(self.skipped)
        batch["reader"] = self._slot()[0]
        return batch


def _read_plain(url: str) -> Iterator[tuple[int, ShardSample]]:
    for index, raw in enumerate(wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples())):
        try:
            yield index, ShardSample.from_wds(raw)
        except SampleError:
            continue


def _as_rng_state(state) -> tuple:
    """random.Random state from its checkpointed form (lists after a round trip through some serialisers)."""
    version, internal, gauss = state
    return version, tuple(internal), gauss
