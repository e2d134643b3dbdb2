"""Import the original preprocessing output (`<name>.pkl` + `<name>_metas.npy`) as a shard set.

    python -m data_pipelines.import_legacy input=/data/processed_data.pkl output_dir=/data/shards

The pickle is a sequence of records `{"input_ids": [[8 ints]] * T, "labels": [[8 ints]] * T}` at the byte
offsets of metas row 0 (row 1: rows T, row 2: audio frames). Each record is read from its own byte range
(memory-mapped, up to the next record) with an unpickler that refuses every class or function reference
(the way pickle runs code); its grids must be lists of integer rows of one width that fit int32, checked
before any array is built, so a crafted record can neither run code, nor expand into gigabytes, nor be
silently narrowed. A record that fails is reported (`skipped.jsonl`, with the reason) and the import goes on.
Grids are kept exactly as stored (un-delayed, with the speech offset of the model they were made for);
training applies the delay pattern.
"""

from __future__ import annotations

import io
import json
import mmap
import pickle
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from moss.cli import command, run
from moss.data.schema import CODEBOOKS, ShardSample
from moss.data.writer import ShardSetWriter
from moss.errors import ConfigError
from moss.outputs import OutputFolder

INT32 = (-(2**31), 2**31 - 1)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds plain containers and numbers only; every global lookup is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: legacy records hold only lists and ints")


def _grid(value, name: str, where: str) -> np.ndarray:
    """An int32 `[T, C]` array from a list of equal-width lists of ints; anything else is a ValueError."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {name} must be a non-empty list of rows, got {type(value).__name__}")
    width = len(value[0]) if isinstance(value[0], list) else -1
    for row in value:
        if not isinstance(row, list) or len(row) != width:
            raise ValueError(f"{where}: {name} rows must be lists of one width ({width})")
        for v in row:
            if type(v) is not int:  # bool, float and others are refused, never narrowed
                shown = repr(v) if isinstance(v, float | bool) else "a value"  # never repr a container: it may be huge
                raise ValueError(f"{where}: {name} holds {type(v).__name__} ({shown}), expected integers")
            if not INT32[0] <= v <= INT32[1]:
                raise ValueError(f"{where}: {name} holds {v}, outside int32")
    return np.asarray(value, dtype=np.int32)


def read_record(data, offset: int, end: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The (input_ids, labels) int32 `[T, C]` grids of the record in `data[offset:end]`.

    Raises:
        pickle.UnpicklingError, ValueError, EOFError: a record that is not the expected dict of two grids.
    """
    record = RestrictedUnpickler(io.BytesIO(data[offset:end])).load()
    if not isinstance(record, dict) or not {"input_ids", "labels"} <= set(record):
        raise ValueError(f"{where}: expected a dict with input_ids and labels, got {type(record).__name__}")
    grid, labels = _grid(record["input_ids"], "input_ids", where), _grid(record["labels"], "labels", where)
    if grid.shape != labels.shape or grid.shape[1] != CODEBOOKS:
        raise ValueError(
            f"{where}: input_ids {grid.shape} and labels {labels.shape} must be one [T, {CODEBOOKS}] shape"
        )
    return grid, labels


def read_metas(path: Path, size: int) -> np.ndarray:
    """Metas rows (offsets, rows, frames) as int64 `[K, N]`, checked against the pickle's size."""
    try:
        metas = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:  # not .npy, truncated, an object array (pickle refused)
        raise ConfigError(f"{path}: not a numeric .npy array ({type(err).__name__}: {err})") from None
    if not isinstance(metas, np.ndarray) or metas.ndim != 2 or metas.dtype.kind not in "iu" or metas.shape[0] < 1:
        got = f"{metas.dtype} {metas.shape}" if isinstance(metas, np.ndarray) else type(metas).__name__
        raise ConfigError(f"{path}: expected an integer [rows, records] array, got {got}")
    offsets = metas[0]
    if len(offsets) and (offsets.min() < 0 or offsets.max() >= max(size, 1)):
        raise ConfigError(f"{path}: offsets outside the {size}-byte pickle")
    return metas.astype(np.int64)


def import_legacy(
    pkl: str | Path, output_dir: str | Path, records_per_shard: int = 1000, overwrite: bool = False
) -> dict:
    """Convert one `.pkl` + `_metas.npy` pair; returns counts (records that fail are reported and skipped).

    The shards are written beside `output_dir` and moved into it at the end (`moss.outputs.OutputFolder`).
    """
    folder = OutputFolder(output_dir, "import_legacy", overwrite=overwrite).check()
    pkl = Path(pkl)
    if not pkl.is_file():
        raise FileNotFoundError(f"input={pkl} is not a file; pass the original processed_data.pkl")
    metas_path = pkl.with_name(pkl.stem + "_metas.npy")
    if not metas_path.is_file():
        raise FileNotFoundError(f"{metas_path} not found: the original writes it next to {pkl.name}")
    size = pkl.stat().st_size
    metas = read_metas(metas_path, size)
    offsets = metas[0]
    bounds = np.unique(np.append(offsets, size))  # a record ends where the next one (or the file) begins
    ends = bounds[np.searchsorted(bounds, offsets, side="right")]
    skipped: list[dict] = []
    output_dir = Path(output_dir)
    with folder.staged() as stage:
        with open(pkl, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else io.BytesIO() as data:
            with ShardSetWriter(stage, prefix=pkl.stem, max_samples=records_per_shard) as writer:
                for sample in _samples(data, pkl, metas, ends, skipped):
                    writer.write(sample)
        (stage / "skipped.jsonl").write_text("".join(json.dumps(s) + "\n" for s in skipped))
    written = sum(s["samples"] for s in writer.shards)
    report = output_dir / "skipped.jsonl"
    for item in skipped[:20]:
        print(f"skipped record {item['record']}: {item['reason']}")
    print(
        f"imported {written} of {len(offsets)} records from {pkl} into {output_dir}; skipped {len(skipped)} "
        f"(reasons in {report})"
    )
    return {"records": len(offsets), "imported": written, "skipped": skipped}


def _samples(data, pkl: Path, metas: np.ndarray, ends: np.ndarray, skipped: list[dict]):
    """The records of a mapped `.pkl` as shard samples; a record that fails is appended to `skipped`."""
    for i, offset in enumerate(metas[0]):
        where = f"{pkl}:record {i} (byte {int(offset)})"
        try:
            grid, labels = read_record(data, int(offset), int(ends[i]), where)
            if metas.shape[0] > 1 and int(metas[1][i]) != len(grid):
                raise ValueError(f"{where}: {len(grid)} rows, metas say {int(metas[1][i])}")
        except Exception as err:  # noqa: BLE001 - one bad record is reported, the import goes on
            reason = str(err) if where in str(err) else f"{where}: {type(err).__name__}: {err}"
            skipped.append({"record": i, "reason": reason[:500]})
            continue
        frames = int(metas[2][i]) if metas.shape[0] > 2 else int((labels[:, 1] != -100).sum())
        yield ShardSample(
            key=f"{pkl.stem}-{i:08d}",
            codes=np.zeros((0, CODEBOOKS), np.int16),
            text="",
            source=f"{pkl}:{i}",
            grid=grid,
            grid_labels=labels,
            audio_frames=frames,
        )


@hydra.main(version_base="1.3", config_path="../conf", config_name="import_legacy")
@command
def main(cfg: DictConfig) -> None:
    """Hydra entry point: `python -m data_pipelines.import_legacy input=... output_dir=...`."""
    import_legacy(cfg.input, cfg.output_dir, cfg.records_per_shard, cfg.overwrite)


if __name__ == "__main__":
    run(main, Path(__file__).parents[1] / "conf", "import_legacy")
