"""Preprocessing into object storage (a real S3 server, tests/s3.py): killed, resumed on another machine, whole.

The shard set in the bucket holds the samples of a local run, each once; an object is there whole or not at all.
"""

import pytest

from data_pipelines import preprocess as module
from data_pipelines.preprocess import preprocess
from moss.data import tar_reader
from moss.data.dataset import expand_shards, manifest_samples
from moss.errors import ConfigError
from tests.data_pipelines.conftest import pipeline_cfg, write_good_corpus


def shard_keys(urls) -> list[str]:
    return sorted(raw["__key__"] for url in urls for raw in tar_reader.samples(url))


def test_a_killed_run_into_a_bucket_resumes_on_another_machine_to_the_local_shard_set(tmp_path, codec_files, s3):
    jsonl = write_good_corpus(tmp_path / "raw", n=8)
    local = pipeline_cfg(codec_files, [jsonl], tmp_path / "local", records_per_shard=2)
    assert preprocess(local)["samples"] == 8
    expected = shard_keys(expand_shards(str(tmp_path / "local")))
    bucket = s3.bucket("preprocessed")
    remote = f"{bucket}/set"

    def cfg(work):
        return pipeline_cfg(codec_files, [jsonl], remote, records_per_shard=2, work_dir=str(tmp_path / work))

    real, written = module.write_shard, []

    def killed_after_two(path, samples):
        if len(written) == 2:
            raise KeyboardInterrupt  # as a kill would stop it, between two shards
        written.append(path)
        return real(path, samples)

    module.write_shard = killed_after_two
    try:
        with pytest.raises(KeyboardInterrupt):
            preprocess(cfg("machine-a"))
    finally:
        module.write_shard = real
    published = [u for u in expand_shards(remote + "/")]
    assert len(published) == 2  # the finished shards are in the store, the rest is not
    assert [u.rsplit("/", 1)[1] for u in published] == [p.name for p in written]
    assert set(shard_keys(published)) < set(expected)
    assert not list((tmp_path / "machine-a").glob("*.tar"))  # uploaded, then freed

    summary = preprocess(cfg("machine-b"))  # another machine: what is done comes from the store
    assert summary["samples"] == 8
    urls = expand_shards(remote + "/")
    assert shard_keys(urls) == expected and manifest_samples(urls) == 8
    assert not list((tmp_path / "machine-b").glob("*.tar"))


def test_a_prefix_of_other_objects_is_refused(tmp_path, codec_files, s3):
    jsonl = write_good_corpus(tmp_path / "raw", n=2)
    bucket = s3.bucket("someone-elses")
    s3.fs().pipe(f"{bucket.removeprefix('s3://')}/data/notes.txt", b"keep")
    with pytest.raises(ConfigError, match="holds objects that preprocessing did not write \\(notes.txt\\)"):
        preprocess(pipeline_cfg(codec_files, [jsonl], f"{bucket}/data", work_dir=str(tmp_path / "work")))
    assert s3.fs().cat_file(f"{bucket.removeprefix('s3://')}/data/notes.txt") == b"keep"
