"""Hostile shard samples: each is skipped with its reason, reported once per run, and never trained on."""

import io
import json

import numpy as np
import pytest
import webdataset as wds
from torch.utils.data import DataLoader

from moss.data.dataset import ShardStream, expand_shards
from moss.data.examples import ExampleBuilder
from moss.data.schema import ShardSample
from moss.data.synthetic import generate_samples
from moss.data.writer import write_shards
from moss.model import MossTTSDConfig
from moss.text import PromptBuilder


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def lying_header(shape) -> bytes:
    """A valid `.npy` header claiming `shape` int16, followed by a few bytes only."""
    buf = io.BytesIO()
    header = {"descr": "<i2", "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + b"\0" * 16


def codes_sample(key, codes=None, meta=None, **extra):
    meta = {"text": "[S1]hello there", "source": "x"} if meta is None else meta
    raw = {"__key__": key, "codes.npy": npy(np.zeros((20, 8), np.int16) if codes is None else codes)}
    raw["json"] = json.dumps(meta).encode() if not isinstance(meta, bytes) else meta
    return raw | extra


def grid_sample(key, grid, labels=None):
    labels = grid if labels is None else labels
    meta = json.dumps({"grid": True, "source": "legacy", "frames": 4}).encode()
    return {"__key__": key, "input_ids.npy": npy(grid), "labels.npy": npy(labels), "json": meta}


HOSTILE = {
    "string-codes": codes_sample("string-codes", np.full((20, 8), "7")),
    "float-codes": codes_sample("float-codes", np.full((20, 8), 3.7, np.float32)),
    "nan-codes": codes_sample("nan-codes", np.full((20, 8), np.nan, np.float32)),
    "bool-codes": codes_sample("bool-codes", np.ones((20, 8), bool)),
    "huge-header": {**codes_sample("huge-header"), "codes.npy": lying_header((10**12, 8))},
    "short-payload": {**codes_sample("short-payload"), "codes.npy": lying_header((20, 8))},
    "garbage-npy": {**codes_sample("garbage-npy"), "codes.npy": b"\x93NUMPY garbage"},
    "json-number": codes_sample("json-number", meta=b"42"),
    "json-string": codes_sample("json-string", meta=b'"text"'),
    "json-list": codes_sample("json-list", meta=b"[1, 2]"),
    "json-broken": codes_sample("json-broken", meta=b"{"),
    "text-number": codes_sample("text-number", meta={"text": 5}),
    "ref-text-number": codes_sample(
        "ref-text-number", meta={"text": "[S1]hi", "ref_text": 3}, **{"ref_codes.npy": npy(np.zeros((5, 8), np.int16))}
    ),
    "codes-1d": codes_sample("codes-1d", np.zeros(160, np.int16)),
    "codes-out-of-range": codes_sample("codes-out-of-range", np.full((20, 8), 5000, np.int32)),
    "grid-3-channels": grid_sample("grid-3-channels", np.zeros((10, 3), np.int32)),
    "grid-huge-ids": grid_sample("grid-huge-ids", np.full((10, 8), 10**9, np.int64)),
    "grid-text-id-beyond-vocab": grid_sample(
        "grid-text-id-beyond-vocab", np.concatenate([np.full((10, 1), 10**6), np.zeros((10, 7))], 1).astype(np.int32)
    ),
    "grid-float": grid_sample("grid-float", np.zeros((10, 8), np.float64)),
}


def write_raw(path, samples):
    with wds.TarWriter(str(path), encoder=False) as tar:
        for sample in samples:
            tar.write(sample)


@pytest.fixture
def builder(tiny_tokenizer):
    config = MossTTSDConfig.tiny()
    prompt = PromptBuilder(tiny_tokenizer, speech_offset=config.speech_offset)
    return ExampleBuilder(
        prompt, 368, max_rows=4096, vocab_size=config.vocab_size, speech_vocab_size=config.speech_vocab_size
    )


def keys_of(stream, limit):
    out = []
    for batch in DataLoader(stream, batch_size=None, num_workers=0):
        out.extend(batch.stats.keys)
        if len(out) >= limit:
            return out
    return out


def test_every_hostile_sample_is_skipped_with_its_reason(tmp_path, builder):
    good = list(generate_samples(4, seed=3))
    write_shards(good, tmp_path / "good", prefix="good")
    write_raw(tmp_path / "good" / "bad-000000.tar", HOSTILE.values())
    report = tmp_path / "report"
    stream = ShardStream(expand_shards(str(tmp_path / "good")), builder, False, False, report_dir=str(report))
    keys = keys_of(stream, 10**6)
    assert sorted(keys) == sorted(s.key for s in good)
    lines = [json.loads(x) for x in (report / "skipped-val-reader0000.jsonl").read_text().splitlines()]
    named = {key for key in HOSTILE if any(f":{key}" in r["detail"] or r["detail"].startswith(key) for r in lines)}
    assert named == set(HOSTILE) and len(lines) == len(HOSTILE)
    details = " | ".join(r["detail"] for r in lines)
    for reason in ("must hold integers", "too large", "payload has", "json must be an object", "out of range"):
        assert reason in details


def test_each_bad_sample_is_reported_once_per_run_not_once_per_pass(tmp_path, builder):
    write_shards(generate_samples(6, seed=5), tmp_path, prefix="good", max_samples=3)
    write_raw(tmp_path / "bad-000000.tar", [HOSTILE["float-codes"], HOSTILE["json-number"]])
    stream = ShardStream(
        expand_shards(str(tmp_path)), builder, repeat=True, shuffle=True, shuffle_buffer=2, report_dir=str(tmp_path)
    )
    keys_of(stream, 6 * 5)  # five passes
    lines = (tmp_path / "skipped-train-reader0000.jsonl").read_text().splitlines()
    assert len(lines) == 2 and stream.skipped == {"bad sample": 2}


def test_a_training_stream_without_one_valid_sample_stops_naming_its_shards(tmp_path, builder):
    write_raw(tmp_path / "bad-000000.tar", list(HOSTILE.values())[:5])
    write_raw(tmp_path / "bad-000001.tar", list(HOSTILE.values())[5:])
    stream = ShardStream(
        expand_shards(str(tmp_path)), builder, repeat=True, shuffle=True, shuffle_buffer=2, report_dir=str(tmp_path)
    )
    with pytest.raises(RuntimeError, match=r"no usable sample .* over its 2 shards \(.*bad-00000"):
        keys_of(stream, 1)
    assert len((tmp_path / "skipped-train-reader0000.jsonl").read_text().splitlines()) == len(HOSTILE)


def test_a_training_stream_of_only_over_long_samples_stops(tmp_path, builder):
    long = [ShardSample(f"long{i}", np.zeros((5000, 8), np.int16), "[S1]hello", "t") for i in range(3)]
    write_shards(long, tmp_path, prefix="long")
    stream = ShardStream(expand_shards(str(tmp_path)), builder, repeat=True, shuffle=False)
    with pytest.raises(RuntimeError, match="no usable sample .* in 3 passes"):
        keys_of(stream, 1)
