"""MossDataModule: builds the training and validation loaders from injected parts.

The tokenizer and the model's architecture are runtime dependencies passed as keyword arguments, never read
from global config. Training: a resumable `StatefulDataLoader` over a repeating `ShardStream`, wrapped in
optimiser steps of `accumulate_grad_batches` micro-batches each; validation: one exact pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from moss.data.dataset import ShardStream, expand_shards, manifest_samples
from moss.data.epochs import EpochPlan, plan_source_epochs
from moss.data.examples import ExampleBuilder
from moss.data.loader import EvenBatches, StepLoader
from moss.data.mixing import Source, Sources, source_specs
from moss.data.packing import Packing
from moss.data.synthetic import write_synthetic_corpus
from moss.distributed import rank_and_world
from moss.errors import ConfigError
from moss.model.config import MossTTSDConfig
from moss.settings import Buffer, Count, Positive, Required, Rows, Seed, Size, TypedDict, Workers, strict
from moss.text.prompt import PromptBuilder
from moss.worker_signals import deaf_to_group_stops

log = logging.getLogger(__name__)


def outlive_group_stops(worker_id: int) -> None:
    """Loader workers outlive the stop signals sent to the whole process group (`moss.worker_signals`).

    A worker that died on Ctrl-C, SIGTERM or SIGUSR1 would fail the step the trainer is about to checkpoint (the
    trainer handles them: training/preemption.py); they still end with their loader, or with the trainer.
    """
    deaf_to_group_stops()


@strict
class SyntheticCorpus(TypedDict, total=False):
    """`data.synthetic`: the built-in corpus, generated on first use."""

    dir: Required[str]
    train_samples: Required[Count]
    val_samples: Size
    samples_per_shard: Count


class MossDataModule(L.LightningDataModule):
    """Packed (or padded) micro-batches streamed from shard sets.

    Args:
        train_shards: shard spec of the training set (directory, glob, brace list or URLs); None with `sources`.
        val_shards: shard spec of the validation set, or None.
        packing: `{"budget": rows per pack, "window": samples per packing round, "min_fill": ...,
            "packs_per_batch": ...}`, or None for the original padded batches of `batch_size` samples.
        batch_size: samples per micro-batch when not packing.
        accumulate_grad_batches: micro-batches per optimiser step (gradient accumulation): each training item is
            one `StepBatch` of this many.
        num_workers: dataloader worker processes per rank.
        max_rows: samples with more delayed rows are skipped and counted (or cut, `overlong="truncate"`);
            when packing, the pack budget is the limit.
        overlong: "skip" (default) or "truncate".
        shuffle_buffer: in-worker sample shuffle buffer.
        seed: base seed of shard order and shuffling.
        normalize: optional text normaliser `str -> str` applied before the speaker-tag mapping.
        report_dir: folder for per-reader JSONL reports of skipped samples.
        synthetic: `{"dir", "train_samples", "val_samples", "samples_per_shard"}`: the built-in corpus, generated in
            `prepare_data` into `dir/train` and `dir/val` only, and only where `train_shards`/`val_shards` point
            there; a location the user set is read, never written.
        epochs: train for this many passes over the training set instead of `trainer.max_steps` (see
            `moss.data.epochs`: turned into steps from the manifests before training, by `epoch_plan`).
        sources: weighted training sources mixed in one stream instead of `train_shards` (`moss.data.mixing`):
            `{name: {"shards": spec, "weight": w, "epochs": e}}`; `epochs` per source is optional (see
            `moss.data.epochs`), a source without it is replayed at its weight for as long as the run lasts.
        tokenizer: the checkpoint's tokenizer (runtime dependency).
        model_config: the model architecture (speech offset, channels, pad code).
    """

    def __init__(
        self,
        train_shards: str | list[str] | None,
        val_shards: str | list[str] | None = None,
        packing: Packing | None = None,
        batch_size: Count = 1,
        accumulate_grad_batches: Count = 1,
        num_workers: Workers = 2,
        max_rows: Rows = 16000,
        overlong: Literal["skip", "truncate"] = "skip",
        shuffle_buffer: Buffer = 256,
        seed: Seed = 1234,
        normalize: Callable[[str], str] | None = None,
        report_dir: str | None = None,
        synthetic: SyntheticCorpus | None = None,
        epochs: Positive | None = None,
        sources: Sources | None = None,
        *,
        tokenizer,
        model_config: MossTTSDConfig,
    ):
        super().__init__()
        self.train_shards, self.val_shards = train_shards, val_shards
        self.source_specs = source_specs(train_shards, sources, epochs)
        self.packing = dict(packing) if packing else None
        self.accumulate = int(accumulate_grad_batches)
        self.batch_size, self.num_workers, self.shuffle_buffer, self.seed = (
            batch_size,
            num_workers,
            shuffle_buffer,
            seed,
        )
        self.report_dir, self.synthetic, self.epochs = report_dir, synthetic, epochs
        self.tokenizer, self.model_config = tokenizer, model_config
        self._train_steps: StepLoader | None = None
        self.epoch_samples: int | None = None  # samples per epoch (of the planned source with sources)
        self.source_samples: dict[str, int] = {}  # usable samples per source, for data/epoch_<source>
        prompt = PromptBuilder(
            tokenizer,
            speech_offset=model_config.speech_offset,
            channels=model_config.channels,
            speech_pad=model_config.speech_pad_token,
            normalize=normalize,
        )
        limit = self.packing["budget"] if self.packing else max_rows
        self.builder = ExampleBuilder(
            prompt,
            tokenizer.pad_token_id,
            max_rows=limit,
            truncate=overlong == "truncate",
            vocab_size=model_config.vocab_size,
            speech_vocab_size=model_config.speech_vocab_size,
        )

    def prepare_data(self) -> None:
        if not self.synthetic:
            return
        per_shard = self.synthetic.get("samples_per_shard", 64)
        root = Path(self.synthetic["dir"])
        for split, spec, samples, seed in (
            ("train", self.train_shards, self.synthetic["train_samples"], 0),
            ("val", self.val_shards, self.synthetic.get("val_samples"), 1),
        ):
            if samples and isinstance(spec, str | Path) and Path(spec).resolve() == (root / split).resolve():
                write_synthetic_corpus(root / split, samples, seed=seed, samples_per_shard=per_shard)

    def epoch_plan(self, world_size: int) -> EpochPlan | None:
        """The optimiser steps the planned epochs take (None without any); writes the built-in corpus first."""
        if not any(spec.epochs for spec in self.source_specs):
            return None
        self.prepare_data()
        sources, batch = self._sources(), self.batch_size
        plan = plan_source_epochs(sources, self.builder, self.packing, batch, world_size, self.accumulate)
        self.epoch_samples = plan.samples  # the throughput callback logs data/epoch from it
        self.source_samples = {source.name: source.samples for source in plan.sources}
        return plan

    def setup(self, stage: str | None = None) -> None:
        self.train_sources = self._sources()
        self.val_urls = expand_shards(self.val_shards, "data.val_shards") if self.val_shards else []
        for source in self.train_sources:
            samples = manifest_samples(list(source.urls))
            if samples and len(self.train_sources) > 1:
                self.source_samples.setdefault(source.name, samples)
            log.info(
                "train%s: %d shards (%s samples by manifest%s)",
                "" if len(self.train_sources) == 1 else f" source {source.name}",
                len(source.urls),
                samples,
                "" if len(self.train_sources) == 1 else f", weight {source.weight:g}",
            )
        log.info(
            "val: %d shards; %s",
            len(self.val_urls),
            f"packing into {self.packing['budget']} rows" if self.packing else f"padded batches of {self.batch_size}",
        )

    def _sources(self) -> list[Source]:
        """The training sources with their shard specs expanded."""

        def setting(name: str) -> str:
            return "data.train_shards" if name == "train" else f"data.sources.{name}.shards"

        return [spec.with_urls(expand_shards(spec.shards, setting(spec.name))) for spec in self.source_specs]

    def state_dict(self) -> dict:
        """The training shards by source, by name (a moved run folder still matches), kept in every checkpoint."""
        return {"shards": {source.name: [shard_name(url) for url in source.urls] for source in self.train_sources}}

    def load_state_dict(self, state: dict) -> None:
        """Refuse to resume when the checkpoint's shards or sources are gone, or others came.

        Positions in the saved stream count shards, and would point at other data; one message names them and
        the way out.
        """
        saved = state.get("shards")
        if not isinstance(saved, dict):
            return  # a checkpoint from before the record
        now = {source.name: [shard_name(url) for url in source.urls] for source in self.train_sources}
        problems = [f"data source {name!r} is gone" for name in saved if name not in now]
        problems += [f"data source {name!r} is new" for name in now if name not in saved]
        for name in saved.keys() & now.keys():
            gone = [s for s in saved[name] if s not in set(now[name])]
            new = [s for s in now[name] if s not in set(saved[name])]
            where = "" if name == "train" else f" of source {name!r}"
            if gone:
                problems.append(f"{len(gone)} shard(s){where} vanished: {_listing(gone)}")
            if new:
                problems.append(f"{len(new)} shard(s){where} are new: {_listing(new)}")
            if not gone and not new and list(saved[name]) != now[name]:
                problems.append(f"the shards{where} are listed in another order")
        if problems:
            raise ConfigError(
                "the training data changed since the checkpoint: " + "; ".join(problems) + ". Restore the data to "
                "continue the run exactly, or start a new run (name=...) on the data as it is now"
            )

    def card_splits(self) -> dict[str, object]:
        """The training shard specs by data card split: `train`, or `train/<source>` for each of `data.sources`."""
        if len(self.source_specs) == 1:
            return {"train": self.source_specs[0].shards}
        return {f"train/{spec.name}": spec.shards for spec in self.source_specs}

    @property
    def train_urls(self) -> list[str]:
        return [url for source in self.train_sources for url in source.urls]

    def stream(self, urls: list[str] | list[Source], train: bool) -> ShardStream:
        """The stream of micro-batches of a shard set or of mixed sources (training: repeating and shuffled)."""
        packer = {k: v for k, v in (self.packing or {}).items() if k != "packs_per_batch"} or None
        return ShardStream(
            urls,
            self.builder,
            repeat=train,
            shuffle=train,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            packer=packer,
            packs_per_batch=(self.packing or {}).get("packs_per_batch", 1),
            batch_size=self.batch_size,
            report_dir=self.report_dir,
        )

    def train_dataloader(self) -> StepLoader:
        loader = StatefulDataLoader(
            self.stream(self.train_sources, train=True),
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self._pin_memory,
            worker_init_fn=outlive_group_stops,
        )
        max_steps = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 1
        self._train_steps = StepLoader(loader, accumulate=self.accumulate, steps=max_steps)
        return self._train_steps

    def val_dataloader(self) -> EvenBatches | list:
        if not self.val_urls:
            return []
        _, world = rank_and_world()
        # One exact pass: never more readers than shards (a reader without a shard would have nothing to read).
        workers = min(self.num_workers, len(self.val_urls) // world)
        stream = self.stream(self.val_urls, train=False)
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            pin_memory=self._pin_memory,
            worker_init_fn=outlive_group_stops,
        )
        return EvenBatches(loader, stream.placeholder_batch)

    def teardown(self, stage: str | None = None) -> None:
        """Stop the loader workers now, rather than whenever the loader is garbage-collected."""
        if self._train_steps is not None:
            self._train_steps.close()
            self._train_steps = None

    @property
    def _pin_memory(self) -> bool:
        return bool(self.trainer and isinstance(self.trainer.accelerator, CUDAAccelerator))


def shard_name(url: str) -> str:
    """A local shard by its file name (its folder may move with the run); a URL or `pipe:` command as it is."""
    return url if url.startswith("pipe:") or "://" in url else Path(url).name


def _listing(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")
