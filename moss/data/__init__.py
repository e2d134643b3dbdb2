"""Shard schema and writer, streaming, collation and the LightningDataModule."""

from moss.data.schema import SampleError, ShardSample
from moss.data.writer import ShardSetWriter, write_shards

__all__ = ["SampleError", "ShardSample", "ShardSetWriter", "write_shards"]
