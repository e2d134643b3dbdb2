"""Records preprocessing must refuse, generated: empty or tag-only transcripts, foreign speaker tags, control
characters, audio cut short in every format; legal files it must accept (FLAC without a length); and the
run-level guards (a second run into one folder, an input changing mid-run, 100k lines in flat time and memory)."""

import json
import os
import random
import resource
import time

import numpy as np
import pytest
import soundfile as sf

from data_pipelines.preprocess import preprocess
from data_pipelines.records import Limits, Record, RecordError, _load, check_transcript
from moss.audio import AudioError, read_audio
from moss.errors import ConfigError
from moss.outputs import lock_folder
from tests.data_pipelines.conftest import pipeline_cfg, tone, write_good_corpus

WHITESPACE = [" ", "\t", "\n", "\u3000", "\u00a0", ""]


def bad_transcript(rng: random.Random) -> tuple[str, str]:
    """(transcript, the reason it must be refused) of one generated kind."""
    kind = rng.randrange(4)
    pad = lambda: "".join(rng.choice(WHITESPACE) for _ in range(rng.randrange(0, 4)))  # noqa: E731
    if kind == 0:
        return "".join(rng.choice(["[S1]", "[S2]", "[1]", "[2]"]) + pad() for _ in range(rng.randrange(1, 6))), "empty"
    if kind == 1:
        n = rng.choice([0, 3, 4, 9, 12, 21, 100])
        return f"[S1]hello{pad()}[S{n}]there", "unknown speaker tags"
    if kind == 2:
        code = rng.choice([c for c in range(32) if c not in (9, 10, 13)] + [127])
        text = "[S1]hello there"
        at = rng.randrange(4, len(text))
        return text[:at] + chr(code) + text[at:], "control character"
    return pad(), "empty transcript"


@pytest.mark.parametrize("case", range(60))
def test_generated_bad_transcripts_are_refused_with_their_reason(case):
    text, reason = bad_transcript(random.Random(case))
    with pytest.raises(RecordError, match=reason):
        check_transcript("full_transcript", text)


def test_good_transcripts_pass():
    for text in ("[S1]hello", "[S1]a\tb\n[S2]c", "[S2]你好", "[1]hi[2]ok", "[S1] ha ha"):
        check_transcript("text", text)


@pytest.mark.parametrize("field", ["reference_text", "text"])
@pytest.mark.parametrize("value", ["", "  ", "[S3]x", "[S1]", "[S1]a\x00b"])
def test_a_cloning_record_with_an_unusable_transcript_is_reported(tmp_path, field, value):
    sf.write(tmp_path / "a.wav", tone(1.0), 16000)
    item = {"reference_audio": "a.wav", "reference_text": "[S1]ref words", "audio": "a.wav", "text": "[S1]target"}
    item[field] = value
    line = json.dumps(item)
    (tmp_path / "in.jsonl").write_text(line + "\n")
    record = Record(str(tmp_path / "in.jsonl"), 1, 0, len(line.encode()), None)
    with pytest.raises(RecordError) as err:
        _load(record, Limits())
    assert err.value.stage == "validate" and field in str(err.value) or "empty transcript" in str(err.value)


FORMATS = [("wav", {}), ("ogg", {"format": "OGG", "subtype": "VORBIS"}), ("mp3", {"format": "MP3"})]


@pytest.mark.parametrize("case", range(45))
def test_audio_cut_short_is_refused_in_every_format(tmp_path, case):
    rng = random.Random(case)
    ext, kw = FORMATS[case % len(FORMATS)]
    path = tmp_path / f"full.{ext}"
    sf.write(path, tone(rng.uniform(2.0, 6.0), seed=case), 16000, **kw)
    data = path.read_bytes()
    keep = rng.choice([rng.uniform(0.5, 0.99), rng.uniform(0.99, 0.999)])
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[: int(len(data) * keep)])
    assert len(read_audio(path)) > 0  # the whole file reads
    with pytest.raises((AudioError, RuntimeError)):  # RuntimeError: libsndfile's own refusal
        read_audio(cut)


def test_a_flac_without_a_length_in_its_header_is_read_to_its_end(tmp_path):
    wave = tone(2.5)
    sf.write(tmp_path / "a.flac", wave, 16000)
    data = bytearray((tmp_path / "a.flac").read_bytes())
    info = int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)  # STREAMINFO total samples := 0 ("unknown")
    data[18:26] = info.to_bytes(8, "big")
    (tmp_path / "u.flac").write_bytes(bytes(data))
    assert sf.info(str(tmp_path / "u.flac")).frames > 10**15  # what libsndfile reports for it
    np.testing.assert_allclose(read_audio(tmp_path / "u.flac"), read_audio(tmp_path / "a.flac"), atol=1e-6)
    from moss.audio import AudioLimits

    with pytest.raises(AudioError, match="decoded past 1 s"):
        read_audio(tmp_path / "u.flac", limits=AudioLimits(max_seconds=1.0))


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, codec_files):
    jsonl = write_good_corpus(tmp_path / "raw", n=2)
    cfg = pipeline_cfg(codec_files, [jsonl], tmp_path / "out", cpu_workers=1)
    first = lock_folder(tmp_path / "out", "preprocess run")  # the first run, still going
    with pytest.raises(ConfigError, match="being written by another preprocess run"):
        preprocess(cfg)
    first.release()
    assert preprocess(cfg)["samples"] == 2


def test_a_folder_of_other_files_is_refused(tmp_path, codec_files):
    jsonl = write_good_corpus(tmp_path / "raw", n=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="mine.txt.*choose a new or empty folder"):
        preprocess(pipeline_cfg(codec_files, [jsonl], tmp_path / "out", cpu_workers=1))
    assert os.listdir(tmp_path / "out") == ["mine.txt"] and (tmp_path / "out" / "mine.txt").read_text() == "keep"
    assert preprocess(pipeline_cfg(codec_files, [jsonl], tmp_path / "new", cpu_workers=1))["samples"] == 2


def test_an_input_that_changes_mid_run_stops_it_before_a_shard_is_done(tmp_path, codec_files, monkeypatch):
    from data_pipelines import preprocess as module

    jsonl = write_good_corpus(tmp_path / "raw", n=4)
    real = module.write_shard

    def edits_the_input(path, samples):
        def edited():
            for n, sample in enumerate(samples):
                if n == 1:  # while the shard is being written
                    with open(jsonl, "a") as f:
                        f.write(json.dumps({"file_path": "audio/d0.wav", "full_transcript": "[S1]added"}) + "\n")
                yield sample

        return real(path, edited())

    monkeypatch.setattr(module, "write_shard", edits_the_input)
    cfg = pipeline_cfg(codec_files, [jsonl], tmp_path / "out", cpu_workers=1, records_per_shard=2)
    with pytest.raises(ConfigError, match="changed while it was being preprocessed"):
        preprocess(cfg)
    assert not list((tmp_path / "out").glob("[0-9]*-*.json")), "no shard was marked done"
    assert not list((tmp_path / "out").glob("*.tar")), "no readable shard of the changed input was left"
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="other sources"):  # the rerun does not mix old and new lines
        preprocess(cfg)


@pytest.mark.slow  # 100,000 records through the loader pool (about 1 minute)
def test_a_100k_line_input_runs_in_flat_memory(tmp_path, codec_files):
    lines = [json.dumps({"file_path": f"missing-{i}.wav", "full_transcript": f"[S1]line {i}"}) for i in range(100_000)]
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    summary = preprocess(pipeline_cfg(codec_files, [tmp_path / "big.jsonl"], tmp_path / "out", cpu_workers=2))
    assert summary["skipped"] == 100_000 and summary["samples"] == 0
    assert time.monotonic() - started < 600
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 300, f"the main process grew by {grown_mb:.0f} MB"
