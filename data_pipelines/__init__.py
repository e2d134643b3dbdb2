"""Offline data preparation: raw JSONL + audio -> WebDataset shards; legacy import; shard statistics."""
