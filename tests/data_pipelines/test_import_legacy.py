"""The legacy importer: every bad record reported and skipped, nothing narrowed, the documented command works."""

import json
import pickle
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines.import_legacy import import_legacy
from tests.conftest import REPO
from tests.data_pipelines.test_preprocess import read_set


def grid(rows: int, value: int = 1) -> list[list[int]]:
    return [[value + c for c in range(8)] for _ in range(rows)]


def bomb(levels: int = 36):
    """A few hundred bytes of pickle that a naive reader would expand into 2^36 rows."""
    node = [1] * 8
    for _ in range(levels):
        node = [node, node]
    return node


RECORDS = {
    "good": {"input_ids": grid(3), "labels": grid(3, 2)},
    "float": {"input_ids": [[1.7] * 8], "labels": grid(1)},
    "wide-int": {"input_ids": [[2**32 + 5] * 8], "labels": grid(1)},
    "huge-int": {"input_ids": [[10**30] * 8], "labels": grid(1)},
    "bool": {"input_ids": [[True] * 8], "labels": grid(1)},
    "3-channels": {"input_ids": [[1, 2, 3]], "labels": [[1, 2, 3]]},
    "ragged": {"input_ids": [[1] * 8, [1] * 7], "labels": grid(2)},
    "string": {"input_ids": "not a grid", "labels": grid(1)},
    "not-a-dict": [1, 2, 3],
    "no-labels": {"input_ids": grid(1)},
    "shape-mismatch": {"input_ids": grid(2), "labels": grid(3)},
    "bomb": {"input_ids": bomb(), "labels": bomb()},
    "good-2": {"input_ids": grid(5, 3), "labels": grid(5, 4)},
}


def write_legacy(folder, records: dict, truncate_last: bool = False):
    blobs = [pickle.dumps(r, protocol=4) for r in records.values()]
    if truncate_last:
        blobs[-1] = blobs[-1][: len(blobs[-1]) // 2]
    offsets = np.cumsum([0] + [len(b) for b in blobs[:-1]])
    rows = [
        len(r["input_ids"]) if isinstance(r, dict) and isinstance(r.get("input_ids"), list) else 1
        for r in records.values()
    ]
    (folder / "legacy.pkl").write_bytes(b"".join(blobs))
    np.save(folder / "legacy_metas.npy", np.array([offsets, rows, [4] * len(blobs)]))
    return folder / "legacy.pkl"


def test_every_bad_record_is_reported_and_the_good_ones_imported(tmp_path):
    pkl = write_legacy(tmp_path, RECORDS | {"cut": {"input_ids": grid(2), "labels": grid(2)}}, truncate_last=True)
    result = import_legacy(pkl, tmp_path / "out")
    assert result["imported"] == 2 and result["records"] == len(RECORDS) + 1
    samples = read_set(tmp_path / "out")
    assert sorted(samples) == ["legacy-00000000", "legacy-00000012"]
    assert np.array_equal(samples["legacy-00000012"].grid, np.array(grid(5, 3), np.int32))
    report = [json.loads(x) for x in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [r["record"] for r in report] == [i for i in range(len(RECORDS) + 1) if i not in (0, 12)]
    reasons = {r["record"]: r["reason"] for r in report}
    assert "float" in reasons[1] and "outside int32" in reasons[2] and "outside int32" in reasons[3]
    assert "bool" in reasons[4] and "[T, 8]" in reasons[5] and "one width" in reasons[6] and "list" in reasons[11]
    assert all(f"record {i} " in reasons[i] for i in reasons)


@pytest.mark.slow  # the README test also runs this command
def test_the_documented_command_works_as_written(tmp_path):
    pkl = write_legacy(tmp_path, {"a": RECORDS["good"], "b": RECORDS["good-2"]})
    readme = (REPO / "data_pipelines" / "README.md").read_text()
    (command,) = re.findall(r"^python -m data_pipelines\.import_legacy .*$", readme, flags=re.M)
    command = command.replace("/data/processed_data.pkl", str(pkl)).replace("/data/shards", str(tmp_path / "out"))
    run = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "imported 2 of 2 records" in run.stdout and len(read_set(tmp_path / "out")) == 2
