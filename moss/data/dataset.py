"""Streaming shard sets into micro-batches, with a resumable position.

`ShardStream` is the one place where shards are split by rank and dataloader worker. A stream reads one shard
set, or several weighted sources mixed (`moss.data.mixing`), each split alike. Each reader walks its
shards in an order fixed by (seed, pass); training streams repeat with a new order every pass (step-based:
no rank waits for another at an epoch end), validation streams make exactly one pass. Samples go through a
shuffle buffer, become delayed examples, and leave as packed micro-batches (`BestFitPacker`) or padded
batches (`PaddingCollator`), built inside the loader worker.

The stream is composed of the stages of `moss.data.stages` and is resumable exactly: its state is theirs
(the read position, the shuffle RNG, and *where* the samples held in the shuffle buffer, the packer and the
batcher came from; restoring re-reads those few samples). `torchdata`'s `StatefulDataLoader` collects this
state from every worker for the checkpoint.

Bad samples and unreadable shards are skipped with a reason, counted, logged, and appended to a JSONL
report when `report_dir` is set.
"""

from __future__ import annotations

import functools
import glob
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from moss.data import storage, tar_reader
from moss.data.batch import PackedBatch
from moss.data.collate import PaddingCollator
from moss.data.examples import Example, ExampleBuilder
from moss.data.mixing import Mixer, Source, source_counts
from moss.data.packing import collate_packs
from moss.data.schema import MANIFEST
from moss.data.stages import Batcher, Examples, Liveness, PackStage, Restore, ShardReader, ShuffleBuffer, SkipLog
from moss.distributed import rank_and_world
from moss.errors import ConfigError
from moss.model.loss import IGNORE_INDEX

log = logging.getLogger(__name__)


def expand_shards(spec: str | list[str], name: str = "data.train_shards") -> list[str]:
    """Resolve a shard spec to a sorted list of URLs.

    Accepts a directory (its `*.tar`), a glob, a brace list (`shard-{000000..000009}.tar`), a list of any of
    these, the same in a store (`s3://bucket/set/`, `s3://bucket/set/*.tar`: listed through its API; `https://`
    taken as given), or `pipe:` commands.

    Raises:
        FileNotFoundError: nothing matches, with the override that fixes it.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        for url in wds.shardlists.expand_urls(str(item)):
            if url.startswith("pipe:"):
                urls.append(url)
            elif storage.is_remote(url):
                urls.extend(storage.list_objects(url))
            elif os.path.isdir(url):
                urls.extend(sorted(glob.glob(os.path.join(url, "*.tar"))))
            else:
                urls.extend(sorted(glob.glob(url)))
    if not urls:
        raise FileNotFoundError(
            f"no shards match {name}={spec!r}; set {name}=/path/to/shards or a glob like '.../*.tar'"
        )
    return sorted(set(urls))


def readers_problem(shards: int, ranks: int, workers: int, name: str = "data.train_shards") -> str | None:
    """Why `shards` training shards cannot feed `ranks` x `workers` readers, else None.

    The rule of the shard split (`ShardReader`): every reader streams shards of its own, so a training set
    needs at least one shard per reader. The run plan applies it before a run starts (fitting the workers to a
    set made from `raw.*`), the stream again in each reader.
    """
    workers = max(1, workers)
    if shards >= ranks * workers:
        return None
    return (
        f"{name} has {shards} shards but {ranks} ranks x {workers} workers = {ranks * workers} readers "
        f"need one each; lower data.num_workers or trainer.devices, or write the set in more shards (4x readers or "
        f"more keeps them evenly loaded)"
    )


def manifest_entries(urls: list[str]) -> list[dict] | None:
    """The manifest entry of every shard of a shard set, local or in a store (None: no manifest covers it).

    A folder (or prefix) may hold one `manifest.json` or one `manifest-<slot>.json` per preprocessing rank.
    A manifest is a claim, not a fact: each entry is checked against its tar (types, per-sample frames, and
    whether a file of that size can hold that many samples); a wrong one is reported and replaced by a count
    of the tar itself, so plans are made from verified numbers.
    """
    paths = {u.rsplit("/", 1)[-1]: u for u in urls if not u.startswith(("pipe:", "http://", "https://"))}
    entries: dict[str, dict] = {}
    for folder in sorted({u.rsplit("/", 1)[0] for u in paths.values()}):
        pattern = f"{folder}/{MANIFEST.replace('.json', '*.json')}"
        for file in storage.list_objects(pattern) if storage.is_remote(folder) else sorted(glob.glob(pattern)):
            try:
                listed = json.loads(storage.read_bytes(file) if storage.is_remote(file) else Path(file).read_text())
                listed = listed["shards"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                log.warning(
                    "manifest %s is unreadable (%s: %s); its shards are counted instead", file, type(err).__name__, err
                )
                continue
            for entry in listed if isinstance(listed, list) else []:
                name = entry.get("shard") if isinstance(entry, dict) else None
                if isinstance(name, str) and name in paths and name not in entries:
                    entries[name] = entry
    if len(paths) != len(urls) or not entries:
        return None
    for name, path in paths.items():
        problem = manifest_problem(entries[name], path) if name in entries else "no manifest lists it"
        if problem is not None:
            log.warning("shard %s: %s; counting its samples from the tar", path, problem)
            entries[name] = count_shard(path)
    return [entries[name] for name in sorted(entries)]


MIN_SAMPLE_BYTES = 1024  # a sample's json member alone takes a header block and a data block


def manifest_problem(entry: dict, path: str) -> str | None:
    """What is wrong with a manifest entry for the shard at `path` (None: plausible)."""
    samples, frames, per = entry.get("samples"), entry.get("frames"), entry.get("sample_frames")
    for key, value in (("samples", samples), ("frames", frames)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"its manifest gives {key}={value!r}, not a count"
    if per is not None:
        if not isinstance(per, list) or len(per) != samples:
            return f"its manifest's sample_frames does not list {samples} samples"
        if any(not isinstance(f, int) or isinstance(f, bool) or f < 0 for f in per) or sum(per) != frames:
            return "its manifest's sample_frames are not counts adding up to its frames"
    try:
        size = storage.size(path) if storage.is_remote(path) else os.path.getsize(path)
    except OSError as err:
        return f"unreadable ({err})"
    if samples * MIN_SAMPLE_BYTES + frames * 16 > size:
        return f"its manifest claims {samples} samples of {frames} frames, more than its {size} bytes can hold"
    return None


def count_shard(path: str) -> dict:
    """A manifest entry made by reading the shard.

    Samples, and frames (target + reference) from the codes' `.npy` headers, or from the json of legacy grid
    samples; other fields are skipped unread.
    """
    per = []
    wanted = {"json", "codes.npy", "ref_codes.npy"}
    for raw in tar_reader.samples(str(path), handler=lambda err: True, fields=wanted.__contains__):
        per.append(_rows(raw.get("codes.npy")) + _rows(raw.get("ref_codes.npy")) or _json_frames(raw.get("json")))
    return {"shard": str(path).rsplit("/", 1)[-1], "samples": len(per), "frames": sum(per), "sample_frames": per}


def _rows(npy: bytes | None) -> int:
    """Rows of an `.npy` payload, from its header alone (0 when absent or unreadable)."""
    if not npy:
        return 0
    try:
        stream = io.BytesIO(npy)
        major, _ = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape = read_header(stream)[0]
    except (ValueError, OSError):
        return 0
    return int(shape[0]) if shape and int(shape[0]) > 0 else 0


def _json_frames(meta: bytes | None) -> int:
    try:
        frames = json.loads(meta or b"{}").get("frames", 0)
    except (ValueError, AttributeError):
        return 0
    return frames if isinstance(frames, int) and not isinstance(frames, bool) and frames > 0 else 0


def manifest_samples(urls: list[str]) -> int | None:
    """Samples of a local shard set according to its manifest(s), or None when no manifest covers it."""
    entries = manifest_entries(urls)
    return None if entries is None else sum(e["samples"] for e in entries)


class ShardStream(IterableDataset):
    """Micro-batches from a shard set, split by rank and worker, optionally shuffled and repeated.

    Args:
        urls: shard URLs (see `expand_shards`), or weighted `Source`s to mix (training).
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
        urls: list[str] | list[Source],
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
        self.sources = [u if isinstance(u, Source) else None for u in urls]
        if not self.sources or None in self.sources:
            self.sources = [Source("train").with_urls(urls)]
        self.builder = builder
        self.repeat, self.shuffle, self.seed, self.shuffle_buffer = repeat, shuffle, seed, shuffle_buffer
        self.packer_args, self.packs_per_batch, self.batch_size = packer, packs_per_batch, batch_size
        self.report_dir = report_dir
        pad = builder.text_pad_id
        self.padder = PaddingCollator(pad, builder.prompt.speech_pad, max_length=builder.max_rows or 10**9)
        self.skipped: Counter = Counter()
        self._restored: dict | None = None
        self._elsewhere: list[dict] | None = None
        self._state: dict = {}

    def _slot(self) -> tuple[int, int]:
        rank, world = rank_and_world()
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return rank * workers + worker, world * workers

    def _report_path(self, slot: int) -> str | None:
        kind = "train" if self.repeat else "val"
        return os.path.join(self.report_dir, f"skipped-{kind}-reader{slot:04d}.jsonl") if self.report_dir else None

    def state_dict(self) -> dict:
        """The state of every stage at the last micro-batch, and the skip counts (read in the loader worker)."""
        return {**self._state, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        stages = {k: v for k, v in state.items() if k != "skipped"}
        if stages and "reader" not in stages:
            raise ValueError(
                f"the saved stream state has no stages (keys {sorted(stages)}): it was written by a pre-release "
                f"build; resume from a checkpoint of this version or start the run anew"
            )
        if stages and "sources" not in stages["reader"]:
            raise ValueError(
                "the saved stream state reads one shard set without a source index (a build before data.sources): "
                "resume from a checkpoint of this version, or start the run anew"
            )
        self._restored = stages or None
        self.skipped = Counter(state.get("skipped", {}))

    def __iter__(self) -> Iterator[PackedBatch]:
        slot, slots = self._slot()
        _, world = rank_and_world()
        # A one-pass stream may leave readers idle; a training one may not (that reader would have no data).
        for source in self.sources:
            name = "data.train_shards" if len(self.sources) == 1 else f"data.sources.{source.name}.shards"
            if self.repeat and (problem := readers_problem(len(source.urls), world, slots // world, name)):
                raise ConfigError(problem)
        report = self._report_path(slot)
        # Validation streams read the same samples at every validation: report them at the first one only.
        skips = SkipLog(self.skipped, report, quiet=bool(not self.repeat and report and os.path.exists(report)))
        liveness = [Liveness() for _ in self.sources]
        examples = Examples(self.builder, skips, liveness)
        readers = [
            ShardReader(source.urls, slot, slots, self.shuffle, self.seed, self.repeat, skips, alive)
            for source, alive in zip(self.sources, liveness, strict=True)
        ]
        stages = {
            "reader": Mixer(readers, self.sources, seed=f"mix-{self.seed}-{slot}"),
            "buffer": ShuffleBuffer(self.shuffle_buffer, self.seed * 7919 + slot, enabled=self.shuffle),
            "packer": PackStage(**self.packer_args) if self.packer_args else None,
            "batcher": Batcher(self._group, functools.partial(self._collate, reader=slot), bool(self.packer_args)),
        }
        stages = {name: stage for name, stage in stages.items() if stage is not None}
        if self._elsewhere:
            self._share_out(stages, self._elsewhere, slot, slots)
            self._elsewhere = None
        elif self._restored:
            self._restore(stages, self._restored, examples)
            self._restored = None
        units = examples(stages["buffer"](stages["reader"]))
        for batch in stages["batcher"](stages["packer"](units) if "packer" in stages else units):
            self._state = {name: stage.state_dict() for name, stage in stages.items()}
            yield batch

    def resume_elsewhere(self, states: list[dict]) -> None:
        """Continue from the stream states of every reader of another layout (other ranks x loader workers).

        What they left unfinished of their passes is shared out among this layout's readers, each sample once
        (`ShardReader.unfinished`); then every reader starts the next pass. The skip counts go to reader 0.
        """
        self._elsewhere, self._restored = list(states), None

    def _share_out(self, stages: dict, states: list[dict], slot: int, slots: int) -> None:
        for state in states:
            self._refuse_other_layout(stages, state)
        for source, reader in enumerate(stages["reader"].readers):
            old = []
            for k, state in enumerate(states):
                old.append(ShardReader(reader.urls, k, len(states), self.shuffle, self.seed, True, None, None))
                old[-1].load_state_dict(state["reader"]["readers"][source])
            last = max(r.current_pass for r in old)
            items = []
            for r, state in zip(old, states, strict=True):
                held = [loc for name, stage in stages.items() for loc in stage.locations(state[name])]
                items += r.unfinished([tuple(loc[1:]) for loc in held if loc[0] == source], last)
            reader.prelude = items[slot::slots]
            reader.position = (last + 1, -1 if reader.prelude else 0, 0)
        if slot == 0:
            self.skipped = sum((Counter(state.get("skipped", {})) for state in states), Counter())

    @staticmethod
    def _refuse_other_layout(stages: dict, state: dict) -> None:
        """A saved stream of other stages (packed or padded) or other sources cannot be continued: refused."""
        saved = sorted(name for name in state if name != "skipped")
        if saved != sorted(stages):
            raise ConfigError(
                f"the saved data stream has stages {saved}, this one {sorted(stages)}: resume with the "
                f"same data.packing setting (packed or padded) to continue the data exactly"
            )
        stages["reader"].refuse_other_sources(state["reader"])

    @staticmethod
    def _restore(stages: dict, state: dict, examples: Examples) -> None:
        """Put every stage back as it was, re-reading the samples their buffers held."""
        ShardStream._refuse_other_layout(stages, state)
        locations = [tuple(loc) for name, stage in stages.items() for loc in stage.locations(state[name])]
        restore = Restore(stages["reader"].fetch(locations), examples.build)
        for name, stage in stages.items():
            stage.load_state_dict(state[name], restore)

    def placeholder_batch(self) -> PackedBatch:
        """A micro-batch in this stream's format without a single label: it adds nothing to a loss.

        Validation feeds it to a rank whose readers ran out before the others' (uneven shards, or more ranks
        than shards), so every rank runs the same forwards; see `loader.EvenBatches`.
        """
        if self.packer_args:
            return self._collate([[] for _ in range(self._group)], reader=-1)
        prompt = self.builder.prompt
        ids = np.full((prompt.channels, prompt.channels), prompt.speech_pad, dtype=np.int64)
        ids[:, 0] = self.builder.text_pad_id
        labels = np.full_like(ids, IGNORE_INDEX)
        placeholder = Example("placeholder", len(ids), ids, labels)
        return self.padder([placeholder], {"reader": -1, "skipped": dict(self.skipped)})

    @property
    def _group(self) -> int:
        return self.packs_per_batch if self.packer_args else self.batch_size

    def _collate(self, group: list, reader: int) -> PackedBatch:
        """A micro-batch of `group` (packs, or examples when padding), built once with where it came from.

        Its reader, that reader's skip counts so far (the callbacks' skip report) and its samples per source.
        """
        examples = [ex for unit in group for ex in (unit if self.packer_args else [unit])]
        counts = source_counts((ex.loc for ex in examples), [s.name for s in self.sources])
        origin = {"reader": reader, "skipped": dict(self.skipped), "sources": counts}
        origin["passes"] = tuple(ex.loc[1] for ex in examples)
        if not self.packer_args:
            return self.padder(group, origin)
        prompt = self.builder.prompt
        budget = self.packer_args["budget"]
        return collate_packs(group, budget, self.builder.text_pad_id, prompt.speech_pad, prompt.channels, origin)

    @property
    def urls(self) -> list[str]:
        """Every shard the stream reads (all sources)."""
        return [url for source in self.sources for url in source.urls]
