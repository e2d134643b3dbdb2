"""Import the original preprocessing output (`<name>.pkl` + `<name>_metas.npy`) as a shard set.

    python -m data_pipelines.import_legacy data=/data/processed_data.pkl output_dir=/data/shards

The pickle is a sequence of records `{"input_ids": [[8 ints]] * T, "labels": [[8 ints]] * T}` at the byte
offsets of metas row 0 (row 1: rows T, row 2: audio frames). It is read with an unpickler that admits only
the opcodes of dicts, lists, strings and numbers: a reference to any class or function (the way pickle runs
code) is refused with an error naming it. The grids are kept exactly as stored (un-delayed, with the speech
offset of the model they were made for); training applies the delay pattern.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from moss.data.schema import ShardSample
from moss.data.writer import ShardSetWriter


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds plain containers and numbers only; every global lookup is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: legacy records hold only lists and ints")


def read_record(data: bytes, offset: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The (input_ids, labels) int32 `[T, C]` grids of the record at `offset`.

    Raises:
        ValueError: a record that is not the expected dict of two equal-shape integer grids.
    """
    record = RestrictedUnpickler(io.BytesIO(data[offset:])).load()
    if not isinstance(record, dict) or not {"input_ids", "labels"} <= set(record):
        raise ValueError(f"{where}: expected a dict with input_ids and labels, got {type(record).__name__}")
    grid, labels = np.asarray(record["input_ids"], dtype=np.int64), np.asarray(record["labels"], dtype=np.int64)
    if grid.ndim != 2 or grid.shape != labels.shape:
        raise ValueError(f"{where}: input_ids {grid.shape} and labels {labels.shape} must be one [T, C] shape")
    return grid.astype(np.int32), labels.astype(np.int32)


def import_legacy(pkl: str | Path, output_dir: str | Path, records_per_shard: int = 1000) -> dict:
    """Convert one `.pkl` + `_metas.npy` pair; returns counts (records that fail are reported and skipped)."""
    pkl = Path(pkl)
    metas_path = pkl.with_name(pkl.stem + "_metas.npy")
    if not metas_path.is_file():
        raise FileNotFoundError(f"{metas_path} not found: the original writes it next to {pkl.name}")
    metas = np.load(metas_path, allow_pickle=False)
    data = pkl.read_bytes()
    skipped = []

    def samples():
        for i, offset in enumerate(metas[0]):
            where = f"{pkl}:record {i} (byte {int(offset)})"
            try:
                grid, labels = read_record(data, int(offset), where)
            except (pickle.UnpicklingError, ValueError, EOFError) as err:
                skipped.append({"record": i, "reason": str(err)})
                continue
            frames = int(metas[2][i]) if metas.shape[0] > 2 else int((labels[:, 1] != -100).sum())
            yield ShardSample(
                key=f"{pkl.stem}-{i:08d}",
                codes=np.zeros((0, 8), np.int16),
                text="",
                source=f"{pkl}:{i}",
                grid=grid,
                grid_labels=labels,
                audio_frames=frames,
            )

    with ShardSetWriter(output_dir, prefix=pkl.stem, max_samples=records_per_shard) as writer:
        for sample in samples():
            writer.write(sample)
    written = sum(s["samples"] for s in writer.shards)
    for item in skipped:
        print(f"skipped {item['record']}: {item['reason']}")
    print(f"imported {written} of {metas.shape[1]} records from {pkl} into {output_dir}")
    return {"records": int(metas.shape[1]), "imported": written, "skipped": skipped}


@hydra.main(version_base="1.3", config_path="../conf", config_name="import_legacy")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: `python -m data_pipelines.import_legacy data=... output_dir=...`."""
    import_legacy(cfg.data, cfg.output_dir, cfg.records_per_shard)


if __name__ == "__main__":
    main()
