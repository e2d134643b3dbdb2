"""Weighted sources: several shard sets mixed in one training stream, each read pass after pass on its own.

A fine-tune on a small target set forgets less when general data is replayed beside it (`data.sources`, e.g.
0.8 target voices and 0.2 general dialogue). `Mixer` is the reading stage of such a stream: it holds one
`ShardReader` per source and draws the source of every next sample with a seeded RNG in proportion to the
weights. Each reader repeats on its own, so a small source starts its next pass (a new shard order) while a large
one is still in its first: the proportions hold for the whole run, whatever the sizes.

The mixing happens before the shuffle buffer and the packer, so packs hold samples of every source. Its state is
the RNG's and every reader's position; the samples' locations carry their source's index, so the stages after it
restore exactly as in a one-source stream. One source is read straight through, without a draw.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Annotated

from pydantic import Field

from moss.data.schema import ShardSample
from moss.data.stages import Location, Restore, ShardReader, rng_state
from moss.errors import ConfigError
from moss.settings import Positive, Required, TypedDict, strict

log = logging.getLogger(__name__)
MixedLocation = tuple[int, int, int, int]  # (source index, pass, shard position, sample index)


@dataclass(frozen=True)
class Source:
    """A named training shard set: its files, its share of the draws, its planned passes (None: replayed).

    Weights are normalised over the sources. `shards` is the set as configured (a folder, glob or list);
    `urls` the files it expands to, filled in (`with_urls`) when the data is set up.
    """

    name: str
    urls: tuple[str, ...] = ()
    weight: float = 1.0
    epochs: float | None = None
    shards: object = None

    def __post_init__(self):
        if not self.weight > 0:
            raise ConfigError(f"data source {self.name!r}: weight must be positive, got {self.weight}")

    def with_urls(self, urls) -> Source:
        """This source over the shard files `urls` (refused when there are none)."""
        if not urls:
            raise ConfigError(f"data source {self.name!r} has no shards")
        return dataclasses.replace(self, urls=tuple(urls))


@strict
class SourceSettings(TypedDict, total=False):
    """One entry of `data.sources`: its shards, its share of the mix, and its planned passes (None: replayed)."""

    shards: Required[str | list[str]]
    weight: Positive
    epochs: Positive | None


# A source's name names its logged metrics (data/samples_<name>): letters, digits, '_' and '-'.
Sources = dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")], SourceSettings]


def source_specs(train_shards, sources, epochs) -> list[Source]:
    """The training sources of a data config, not yet expanded: `data.sources`, or `data.train_shards` as "train".

    Each source's own settings are checked where `data.sources` is declared (`Sources`, by the config check);
    this refuses the combinations.

    Raises:
        ConfigError: both or neither given, or a global `data.epochs` beside `data.sources`.
    """
    if not sources:
        if train_shards is None:
            raise ConfigError("data.train_shards or data.sources is required; e.g. data.train_shards=/data/shards")
        return [Source("train", epochs=epochs, shards=train_shards)]
    if train_shards is not None:
        raise ConfigError("data.sources replaces data.train_shards: set data.train_shards=null beside data.sources")
    if epochs:
        raise ConfigError(
            "data.epochs counts passes over one shard set; with data.sources give each source its own "
            "(data.sources.<name>.epochs) and leave out the sources that are replayed"
        )
    return [
        Source(str(name), (), float(source.get("weight", 1.0)), source.get("epochs"), source["shards"])
        for name, source in dict(sources).items()
    ]


class Mixer:
    """One reader per source; each sample comes from a source drawn by weight (module docstring).

    Args:
        readers: a `ShardReader` per source, in the order of `sources`.
        sources: the sources (names and weights).
        seed: the draw's seed (mixed with the reader slot by the stream).
    """

    def __init__(self, readers: list[ShardReader], sources: list[Source], seed: str | int):
        if len(readers) != len(sources):
            raise ValueError(f"{len(readers)} readers for {len(sources)} sources")
        self.readers, self.names = readers, [s.name for s in sources]
        self.weights = [s.weight for s in sources]
        self.rng = random.Random(seed)

    def __iter__(self) -> Iterator[tuple[MixedLocation, ShardSample]]:
        streams = [iter(reader) for reader in self.readers]
        if len(streams) == 1:
            for loc, sample in streams[0]:
                yield (0, *loc), sample
            return
        live = list(range(len(streams)))
        bounds = _cumulative(self.weights)
        while live:
            source = live[bisect.bisect_right(bounds, self.rng.random() * bounds[-1])]
            try:
                loc, sample = next(streams[source])
            except StopIteration:  # a one-pass source ran out: the others share its weight from here on
                live.remove(source)
                bounds = _cumulative([self.weights[i] for i in live])
                continue
            yield (source, *loc), sample

    def fetch(self, locations: Iterable[MixedLocation]) -> dict[MixedLocation, ShardSample]:
        """The samples at `locations`, each source's shards read once (to restore the stages' buffers)."""
        wanted: dict[int, list[Location]] = {}
        for source, *loc in locations:
            wanted.setdefault(source, []).append(tuple(loc))
        found = {}
        for source, locs in wanted.items():
            found.update({(source, *loc): sample for loc, sample in self.readers[source].fetch(locs).items()})
        return found

    def locations(self, state: dict) -> list:
        return []

    def state_dict(self) -> dict:
        return {
            "sources": list(self.names),
            "weights": list(self.weights),
            "rng": self.rng.getstate(),
            "readers": [reader.state_dict() for reader in self.readers],
        }

    def refuse_other_sources(self, state: dict) -> None:
        """A saved stream of other sources (names or order) would put positions on other shards: refused."""
        if list(state["sources"]) != self.names:
            raise ConfigError(
                f"the saved data stream reads the sources {list(state['sources'])}, this run {self.names}: resume "
                f"with the same data.sources (names and order) to continue the data exactly"
            )

    def load_state_dict(self, state: dict, restore: Restore | None = None) -> None:
        self.refuse_other_sources(state)
        if [float(w) for w in state["weights"]] != [float(w) for w in self.weights]:
            log.warning(
                "data.sources weights changed since the checkpoint (%s -> %s): the mix follows the new weights",
                state["weights"],
                self.weights,
            )
        self.rng.setstate(rng_state(state["rng"]))
        for reader, position in zip(self.readers, state["readers"], strict=True):
            reader.load_state_dict(position)


def source_counts(locations: Iterable[tuple], names: list[str]) -> dict[str, int]:
    """Samples per source name among `locations` (every source named, zeros included)."""
    counts = dict.fromkeys(names, 0)
    for loc in locations:
        counts[names[loc[0]]] += 1
    return counts


def _cumulative(weights: list[float]) -> list[float]:
    total, bounds = 0.0, []
    for weight in weights:
        total += weight
        bounds.append(total)
    return bounds
