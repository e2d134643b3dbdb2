"""Shards in object storage, against a real S3 server (SeaweedFS, tests/s3.py): listed, read, retried, reported.

Every comparison is with the same shards read from the local disk: the keys, in order, and the bytes.
"""

import threading
import time

import pytest

from moss.data import storage
from moss.data.dataset import ShardStream, expand_shards, manifest_samples
from moss.data.examples import ExampleBuilder
from moss.data.synthetic import generate_samples
from moss.data.writer import write_shards
from moss.text import PromptBuilder


def keys(stream, limit=None) -> list[str]:
    out = []
    for batch in stream:
        out += list(batch.stats.keys)
        if limit is not None and len(out) >= limit:
            break
    return out


@pytest.fixture
def builder(tiny_tokenizer):
    return ExampleBuilder(PromptBuilder(tiny_tokenizer, speech_offset=384), text_pad_id=368)


@pytest.fixture
def remote_shards(s3, tiny_shards, request):
    bucket = s3.bucket(f"shards-{request.node.name.lower().replace('_', '-')[:40]}")
    return tiny_shards, s3.upload(tiny_shards, f"{bucket}/tiny")


def test_a_prefix_a_glob_and_a_brace_range_list_the_same_shards_as_the_local_folder(remote_shards):
    local, urls = remote_shards
    prefix = urls[0].rsplit("/", 1)[0]
    expected = [f"{prefix}/{p.name}" for p in sorted(local.glob("*.tar"))]
    assert expand_shards(prefix + "/") == expected  # a prefix: its .tar objects (the manifest is not a shard)
    assert expand_shards(prefix + "/*.tar") == expected
    names = [p.name for p in sorted(local.glob("*.tar"))]
    first, last = names[0].split("-")[1].split(".")[0], names[-1].split("-")[1].split(".")[0]
    assert expand_shards(f"{prefix}/tiny-{{{first}..{last}}}.tar") == expected
    assert len(expected) == 6


def test_an_object_reads_as_the_file_does_in_any_block_size_over_s3_and_https(remote_shards, s3):
    local, urls = remote_shards
    bucket, key = urls[1].removeprefix("s3://").split("/", 1)
    over_http = f"http://127.0.0.1:{s3.filer}/buckets/{bucket}/{key}"  # the store's own HTTP server, no credentials
    for url in (urls[1], over_http):
        for block in (511, 4096, 1 << 20):
            with storage.ObjectStream(url, block=block) as stream:
                data = b"".join(iter(lambda stream=stream: stream.read(1000), b""))
            assert data == (local / urls[1].rsplit("/", 1)[1]).read_bytes(), (url, block)


def test_a_stream_from_the_store_yields_what_the_local_one_does(remote_shards, builder):
    local, urls = remote_shards
    remote = keys(ShardStream(expand_shards(urls[0].rsplit("/", 1)[0] + "/"), builder, False, True, seed=4))
    assert remote == keys(ShardStream(expand_shards(str(local)), builder, False, True, seed=4))
    assert len(remote) == 48
    assert manifest_samples(expand_shards(urls[0].rsplit("/", 1)[0] + "/")) == 48  # its manifest, read from the store


def test_a_failed_request_is_retried_from_the_byte_where_it_stopped(remote_shards, monkeypatch):
    local, urls = remote_shards
    size = (local / urls[0].rsplit("/", 1)[1]).stat().st_size
    block = size // 5
    stream = storage.ObjectStream(urls[0], block=block)
    real, asked, failures = stream.fs.cat_file, [], iter([ConnectionResetError("reset by peer"), TimeoutError()])

    def flaky(path, start=None, end=None, **kwargs):
        asked.append(start)
        if len(asked) in (3, 4):  # the third request fails twice, then succeeds
            raise next(failures)
        return real(path, start=start, end=end, **kwargs)

    monkeypatch.setattr(stream.fs, "cat_file", flaky)
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    data = b"".join(iter(lambda: stream.read(1000), b""))
    assert data == (local / urls[0].rsplit("/", 1)[1]).read_bytes()
    assert asked[2] == asked[3] == asked[4] == 2 * block  # the same range again, not the object from its start
    assert len(asked) == 6 + 2  # each range once, and the failed one twice more


def test_a_missing_object_is_reported_at_once_and_the_stream_goes_on(remote_shards, builder, s3, caplog):
    local, urls = remote_shards
    urls = [u for u in urls if u.endswith(".tar")]
    s3.fs().rm(urls[2].removeprefix("s3://"))
    stream = ShardStream(urls, builder, False, False)
    start = time.monotonic()
    seen = keys(stream)
    assert time.monotonic() - start < 20  # a missing object is not retried for a minute
    assert len(seen) == 40 and stream.skipped["unreadable shard"] == 1
    assert any(f"{urls[2]}: size: no such object" in r.message for r in caplog.records)


@pytest.mark.slow  # restarts the server (about 20 s)
def test_a_server_restart_mid_pass_loses_and_repeats_nothing(s3, tmp_path, builder, caplog, monkeypatch):
    """The store goes away for seconds while a pass reads; the keys seen equal an uninterrupted pass's."""
    out = tmp_path / "big"
    write_shards(generate_samples(120, seed=9), out, prefix="big", max_samples=20)
    urls = [u for u in s3.upload(out, f"{s3.bucket('restart')}/big") if u.endswith(".tar")]
    expected = keys(ShardStream(expand_shards(str(out)), builder, False, False))
    monkeypatch.setattr(storage, "BLOCK", 16 << 10)  # many requests per shard: some fall in the outage
    seen, restart = [], threading.Thread(target=s3.restart, kwargs={"down_s": 3.0})
    for batch in ShardStream(urls, builder, False, False):
        seen += list(batch.stats.keys)
        if len(seen) == 10:
            restart.start()  # the server stops now, while the pass goes on reading
            time.sleep(1.0)
    restart.join()
    assert seen == expected
    assert any("trying again" in r.message for r in caplog.records)  # the store really was away


@pytest.mark.slow  # a training run (about 10 s)
def test_a_run_trains_from_the_store_and_records_no_secret(s3, tmp_path):
    """`data.train_shards=s3://...` as a user writes it; the store's secret is in no file of the run."""
    from tests.conftest import compose_train
    from train import train

    local = tmp_path / "shards"
    write_shards(generate_samples(32, seed=5), local, prefix="set", max_samples=4)
    bucket = s3.bucket("training")
    s3.upload(local, f"{bucket}/set")
    overrides = [f"data.train_shards={bucket}/set/", f"data.val_shards={bucket}/set/set-000007.tar"]
    cfg = compose_train(tmp_path, [*overrides, "trainer.max_steps=3", "data.num_workers=2"])
    result = train(cfg)
    assert result["trainer"].global_step == 3
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert s3.env["AWS_SECRET_ACCESS_KEY"].encode() not in data and b"MOSSTESTKEY" not in data, path


@pytest.mark.slow  # starts its own server (about 20 s)
def test_the_object_storage_benchmark_runs():
    from tests.training.test_throughput import run_benchmark

    result = run_benchmark("object_storage.py", "--samples", "200", "--repeats", "1", "--fail-every", "3")
    assert set(result["rows_per_s"]) == {"local disk", "S3 server"} and result["s3_over_local"] > 0
    assert result["requests"]["failing"] > result["requests"]["clean"]  # the failed requests were made again
