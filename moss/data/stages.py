"""The stages of a shard stream, each a small iterator transform that knows how to save and restore itself.

    Mixer (ShardReader per source) -> ShuffleBuffer -> Examples -> PackStage (packed mode) -> Batcher

Samples are identified by their location `(source, pass, shard position, index)` in one reader's shard order (the
mixer, `moss.data.mixing`, puts the source in front), so a stage's state is a few integers per sample it holds,
never the sample: restoring re-reads those samples (`Mixer.fetch`) and hands them back through a `Restore`. Stages
are chained generators; when the last one yields a micro-batch, every stage upstream is paused right after handing
its item on, so the states read at that moment describe exactly what the next micro-batch will be made of.

Hand-written on purpose: WebDataset's shuffle and batching stages hold samples, not their locations, so they
cannot be checkpointed mid-pass; the packer works on `[T, C]` grids no library packs.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator

from moss.data import tar_reader
from moss.data.batch import PackedBatch
from moss.data.examples import Example, ExampleBuilder, OverLongSample
from moss.data.packing import BestFitPacker
from moss.data.schema import SampleError, ShardSample

log = logging.getLogger(__name__)
Location = tuple[int, int, int]  # (pass, position of the shard in the reader's order, sample index in it);
# a negative position -1 - i is item i of the reader's prelude (`ShardReader.prelude`)
Item = tuple[tuple[int, ...], ShardSample]  # a sample and its location in the stream (source first)
IDLE_PASSES = 3  # whole passes in a row without one usable example end a training stream with an error


class SkipLog:
    """Counts skipped samples by reason; logs the first ones and appends each to a JSONL report.

    Only the first pass counts: later passes meet the same samples again, possibly in another reader.
    `quiet` (a validation pass whose skips the report already holds) counts without writing.
    """

    def __init__(self, counts: Counter, report_path: str | None = None, quiet: bool = False):
        self.counts, self.report_path, self.quiet = counts, report_path, quiet

    def __call__(self, reason: str, detail: str, epoch: int = 0) -> None:
        if epoch > 0:
            return
        self.counts[reason] += 1
        if self.quiet:
            return
        if self.counts[reason] <= 10 or self.counts[reason] % 1000 == 0:
            log.warning("skipped (%s, %d so far): %s", reason, self.counts[reason], detail)
        if self.report_path:
            os.makedirs(os.path.dirname(self.report_path), exist_ok=True)
            with open(self.report_path, "a") as f:
                f.write(json.dumps({"reason": reason, "detail": detail}) + "\n")

    def where(self) -> str:
        return f"reasons in {self.report_path}" if self.report_path else "see the warnings above"


class Liveness:
    """Tells a stream that yields nothing from one that is merely slow: counts per pass what got through."""

    def __init__(self):
        self.valid = self.attempted = self.built = 0
        self.idle_passes = 0
        self._at_pass_start = (0, 0, 0)

    def start_pass(self) -> None:
        self._at_pass_start = (self.valid, self.attempted, self.built)

    def end_pass(self, whole: bool, repeat: bool) -> str | None:
        """Why the stream must stop (no usable sample), or None.

        A pass without one valid sample ends a training stream at once; a pass in which samples reached the
        builder and none became an example (all over-long, say) must repeat `IDLE_PASSES` times, since the
        shuffle buffer carries samples from one pass into the next.
        """
        valid, attempted, built = (now - then for now, then in zip(self.counts, self._at_pass_start, strict=True))
        idle = valid == 0 or (attempted > 0 and built == 0)
        self.idle_passes = self.idle_passes + 1 if whole and idle else 0
        if repeat and whole and valid == 0:
            return "a whole pass"
        return f"{self.idle_passes} passes" if self.idle_passes >= IDLE_PASSES else None

    @property
    def counts(self) -> tuple[int, int, int]:
        return self.valid, self.attempted, self.built


class ShardReader:
    """Reads this reader's shards pass after pass; its state is the position of the next sample to read.

    Args:
        urls: the whole shard set; this reader takes every `slots`-th shard from `slot` of each pass's order.
        slot, slots: this reader's index among all readers (ranks x loader workers), and their number.
        shuffle: a new shard order per pass, fixed by (seed, pass).
        repeat: pass after pass forever (training); False = one pass.
    """

    def __init__(self, urls, slot, slots, shuffle, seed, repeat, skips: SkipLog, liveness: Liveness):
        self.urls, self.slot, self.slots = list(urls), slot, slots
        self.shuffle, self.seed, self.repeat = shuffle, seed, repeat
        self.skips, self.liveness = skips, liveness
        self.position = (0, 0, 0)  # a negative shard position: in the prelude
        self.seen: set[str] | None = None  # sample keys read in this pass (a key seen again is skipped)
        # Read before the pass of `position`: this reader's share of the passes a run on another reader layout
        # left unfinished (`unfinished`), as [shard index in urls, first sample, only these samples or None, pass].
        self.prelude: list[list] = []

    def shards(self, epoch: int) -> list[str]:
        order = list(self.urls)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order[self.slot :: self.slots]

    def shard_url(self, epoch: int, pos: int) -> str:
        return self.urls[self.prelude[-1 - pos][0]] if pos < 0 else self.shards(epoch)[pos]

    def __iter__(self) -> Iterator[Item]:
        epoch, shard, index = self.position
        for pos in range(-1 - shard, len(self.prelude)) if shard < 0 else ():
            url, start, only, pass_ = self.prelude[pos]
            wanted = None if only is None else set(only)
            for i, sample in self._read(self.urls[url], max(start, index), pass_, wanted, unique=False):
                self.position = (epoch, -1 - pos, i + 1)
                if sample is not None:
                    yield (pass_, -1 - pos, i), sample
            self.position, index = (epoch, -2 - pos, 0), 0
        if shard < 0:
            shard, index = 0, 0
            self.position = (epoch, 0, 0)
        while True:
            shards = self.shards(epoch)
            whole = shard == 0 and index == 0
            if whole or self.seen is None:
                self.seen = set() if whole else self._keys_before(epoch, shard, index)
            self.liveness.start_pass()
            for pos in range(shard, len(shards)):
                for i, sample in self._read(shards[pos], index if pos == shard else 0, epoch):
                    self.position = (epoch, pos, i + 1)
                    if sample is not None:
                        self.liveness.valid += 1
                        yield (epoch, pos, i), sample
                self.position = (epoch, pos + 1, 0)
            if reason := self.liveness.end_pass(whole, self.repeat):
                raise RuntimeError(
                    f"reader {self.slot} found no usable sample (each invalid, over-long or outside the model's "
                    f"vocabulary) in {reason} over its {len(shards)} shards "
                    f"({', '.join(shards[:3])}{', ...' if len(shards) > 3 else ''}); {self.skips.where()}"
                )
            epoch, shard, index = epoch + 1, 0, 0
            self.position, self.seen = (epoch, 0, 0), None
            if not self.repeat:
                return

    def _read(
        self, url: str, start: int, epoch: int, only=None, unique=True
    ) -> Iterator[tuple[int, ShardSample | None]]:
        """(index, sample, or None when it is bad) for every sample of one shard from `start` on.

        `only`: the sample indices wanted (None: all). `unique`: a key read before in this pass is skipped (a
        prelude spans passes, so it does not check).
        """

        def unreadable(err: Exception) -> bool:
            stalled = isinstance(err, tar_reader.ShardStalled)
            self.skips("stalled shard" if stalled else "unreadable shard", f"{url}: {err}", epoch)
            return True

        for index, raw in enumerate(tar_samples(url, unreadable)):
            if index < start or (only is not None and index not in only):
                continue
            key = raw["__key__"]
            if unique and key in self.seen:
                self.skips("duplicate key", f"{url}:{key}: a sample with this key was read before in this pass", epoch)
                yield index, None
                continue
            if unique:
                self.seen.add(key)
            try:
                yield index, ShardSample.from_wds(raw)
            except SampleError as err:
                self.skips("bad sample", str(err), epoch)
                yield index, None
            except Exception as err:  # noqa: BLE001 - a sample no check foresaw is skipped, not fatal
                self.skips("bad sample", f"{url}:{raw.get('__key__')}: {type(err).__name__}: {err}", epoch)
                yield index, None

    def _keys_before(self, epoch: int, shard: int, index: int) -> set[str]:
        """The keys an uninterrupted pass would have seen before `(shard, index)`: only headers are read."""
        keys: set[str] = set()
        for pos, url in enumerate(self.shards(epoch)[: shard + 1]):
            for i, raw in enumerate(tar_samples(url, lambda err: True, fields=lambda ext: False)):
                if pos == shard and i >= index:
                    break
                keys.add(raw["__key__"])
        return keys

    def fetch(self, locations: Iterable[Location]) -> dict[Location, ShardSample]:
        """The samples at `locations`, each shard read once (to restore the stages' buffers)."""
        wanted: dict[tuple[int, int], set[int]] = {}
        for epoch, pos, index in locations:
            wanted.setdefault((epoch, pos), set()).add(index)
        found = {}
        for (epoch, pos), indices in wanted.items():
            for index, raw in enumerate(tar_samples(self.shard_url(epoch, pos))):
                if index in indices:
                    found[(epoch, pos, index)] = ShardSample.from_wds(raw)
        return found

    def locations(self, state: dict) -> list:
        return []

    def state_dict(self) -> dict:
        state = dict(zip(("epoch", "shard", "index"), self.position, strict=True))
        return {**state, "prelude": self.prelude} if self.prelude else state

    def load_state_dict(self, state: dict, restore: Restore | None = None) -> None:
        self.position = (state["epoch"], state["shard"], state["index"])
        self.prelude = [list(item) for item in state.get("prelude", [])]

    def unfinished(self, held: Iterable[Location], last_pass: int) -> list[list]:
        """Prelude items for what this (restored) reader has not handed on of its passes up to `last_pass`.

        Its prelude's rest, the rest of its passes, and the samples `held` in the stages after it (read, not yet
        trained on). `last_pass`: the furthest pass any reader of the old layout began, which all of them finish.
        """
        epoch, shard, index = self.position
        where = {url: i for i, url in enumerate(self.urls)}
        items = []
        for pos in range(-1 - shard, len(self.prelude)) if shard < 0 else ():
            url, start, only, pass_ = self.prelude[pos]
            start = max(start, index) if pos == -1 - shard else start
            items.append([url, start, None if only is None else [i for i in only if i >= start], pass_])
        if shard < 0:
            shard, index = 0, 0
        for pass_ in range(epoch, last_pass + 1):
            shards = self.shards(pass_)
            for pos in range(shard if pass_ == epoch else 0, len(shards)):
                items.append([where[shards[pos]], index if (pass_, pos) == (epoch, shard) else 0, None, pass_])
        taken: dict[tuple[int, int], list[int]] = {}
        for pass_, pos, i in held:
            taken.setdefault((where[self.shard_url(pass_, pos)], pass_), []).append(i)
        items += [[url, 0, sorted(indices), pass_] for (url, pass_), indices in sorted(taken.items())]
        return [item for item in items if item[2] is None or item[2]]

    @property
    def current_pass(self) -> int:
        """The last pass this reader has begun (-1: none)."""
        epoch, shard, index = self.position
        return epoch - 1 if shard < 0 or (shard, index) == (0, 0) else epoch


class Restore:
    """The samples and examples a restored stage needs again, looked up by location."""

    def __init__(self, samples: dict[Location, ShardSample], build: Callable[[ShardSample, Location], Example]):
        self.samples, self.build = samples, build

    def sample(self, loc) -> Item:
        loc = tuple(loc)
        return loc, self.samples[loc]

    def example(self, loc) -> Example:
        return self.build(self.samples[tuple(loc)], tuple(loc))


class ShuffleBuffer:
    """Holds `size` samples and lets a random one out for each that comes in (disabled: passes them through).

    At the end of a one-pass stream, the rest leave in random order.
    """

    def __init__(self, size: int, seed: int, enabled: bool = True):
        self.size, self.enabled = size, enabled
        self.rng = random.Random(seed)
        self.items: list[Item] = []

    def __call__(self, items: Iterable[Item]) -> Iterator[Item]:
        for item in items:
            if not self.enabled:
                yield item
                continue
            self.items.append(item)
            if len(self.items) > self.size:
                yield self.items.pop(self.rng.randrange(len(self.items)))
        self.rng.shuffle(self.items)
        self.items.reverse()
        while self.items:
            yield self.items.pop()

    def locations(self, state: dict) -> list:
        return list(state["buffer"])

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "buffer": [list(loc) for loc, _ in self.items]}

    def load_state_dict(self, state: dict, restore: Restore) -> None:
        self.rng.setstate(rng_state(state["rng"]))
        self.items = [restore.sample(loc) for loc in state["buffer"]]


class Examples:
    """Samples -> delayed examples tagged with their location; a sample the builder refuses is skipped.

    `liveness` has one entry per source (a location's first field), whose reader it tells what got through.
    """

    def __init__(self, builder: ExampleBuilder, skips: SkipLog, liveness: list[Liveness]):
        self.builder, self.skips, self.liveness = builder, skips, liveness

    def build(self, sample: ShardSample, loc: Location) -> Example:
        return self.builder(sample, loc)

    def __call__(self, items: Iterable[Item]) -> Iterator[Example]:
        for loc, sample in items:
            liveness = self.liveness[loc[0]]
            liveness.attempted += 1
            try:
                example = self.build(sample, loc)
            except OverLongSample as err:
                self.skips("over-long sample", str(err), loc[1])
                continue
            except SampleError as err:
                self.skips("bad sample", str(err), loc[1])
                continue
            liveness.built += 1
            yield example


class PackStage:
    """Examples -> packs (`BestFitPacker`); packs made and not yet handed on wait in `out`."""

    def __init__(self, **packer):
        self.packer = BestFitPacker(**packer)
        self.out: deque[list[Example]] = deque()

    def __call__(self, examples: Iterable[Example]) -> Iterator[list[Example]]:
        for example in examples:
            self.out.extend(self.packer.add(example))
            while self.out:
                yield self.out.popleft()
        self.out.extend(self.packer.flush())
        while self.out:
            yield self.out.popleft()

    def locations(self, state: dict) -> list:
        return state["pending"] + [loc for pack in state["out"] for loc in pack]

    def state_dict(self) -> dict:
        return {
            "pending": [list(ex.loc) for ex in self.packer.pending],
            "ages": list(self.packer.ages),
            "out": [[list(ex.loc) for ex in pack] for pack in self.out],
        }

    def load_state_dict(self, state: dict, restore: Restore) -> None:
        self.packer.pending = [restore.example(loc) for loc in state["pending"]]
        self.packer.ages = list(state["ages"])
        self.out = deque([restore.example(loc) for loc in pack] for pack in state["out"])


class Batcher:
    """Units (packs, or examples in padded mode) -> collated micro-batches of `size` units; the last may be short."""

    def __init__(self, size: int, collate: Callable[[list], PackedBatch], packed: bool):
        self.size, self.collate, self.packed = size, collate, packed
        self.group: list = []

    def __call__(self, units: Iterable) -> Iterator[PackedBatch]:
        for unit in units:
            self.group.append(unit)
            if len(self.group) == self.size:
                group, self.group = self.group, []
                yield self.collate(group)
        if self.group:
            group, self.group = self.group, []
            yield self.collate(group)

    def locations(self, state: dict) -> list:
        return [loc for unit in state["group"] for loc in (unit if self.packed else [unit])]

    def state_dict(self) -> dict:
        if self.packed:
            return {"group": [[list(ex.loc) for ex in pack] for pack in self.group]}
        return {"group": [list(ex.loc) for ex in self.group]}

    def load_state_dict(self, state: dict, restore: Restore) -> None:
        if self.packed:
            self.group = [[restore.example(loc) for loc in pack] for pack in state["group"]]
        else:
            self.group = [restore.example(loc) for loc in state["group"]]


def tar_samples(url: str, handler: Callable[[Exception], bool] | None = None, fields=None) -> Iterator[dict]:
    """WebDataset-style samples (dicts of raw fields) of one shard, read with bounds (`moss.data.tar_reader`).

    `handler` decides about read errors; `fields(ext)` selects the fields read (default: all).
    """
    return tar_reader.samples(url, handler, fields)


def rng_state(state) -> tuple:
    """random.Random state from its checkpointed form (lists after a round trip through some serialisers)."""
    version, internal, gauss = state
    return version, tuple(internal), gauss
