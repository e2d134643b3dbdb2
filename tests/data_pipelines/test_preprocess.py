"""The preprocessing pipeline: end to end into the training DataModule, bad input reported, kill -9 safe."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

from data_pipelines.preprocess import preprocess
from moss.audio import read_audio
from moss.codec import XYTokenizer
from moss.data.dataset import expand_shards, manifest_samples
from moss.data.schema import ShardSample
from tests.conftest import REPO, requires_golden
from tests.data_pipelines.conftest import pipeline_cfg, tone, write_good_corpus


def read_set(folder):
    out = {}
    for raw in wds.DataPipeline(wds.SimpleShardList(expand_shards(str(folder))), wds.tarfile_to_samples()):
        sample = ShardSample.from_wds(raw)
        out[sample.key] = sample
    return out


def test_end_to_end_into_the_training_datamodule(tmp_path, codec_files, tiny_tokenizer):
    jsonl = write_good_corpus(tmp_path / "raw", n=8)
    summary = preprocess(pipeline_cfg(codec_files, [jsonl], tmp_path / "shards", cpu_workers=2))
    assert summary["samples"] == 8 and summary["skipped"] == 0
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.tar")) == [f"00000-00000{i}.tar" for i in range(3)]
    samples = read_set(tmp_path / "shards")
    assert manifest_samples(expand_shards(str(tmp_path / "shards"))) == 8
    # codes are the codec's codes of the audio read back from disk
    codec = XYTokenizer.from_pretrained(*codec_files)
    first = samples[next(k for k in samples if k.endswith("L00000001"))]
    expected = codec.encode([read_audio(tmp_path / "raw" / "audio" / "d0.wav")])[0]
    assert np.array_equal(first.codes, expected.numpy()) and first.text == "[S1]hello 0[S2]world 0"
    voice = samples[next(k for k in samples if k.endswith("L00000003"))]
    assert voice.ref_codes is not None and voice.ref_text == "[S1]reference words"
    # ... and they train through the real DataModule
    from moss.data.datamodule import MossDataModule
    from moss.model import MossTTSDConfig

    data = MossDataModule(
        str(tmp_path / "shards"),
        packing={"budget": 2048, "window": 8},
        num_workers=0,
        tokenizer=tiny_tokenizer,
        model_config=MossTTSDConfig.tiny(),
    )
    data.setup("fit")
    keys = [k for batch in data.stream(data.train_urls, train=False) for k in batch.stats.keys]
    assert sorted(keys) == sorted(samples)


def test_malformed_input_is_reported_and_good_lines_encoded(tmp_path, codec_files):
    raw = tmp_path / "raw"
    audio = raw / "audio"
    audio.mkdir(parents=True)
    sf.write(audio / "ok.wav", tone(1.2), 16000)
    sf.write(audio / "ok8k.wav", tone(1.2, rate=8000), 8000)
    sf.write(audio / "ok48k.flac", tone(1.2, rate=48000), 48000)
    sf.write(audio / "stereo.wav", np.stack([tone(1.2), tone(1.2, seed=3)], axis=1), 16000)
    sf.write(audio / "silent.wav", np.zeros(16000, np.float32), 16000)
    sf.write(audio / "short.wav", tone(0.2), 16000)
    sf.write(audio / "long.wav", tone(3.0), 16000)
    (audio / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" + os.urandom(200))
    good = lambda f: {"file_path": f"audio/{f}", "full_transcript": "[S1]hello there[S2]hi"}  # noqa: E731
    lines = [
        json.dumps(good("ok.wav")),
        "{not json",
        json.dumps({"file_path": "audio/missing.wav", "full_transcript": "[S1]x"}),
        json.dumps(good("corrupt.wav")),
        json.dumps({"file_path": "audio/ok.wav", "full_transcript": "   "}),
        json.dumps({"file_path": "audio/ok.wav", "full_transcript": "no speaker tags here"}),
        json.dumps(good("ok8k.wav")),
        json.dumps(good("ok48k.flac")),
        json.dumps(good("stereo.wav")),
        json.dumps(good("silent.wav")),
        json.dumps(good("short.wav")),
        json.dumps({"file_path": "audio/long.wav", "full_transcript": "[S1]" + "word " * 40}),
        json.dumps({"audio": "audio/ok.wav", "text": "[S1]no reference"}),
        json.dumps({"something": "else"}),
        json.dumps(good("long.wav") | {"base_path": str(audio.parent)}),
    ]
    (raw / "in.jsonl").write_text("\n".join(lines) + "\n")
    cfg = pipeline_cfg(
        codec_files,
        [raw / "in.jsonl"],
        tmp_path / "out",
        cpu_workers=2,
        **{"limits.max_seconds": 2.5, "limits.max_chars_per_second": 30},
    )
    summary = preprocess(cfg)
    samples = read_set(tmp_path / "out")
    encoded_lines = sorted(int(k.rsplit("L", 1)[1]) for k in samples)
    assert encoded_lines == [1, 7, 8, 9]
    report = [json.loads(line) for line in (tmp_path / "out" / "skipped-00000.jsonl").read_text().splitlines()]
    reasons = {r["line"]: r["reason"] for r in report}
    assert reasons[2].startswith("invalid JSON") and reasons[3] == "missing file"
    assert reasons[4].startswith("unreadable or corrupt audio") and reasons[5] == "empty transcript"
    assert reasons[6].startswith("no [S1]/[S2] speaker tag") and reasons[10] == "silent audio"
    assert reasons[11].startswith("too short") and reasons[12].startswith("transcript too long")
    assert reasons[13].startswith("missing fields") and reasons[14].startswith("unknown format")
    assert reasons[15].startswith("longer than the maximum")  # base_path resolved, then measured
    assert all(r["input"].endswith("in.jsonl") for r in report) and summary["skipped"] == 11
    stereo = samples[next(k for k in samples if k.endswith("L00000009"))]
    assert stereo.codes.shape == (1.2 * 16000 // 1280, 8)


def run_cli(args, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "data_pipelines.preprocess", *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def cli_settings(jsonl, codec_files, cpu_workers: int) -> list[str]:
    """Command-line settings of a small, slow-enough preprocessing run (2 records per shard)."""
    return [
        f"inputs=[{jsonl}]",
        f"codec.config={codec_files[0]}",
        f"codec.checkpoint={codec_files[1]}",
        "devices=cpu",
        f"cpu_workers={cpu_workers}",
        "records_per_shard=2",
        "progress=false",
        "batch_seconds=1",
    ]


def stat_of(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.slow  # several processes (CI runs slow tests too)
def test_kill_minus_9_anywhere_then_rerun_gives_the_uninterrupted_set(tmp_path, codec_files):
    jsonl = write_good_corpus(tmp_path / "raw", n=24)
    common = cli_settings(jsonl, codec_files, cpu_workers=1)
    assert run_cli([*common, f"output_dir={tmp_path / 'straight'}"], REPO).wait() == 0
    reference = read_set(tmp_path / "straight")
    assert len(reference) == 24
    out = tmp_path / "killed"
    rng = random.Random(0)
    kills, orphans = 0, []
    for _ in range(4):
        target = rng.randint(1, 11)
        proc = run_cli([*common, f"output_dir={out}"], REPO)
        while proc.poll() is None and len(list(out.glob("*.tar.json"))) < target:
            time.sleep(0.005)
        if proc.poll() is None:
            path = f"/proc/{proc.pid}/task/{proc.pid}/children"
            orphans += [int(c) for c in open(path).read().split()] if os.path.exists(path) else []
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2
    deadline = time.monotonic() + 10  # loader processes notice that the pipeline is gone and exit
    while any(os.path.exists(f"/proc/{pid}") and "Z" not in stat_of(pid) for pid in orphans):
        assert time.monotonic() < deadline, "loader processes outlived the killed pipeline"
        time.sleep(0.1)
    assert run_cli([*common, f"output_dir={out}"], REPO).wait() == 0
    resumed = read_set(out)
    assert sorted(resumed) == sorted(reference)
    for key, sample in reference.items():
        assert np.array_equal(resumed[key].codes, sample.codes)
    assert json.loads((out / "manifest-00000.json").read_text())["samples"] == 24


def test_rerun_is_idempotent_and_a_different_plan_is_refused(tmp_path, codec_files):
    jsonl = write_good_corpus(tmp_path / "raw", n=4)
    cfg = pipeline_cfg(codec_files, [jsonl], tmp_path / "out")
    preprocess(cfg)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.tar")}
    preprocess(cfg)
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.tar")}
    cfg.records_per_shard = 5

    with pytest.raises(ValueError, match=r"written from other sources \(records_per_shard\)"):
        preprocess(cfg)


def test_ranks_split_the_records(tmp_path, codec_files, monkeypatch):
    jsonl = write_good_corpus(tmp_path / "raw", n=7)
    keys = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", "0")
        preprocess(pipeline_cfg(codec_files, [jsonl], tmp_path / "out"))
    names = sorted(p.name for p in (tmp_path / "out").glob("*.tar"))
    assert names == ["00000-000000.tar", "00000-000001.tar", "00001-000000.tar"]  # 4 + 3 records, 3 per shard
    keys = sorted(read_set(tmp_path / "out"))
    assert len(keys) == 7 and len(set(keys)) == 7
    assert manifest_samples(expand_shards(str(tmp_path / "out"))) == 7


@requires_golden
def test_legacy_import_keeps_the_grids_and_refuses_code(tmp_path, golden):
    import pickle

    from safetensors.torch import load_file

    from data_pipelines.import_legacy import import_legacy
    from data_pipelines.inspect_shards import render, shard_set_stats

    result = import_legacy(golden / "data" / "preprocess_raw" / "processed.pkl", tmp_path / "legacy")
    assert result["imported"] == 2
    grids = load_file(golden / "data" / "preprocess_raw" / "grids.safetensors")
    for key, sample in read_set(tmp_path / "legacy").items():
        i = int(key.rsplit("-", 1)[1])
        assert np.array_equal(sample.grid, grids[f"sample{i}_input_ids"].numpy())
        assert np.array_equal(sample.grid_labels, grids[f"sample{i}_labels"].numpy())
    stats = shard_set_stats(tmp_path / "legacy")
    assert stats["samples"] == 2 and "0-5 s" in render(stats)
    # A pickle that would run code is refused, and the record is reported, not executed.
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"input_ids": [[1] * 8], "labels": [[1] * 8], "x": os.system}))
    np.save(tmp_path / "evil_metas.npy", np.array([[0], [1], [0]]))
    result = import_legacy(evil, tmp_path / "evil-out")
    assert result["imported"] == 0 and "refusing to load posix.system" in result["skipped"][0]["reason"]


def test_inspect_reports_the_pipeline_output(tmp_path, codec_files):
    from data_pipelines.inspect_shards import shard_set_stats

    raw = tmp_path / "raw"
    jsonl = write_good_corpus(raw, n=5)
    with open(jsonl, "a") as f:
        f.write('{"file_path": "audio/none.wav", "full_transcript": "[S1]x"}\n')
    preprocess(pipeline_cfg(codec_files, [jsonl], tmp_path / "out"))
    stats = shard_set_stats(tmp_path / "out")
    assert stats["samples"] == 5 and stats["skipped"] == {"missing file": 1} and stats["shards"] == 2


@pytest.mark.slow  # two pipeline runs over 48 min of audio (about 25 s)
def test_peak_memory_does_not_grow_with_the_shard_size():
    from tests.training.test_throughput import run_benchmark

    result = run_benchmark(
        "preprocess_memory.py", "--records", "40", "--small", "8", "--minutes", "1", "--batch-seconds", "60"
    )
    small, large = result["runs"]
    # Holding the decoded records of a shard would add 32 x 1 min x 16 kHz x 4 B = 123 MB here.
    assert large["main_mb"] - small["main_mb"] < 40, result
    assert max(large["main_mb"], large["loader_mb"]) < 1500, result


CRASHING_ENCODER = """
import os, sys
from omegaconf import OmegaConf
from moss.codec import XYTokenizer
real = XYTokenizer.encode
def encode(self, clips, *args, **kwargs):
    if any(len(c) == {poison} for c in clips):
        os._exit(9)  # the way an out-of-memory kill or a fault in native code ends the encoder
    return real(self, clips, *args, **kwargs)
XYTokenizer.encode = encode
from data_pipelines.preprocess import preprocess
preprocess(OmegaConf.load(sys.argv[1]))
"""


@pytest.mark.slow  # four pipeline processes (15 s)
def test_a_record_that_kills_the_encoder_is_isolated_then_reported(tmp_path, codec_files):
    from omegaconf import OmegaConf

    jsonl = write_good_corpus(tmp_path / "raw", n=6)
    sf.write(tmp_path / "raw" / "audio" / "poison.wav", tone(1.37), 16000)
    with open(jsonl, "a") as f:
        f.write(json.dumps({"file_path": "audio/poison.wav", "full_transcript": "[S1]deadly words"}) + "\n")
    cfg = pipeline_cfg(codec_files, [jsonl], tmp_path / "out", records_per_shard=7, batch_seconds=100)
    OmegaConf.save(cfg, tmp_path / "cfg.yaml")
    (tmp_path / "run.py").write_text(CRASHING_ENCODER.replace("{poison}", str(int(1.37 * 16000))))
    codes = []
    for _ in range(4):
        run = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "cfg.yaml")], cwd=REPO)
        codes.append(run.returncode)
        if run.returncode == 0:
            break
    # the batch, then the poison alone twice; the fourth run reports it and finishes the shard
    assert codes == [9, 9, 9, 0]
    assert sorted(int(k.rsplit("L", 1)[1]) for k in read_set(tmp_path / "out")) == [1, 2, 3, 4, 5, 6]
    (skip,) = [json.loads(x) for x in (tmp_path / "out" / "skipped-00000.jsonl").read_text().splitlines()]
    assert skip["line"] == 7 and skip["stage"] == "encode" and "died twice" in skip["reason"]
    assert not list((tmp_path / "out").glob("*.encoding"))


def test_inspect_leaves_nothing_in_the_working_directory(tmp_path, tiny_shards):
    (tmp_path / "cwd").mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-m", "data_pipelines.inspect_shards", f"dir={tiny_shards}"],
        cwd=tmp_path / "cwd",
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "samples" in run.stdout and list((tmp_path / "cwd").iterdir()) == []


@pytest.mark.slow  # two preprocessing processes with loader workers (about 30 s)
def test_a_group_sigterm_stops_cleanly_and_the_rerun_loses_and_repeats_nothing(tmp_path, codec_files):
    """Schedulers signal the whole process group: the loaders must not die first and be reported as failures."""
    jsonl = write_good_corpus(tmp_path / "raw", n=24)
    common = [*cli_settings(jsonl, codec_files, cpu_workers=2), f"output_dir={tmp_path / 'out'}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_pipelines.preprocess", *common],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    while proc.poll() is None and len(list((tmp_path / "out").glob("*.tar.json"))) < 2:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    done = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.tar.json")]
    assert all(not entry["skipped"] for entry in done), "a loader killed by the signal reported its records"
    assert run_cli(common, REPO).wait() == 0
    samples, skipped = read_set(tmp_path / "out"), list((tmp_path / "out").glob("skipped-*.jsonl"))
    assert len(samples) == 24 and all(not p.read_text().strip() for p in skipped)


def test_the_encoder_dtype_is_part_of_the_shard_set(tmp_path, codec_files):
    from data_pipelines.preprocess import check_arguments, journal, stale_reason
    from moss.errors import ConfigError

    jsonl = write_good_corpus(tmp_path / "raw", n=3)
    cfg = pipeline_cfg(codec_files, [jsonl], tmp_path / "out")
    assert "codec_dtype" not in journal(cfg).made_from  # float32: as sets made before the setting
    preprocess(cfg)
    cfg.codec_dtype = "bfloat16"
    assert "codec_dtype" in stale_reason(cfg)
    bf16 = pipeline_cfg(codec_files, [jsonl], tmp_path / "bf16", codec_dtype="bfloat16")
    assert preprocess(bf16)["samples"] == 3  # encoded under bfloat16 autocast
    cfg.codec_dtype = "int8"
    with pytest.raises(
        ConfigError, match="codec_dtype='int8' is refused: input should be 'float32', 'bfloat16' or 'float16'"
    ):
        check_arguments(cfg)


def test_the_shard_count_follows_usable_records_and_a_stopped_run_resumes(tmp_path, codec_files):
    """A long input with few usable records made a nearly empty shard per `records_per_shard` lines."""
    import json as _json

    from data_pipelines import preprocess as module
    from data_pipelines.preprocess import preprocess

    jsonl = write_good_corpus(tmp_path / "raw", n=6)
    good = jsonl.read_text().splitlines()
    missing = [_json.dumps({"file_path": f"audio/gone{i}.wav", "full_transcript": "[S1]x"}) for i in range(200)]
    lines = missing[:100] + good[:3] + missing[100:] + good[3:]
    jsonl.write_text("\n".join(lines) + "\n")
    summary = preprocess(pipeline_cfg(codec_files, [jsonl], tmp_path / "out", records_per_shard=4))
    shards = sorted((tmp_path / "out").glob("*.tar"))
    assert summary["samples"] == 6 and len(shards) == 2, shards  # 4 samples (at least), then the rest
    manifest = _json.loads((tmp_path / "out" / "manifest-00000.json").read_text())
    assert [e["samples"] for e in manifest["shards"]] == [4, 2]  # closed at the chunk that brought the 4th
    assert sum(1 for _ in (tmp_path / "out" / "skipped-00000.jsonl").open()) == 200

    # Stopped after its first shard, the run continues with the chunks after it and ends with the same shards.
    real, written = module._write_one_shard, []

    def stops_after_one(*args, **kwargs):
        if written:
            raise KeyboardInterrupt
        written.append(args[1])
        return real(*args, **kwargs)

    module._write_one_shard = stops_after_one
    try:
        with pytest.raises(KeyboardInterrupt):
            preprocess(pipeline_cfg(codec_files, [jsonl], tmp_path / "again", records_per_shard=4))
    finally:
        module._write_one_shard = real
    assert [p.name for p in (tmp_path / "again").glob("*.tar")] == [shards[0].name]
    preprocess(pipeline_cfg(codec_files, [jsonl], tmp_path / "again", records_per_shard=4))
    for shard in shards:
        assert (tmp_path / "again" / shard.name).read_bytes() == shard.read_bytes()
