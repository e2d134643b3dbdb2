"""MossDataModule: builds the training and validation loaders from injected parts.

The tokenizer and the model's architecture are runtime dependencies passed as keyword arguments
(`instantiate(cfg.data, tokenizer=..., model_config=...)`), never read from global config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import lightning as L
from torch.utils.data import DataLoader

from moss.data.collate import PaddingCollator
from moss.data.dataset import ExampleBuilder, ShardStream, expand_shards, manifest_samples, rank_and_world
from moss.data.synthetic import write_synthetic_corpus
from moss.model.config import MossTTSDConfig
from moss.text.prompt import PromptBuilder

log = logging.getLogger(__name__)


class MossDataModule(L.LightningDataModule):
    """Padded batches streamed from shard sets.

    Args:
        train_shards: shard spec of the training set (directory, glob, brace list or URLs).
        val_shards: shard spec of the validation set, or None.
        batch_size: samples per micro-batch.
        num_workers: dataloader worker processes per rank.
        max_rows: samples with more delayed rows are skipped and counted.
        shuffle_buffer: in-worker sample shuffle buffer.
        seed: base seed of shard order and shuffling.
        normalize: optional text normaliser `str -> str` applied before the speaker-tag mapping.
        synthetic: `{"train_samples", "val_samples", "samples_per_shard"}` to generate the built-in corpus into
            `train_shards`/`val_shards` (directories) in `prepare_data`.
        tokenizer: the checkpoint's tokenizer (runtime dependency).
        model_config: the model architecture (speech offset, channels, pad code).
    """

    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        batch_size: int = 4,
        num_workers: int = 2,
        max_rows: int = 16000,
        shuffle_buffer: int = 256,
        seed: int = 1234,
        normalize: Callable[[str], str] | None = None,
        synthetic: dict | None = None,
        *,
        tokenizer,
        model_config: MossTTSDConfig,
    ):
        super().__init__()
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.num_workers = batch_size, num_workers
        self.max_rows, self.shuffle_buffer, self.seed = max_rows, shuffle_buffer, seed
        self.synthetic = synthetic
        self.tokenizer, self.model_config = tokenizer, model_config
        prompt = PromptBuilder(
            tokenizer,
            speech_offset=model_config.speech_offset,
            channels=model_config.channels,
            speech_pad=model_config.speech_pad_token,
            normalize=normalize,
        )
        self.builder = ExampleBuilder(prompt, text_pad_id=tokenizer.pad_token_id, max_rows=max_rows)
        self.collator = PaddingCollator(tokenizer.pad_token_id, model_config.speech_pad_token, max_rows)

    def prepare_data(self) -> None:
        if not self.synthetic:
            return
        per_shard = self.synthetic.get("samples_per_shard", 64)
        write_synthetic_corpus(self.train_shards, self.synthetic["train_samples"], seed=0, samples_per_shard=per_shard)
        if self.val_shards and self.synthetic.get("val_samples"):
            write_synthetic_corpus(self.val_shards, self.synthetic["val_samples"], seed=1, samples_per_shard=per_shard)

    def setup(self, stage: str | None = None) -> None:
        self.train_urls = expand_shards(self.train_shards, "data.train_shards")
        self.val_urls = expand_shards(self.val_shards, "data.val_shards") if self.val_shards else []
        log.info(
            "train: %d shards (%s samples by manifest), val: %d shards",
            len(self.train_urls),
            manifest_samples(self.train_urls),
            len(self.val_urls),
        )

    def _loader(self, urls: list[str], train: bool) -> DataLoader:
        _, world = rank_and_world()
        # Validation is one exact pass: never start more readers than there are shards to split.
        workers = self.num_workers if train else min(self.num_workers, len(urls) // world)
        stream = ShardStream(
            urls, self.builder, repeat=train, shuffle=train, seed=self.seed, shuffle_buffer=self.shuffle_buffer
        )
        return DataLoader(
            stream,
            batch_size=self.batch_size,
            collate_fn=self.collator,
            num_workers=workers,
            persistent_workers=train and workers > 0,
            pin_memory=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_urls, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_urls, train=False) if self.val_urls else []
