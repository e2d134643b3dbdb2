"""Shard writer and stream: round trip, manifest, exactly-once passes, and bad input skipped with a reason."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from moss.data.dataset import ShardStream, expand_shards, manifest_samples
from moss.data.examples import ExampleBuilder
from moss.data.schema import SampleError, ShardSample
from moss.data.stages import ShardReader
from moss.data.synthetic import generate_samples
from moss.data.writer import write_shards
from moss.errors import ConfigError
from moss.text import PromptBuilder


@pytest.fixture
def builder(tiny_tokenizer):
    return ExampleBuilder(PromptBuilder(tiny_tokenizer, speech_offset=384), text_pad_id=368, max_rows=4096)


def keys_of(stream, workers=0, limit=None):
    iterator = iter(DataLoader(stream, batch_size=None, num_workers=workers))
    out = []
    try:
        for batch in iterator:
            out.extend(batch.stats.keys)
            if limit and len(out) >= limit:
                break
    finally:
        del iterator  # its workers stop now, not when the next test collects garbage
    return out


def test_writer_round_trip_and_manifest(tiny_shards):
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    assert [s["shard"] for s in manifest["shards"]] == [f"tiny-{i:06d}.tar" for i in range(6)]
    assert manifest["samples"] == 48 and not list(tiny_shards.glob("*.tmp"))
    originals = {s.key: s for s in generate_samples(48, seed=3)}
    assert manifest["frames"] == sum(s.frames for s in originals.values())
    with tarfile.open(tiny_shards / "tiny-000000.tar") as tar:
        names = tar.getnames()
    assert "synthetic-3-0000000.codes.npy" in names and "synthetic-3-0000000.json" in names
    urls = expand_shards(str(tiny_shards))
    assert manifest_samples(urls) == 48
    import webdataset as wds

    for raw in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        sample = ShardSample.from_wds(raw)
        ref = originals[sample.key]
        assert np.array_equal(sample.codes, ref.codes) and sample.text == ref.text
        assert sample.ref_text == ref.ref_text and sample.codes.dtype == np.int16


def test_example_is_the_delayed_prompt_grid(tiny_shards, builder):
    batch = next(iter(ShardStream(expand_shards(str(tiny_shards)), builder, repeat=False, shuffle=False)))
    sample = next(generate_samples(1, seed=3))
    grid, labels = builder.prompt(sample.text, sample.codes, sample.ref_text, sample.ref_codes)
    ids = batch.input_ids[0]
    assert ids.shape == (grid.shape[0] + 7, 8) and batch.stats.keys == (sample.key,)
    assert torch.equal(ids[3 : 3 + grid.shape[0], 3], torch.from_numpy(grid[:, 3]))
    assert (batch.labels[0, :3, 3] == -100).all()


@pytest.mark.parametrize("workers", [0, 2])
def test_validation_pass_is_exactly_once(tiny_shards, builder, workers):
    stream = ShardStream(expand_shards(str(tiny_shards)), builder, repeat=False, shuffle=False)
    keys = keys_of(stream, workers)
    assert sorted(keys) == sorted(s.key for s in generate_samples(48, seed=3))


def test_two_ranks_split_the_shards_disjointly(tiny_shards, builder, monkeypatch):
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append(keys_of(ShardStream(expand_shards(str(tiny_shards)), builder, repeat=False, shuffle=False), 2))
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) + len(seen[1]) == 48


def test_training_stream_repeats_with_new_orders(tiny_shards, builder):
    stream = ShardStream(expand_shards(str(tiny_shards)), builder, repeat=True, shuffle=True, seed=5, shuffle_buffer=8)
    keys = keys_of(stream, limit=96)
    # The 8-sample shuffle buffer straddles pass boundaries; otherwise each pass is one full, fresh order.
    assert len(set(keys[:40])) == 40 and set(keys) == {s.key for s in generate_samples(48, seed=3)}
    assert max(keys.count(k) for k in set(keys)) <= 3
    reader = ShardReader(stream.urls, 0, 1, shuffle=True, seed=5, repeat=True, skips=None, liveness=None)
    assert reader.shards(0) != reader.shards(1) and sorted(reader.shards(0)) == sorted(reader.shards(1))


def test_fewer_shards_than_readers_fails_with_the_fix(tiny_shards, builder, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    stream = ShardStream(expand_shards(str(tiny_shards)), builder, repeat=True, shuffle=False)
    with pytest.raises(ConfigError, match="has 6 shards but 4 ranks x 2 workers = 8 readers.*lower data.num_workers"):
        keys_of(stream, workers=2, limit=1)


def test_bad_input_is_skipped_counted_and_named(tmp_path, builder, caplog):
    good = list(generate_samples(6, seed=9))
    write_shards(good[:3], tmp_path, prefix="a", max_samples=10)
    # A sample without codes, and an over-long one, in a second shard.
    with tarfile.open(tmp_path / "b-000000.tar", "w") as tar:
        for name, data in [("broken.json", json.dumps({"text": "[S1]hi"}).encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    long = ShardSample("too-long", np.zeros((5000, 8), np.int16), "[S1]hello", "test")
    write_shards([long, good[3]], tmp_path / "c", prefix="c")
    (tmp_path / "c" / "c-000000.tar").rename(tmp_path / "c-000000.tar")
    # A truncated shard: its first sample survives, the cut-off rest is reported.
    write_shards(good[4:], tmp_path / "d", prefix="d")
    data = (tmp_path / "d" / "d-000000.tar").read_bytes()
    (tmp_path / "d-000000.tar").write_bytes(data[: len(data) // 2 + 100])
    stream = ShardStream(expand_shards(str(tmp_path / "*.tar")), builder, repeat=False, shuffle=False)
    keys = keys_of(stream)
    assert {s.key for s in good[:4]} <= set(keys) and "too-long" not in keys
    # bad: missing codes, and the half-written last sample of the truncated shard (its json is cut off)
    assert stream.skipped["bad sample"] == 2 and stream.skipped["over-long sample"] == 1
    assert stream.skipped["unreadable shard"] >= 1
    assert "missing fields ['codes.npy']" in caplog.text and "exceed the limit of 4096" in caplog.text


def test_schema_violations_are_named():
    with pytest.raises(SampleError, match="k1: codes.npy must be"):
        ShardSample("k1", np.zeros((3, 7), np.int16), "[S1]x", "s").validate()
    with pytest.raises(SampleError, match="k2: codes.npy has codes outside"):
        ShardSample("k2", np.full((3, 8), 1024, np.int16), "[S1]x", "s").validate()
    with pytest.raises(SampleError, match="k3: empty transcript"):
        ShardSample("k3", np.zeros((3, 8), np.int16), " ", "s").validate()


def test_shard_specs(tiny_shards):
    everything = expand_shards(str(tiny_shards))
    assert len(everything) == 6
    assert expand_shards(str(tiny_shards / "tiny-{000000..000002}.tar")) == everything[:3]
    assert expand_shards(str(tiny_shards / "*.tar")) == everything
    with pytest.raises(FileNotFoundError, match="no shards match data.train_shards=.*set data.train_shards="):
        expand_shards(str(tiny_shards / "nothing-*.tar"))


def packed_stream(urls, builder, repeat, **kwargs):
    return ShardStream(
        urls,
        builder,
        repeat=repeat,
        shuffle=repeat,
        seed=7,
        shuffle_buffer=8,
        packer={"budget": 1024, "window": 8, "min_fill": 0.97},
        **kwargs,
    )


def test_packed_pass_over_two_ranks_and_two_workers_is_exactly_once(tiny_shards, builder, monkeypatch):
    keys = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        for batch in DataLoader(
            packed_stream(expand_shards(str(tiny_shards)), builder, False), batch_size=None, num_workers=2
        ):
            assert batch.input_ids.shape == (1, 1024, 8) and int(batch.stats.real_rows) <= 1024
            keys.extend(batch.stats.keys)
    assert sorted(keys) == sorted(s.key for s in generate_samples(48, seed=3))


@pytest.mark.parametrize("packed", [True, False])
def test_stream_state_restores_the_exact_continuation(tiny_shards, builder, packed):
    urls = expand_shards(str(tiny_shards))

    def make():
        if packed:
            return packed_stream(urls, builder, True)
        return ShardStream(urls, builder, repeat=True, shuffle=True, seed=7, shuffle_buffer=8, batch_size=3)

    reference = make()
    it = iter(reference)
    head = [next(it).stats.keys for _ in range(9)]
    state = reference.state_dict()
    tail = [next(it).stats.keys for _ in range(30)]  # crosses into the second pass
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state survives plain serialisation
    again = iter(resumed)
    assert [next(again).stats.keys for _ in range(30)] == tail and head != tail[:9]


def test_skip_report_is_written(tmp_path, builder):
    long = ShardSample("too-long", np.zeros((5000, 8), np.int16), "[S1]hello", "test")
    write_shards([long, *generate_samples(2, seed=4)], tmp_path / "s", prefix="s")
    report = tmp_path / "report"
    stream = ShardStream(
        expand_shards(str(tmp_path / "s")), builder, repeat=False, shuffle=False, report_dir=str(report)
    )
    batches = list(stream)
    assert batches[-1].stats.skipped == {"over-long sample": 1}
    (line,) = (report / "skipped-val-reader0000.jsonl").read_text().splitlines()
    assert json.loads(line)["reason"] == "over-long sample" and "too-long" in json.loads(line)["detail"]


def test_validation_pass_with_more_readers_than_shards_is_still_exactly_once(tmp_path, builder, monkeypatch):
    write_shards(generate_samples(5, seed=2), tmp_path, prefix="v", max_samples=5)  # one shard, two ranks
    keys = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        keys += keys_of(ShardStream(expand_shards(str(tmp_path)), builder, repeat=False, shuffle=False))
    assert sorted(keys) == sorted(s.key for s in generate_samples(5, seed=2))


@pytest.mark.slow
def test_loader_workers_beside_busy_processes_deliver_every_sample_every_time(tiny_shards, builder):
    """A loader worker was once reported dead ("exited unexpectedly") in a suite run on a machine at load 8-12.
    The training loader as the data module builds it (persistent workers that watch their stop signals), two
    passes at a time, eight times, beside eight processes that keep both cores busy: every sample, every pass."""
    import subprocess
    import sys

    from torchdata.stateful_dataloader import StatefulDataLoader

    from moss.data.datamodule import outlive_group_stops

    expected = sorted(s.key for s in generate_samples(48, seed=3))
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(8)]
    try:
        for _ in range(8):
            stream = packed_stream(expand_shards(str(tiny_shards)), builder, False)
            loader = StatefulDataLoader(
                stream, batch_size=None, num_workers=3, persistent_workers=True, worker_init_fn=outlive_group_stops
            )
            for _ in range(2):
                assert sorted(k for batch in loader for k in batch.stats.keys) == expected
            del loader
    finally:
        for process in busy:
            process.kill()
            process.wait()
