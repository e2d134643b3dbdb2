"""python -m data_pipelines.transcribe: recordings -> tagged records, with stand-ins whose outcome is known, and
with the real VAD and tiny random transformers models."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as F
from omegaconf import OmegaConf

from data_pipelines.diarisation import DiarisationSettings, EmbeddingDiariser, VadSettings, cluster, windows
from data_pipelines.transcribe import recording_id, transcribe
from moss.evaluation.speech_models import Transcript
from moss.evaluation.turns import Word
from moss.outputs import OutputFolder

RATE = 16000
LOW, HIGH = 200.0, 900.0  # the two stand-in "voices"


def tone(seconds: float, freq: float) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * freq * np.arange(int(seconds * RATE)) / RATE)).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


def dominant(clip: np.ndarray) -> str:
    spectrum = np.abs(np.fft.rfft(clip))
    freqs = np.fft.rfftfreq(len(clip), 1 / RATE)
    return "low" if spectrum[freqs < 500].sum() > spectrum[freqs >= 500].sum() else "high"


class EnergyVad:
    """Stand-in VAD: 50 ms frames over an RMS floor, joined across gaps under 0.3 s."""

    def __call__(self, wave, rate):
        frame = rate // 20
        loud = [np.sqrt(np.mean(wave[i : i + frame] ** 2)) > 0.01 for i in range(0, len(wave), frame)]
        regions = []
        for i, on in enumerate(loud):
            if not on:
                continue
            start, end = i / 20, (i + 1) / 20
            if regions and start - regions[-1][1] < 0.3:
                regions[-1] = (regions[-1][0], end)
            else:
                regions.append((start, end))
        return [(a, min(b, len(wave) / rate)) for a, b in regions]


def band_embedding(clips, rate):
    """Stand-in speaker embedding: spectral power below and above 500 Hz (the two voices are orthogonal)."""
    rows = []
    for clip in clips:
        spectrum = np.abs(np.fft.rfft(clip)) ** 2
        freqs = np.fft.rfftfreq(len(clip), 1 / rate)
        rows.append([spectrum[freqs < 500].sum(), spectrum[freqs >= 500].sum()])
    return np.asarray(rows)


class ScriptedAsr:
    """Stand-in ASR: a word per sounding 0.5 s block, `low` or `high` by its pitch; confidence 0.9."""

    sureness = 0.9

    def __init__(self):
        self.clips = 0

    def __call__(self, clips, rate, confidence=False):
        self.clips += len(clips)
        out = []
        for clip in clips:
            block = rate // 2
            words = [
                Word(dominant(clip[i : i + block]), i / rate, (i + block) / rate)
                for i in range(0, len(clip) - block + 1, block)
                if np.sqrt(np.mean(clip[i : i + block] ** 2)) > 0.01
            ]
            out.append(Transcript(" ".join(w.text for w in words), words, self.sureness if confidence else None))
        return out


class StandIns:
    def __init__(self):
        self.vad, self.asr = EnergyVad(), ScriptedAsr()
        self.diarise = EmbeddingDiariser(band_embedding, DiarisationSettings())


def config(tmp_path, **extra):
    base = OmegaConf.load(Path(__file__).parents[2] / "conf" / "transcribe.yaml")
    settings = OmegaConf.masked_copy(base, [k for k in base if k not in ("defaults", "hydra")])
    run = {"input": str(tmp_path / "recordings"), "output_dir": str(tmp_path / "out"), "progress": False}
    return OmegaConf.merge(settings, run, extra)


@pytest.fixture
def recordings(tmp_path):
    folder = tmp_path / "recordings"
    folder.mkdir()
    dialogue = np.concatenate([tone(3, LOW), silence(0.5), tone(3, HIGH), silence(0.5), tone(3, LOW), silence(1)])
    sf.write(folder / "interview.wav", dialogue, RATE)
    parts = [tone(4, LOW), silence(2.5), tone(4, LOW), silence(2.5), tone(4, LOW), silence(1)]
    sf.write(folder / "monologue.flac", np.concatenate(parts), RATE)
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
    return folder


def test_a_dialogue_and_a_monologue_become_the_records_they_contain(tmp_path, recordings):
    report = transcribe(config(tmp_path), models=StandIns())
    out = tmp_path / "out"
    (record,) = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    low, high = " ".join(["low"] * 6), " ".join(["high"] * 6)
    assert record["full_transcript"] == f"[S1]{low}[S2]{high}[S1]{low}"
    assert (record["start"], record["end"]) == (0.0, 10.0)
    assert (record["asr_confidence"], record["diarisation_confidence"]) == (0.9, 1.0)
    assert record["source_audio"] == str((recordings / "interview.wav").resolve())
    clip, rate = sf.read(out / record["file_path"], dtype="float32")
    assert rate == RATE and len(clip) == 10 * RATE
    loudness = float(F.loudness(torch.from_numpy(clip)[None], RATE))
    assert loudness == pytest.approx(-23.0, abs=0.3) and np.abs(clip).max() < 10 ** (-1 / 20)
    monologues = [json.loads(line) for line in (out / "monologues.jsonl").read_text().splitlines()]
    assert [(m["start"], m["end"]) for m in monologues] == [(0.0, 4.0), (6.5, 10.5), (13.0, 17.0)]
    assert {m["full_transcript"] for m in monologues} == {" ".join(["low"] * 8)}
    assert {m["speaker"] for m in monologues} == {recording_id((recordings / "monologue.flac").resolve())}
    (skip,) = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert skip["input"].endswith("broken.wav") and skip["reason"].startswith("unreadable") and skip["stage"] == "read"
    assert report["records"] == 1 and report["monologues"] == 3 and report["skipped"] == {"unreadable": 1}
    assert report["hours_in"] == pytest.approx((11.0 + 18.0) / 3600, abs=1e-4)
    assert report["hours_out"] == pytest.approx(22.0 / 3600, abs=1e-4)


def test_a_rerun_resumes_where_the_last_one_stopped_and_writes_the_same_outputs(tmp_path, recordings):
    models = StandIns()
    transcribe(config(tmp_path), models=models)
    out = tmp_path / "out"
    names = ("records.jsonl", "monologues.jsonl", "skipped.jsonl", "report.json")
    first = {name: (out / name).read_bytes() for name in names}
    done = models.asr.clips
    transcribe(config(tmp_path), models=models)  # everything done: nothing is transcribed again
    assert models.asr.clips == done and {n: (out / n).read_bytes() for n in names} == first
    (out / "parts" / f"{recording_id((recordings / 'interview.wav').resolve())}.json").unlink()  # killed mid-way
    transcribe(config(tmp_path), models=models)
    assert models.asr.clips == done + 3  # the interview's three speech stretches, nothing else
    assert {n: (out / n).read_bytes() for n in names} == first


def test_short_and_unsure_stretches_are_reported_not_written(tmp_path, recordings):
    class Unsure(ScriptedAsr):
        sureness = 0.2

    models = StandIns()
    models.asr = Unsure()
    report = transcribe(config(tmp_path, windows={"min_seconds": 5}), models=models)
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert report["records"] == 0 and "ASR confidence 0.20" in reasons
    assert "shorter than 5 s" in reasons  # the monologue's 4 s windows
    assert not list((tmp_path / "out" / "audio").iterdir())


def test_one_speaker_recordings_go_through_the_single_speaker_builder(tmp_path, recordings):
    transcribe(config(tmp_path, single_speaker="pairs"), models=StandIns())
    pairs = [
        json.loads(line) for line in (tmp_path / "out" / "single_speaker" / "pairs.jsonl").read_text().splitlines()
    ]
    assert len(pairs) == 3 and all(p["text"] == "[S1]" + " ".join(["low"] * 8) for p in pairs)
    assert all(Path(p["audio"]).is_file() and p["reference_audio"] != p["audio"] for p in pairs)


def test_a_folder_with_files_of_others_is_refused(tmp_path, recordings):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="did not write"):
        transcribe(config(tmp_path), models=StandIns())
    assert OutputFolder(tmp_path / "out", "transcribe").entries() == ["notes.txt"]


def test_windows_cover_each_region_and_clusters_follow_the_voices():
    assert windows([(0.0, 3.0), (4.0, 4.5)], 1.5, 0.75) == [(0.0, 1.5), (0.75, 2.25), (1.5, 3.0), (4.0, 4.5)]
    embeddings = np.array([[1, 0.05], [0.9, 0.1], [0.02, 1], [1, 0], [0.1, 0.95]])
    assert cluster(embeddings, DiarisationSettings()) == [0, 0, 1, 0, 1]
    assert cluster(embeddings, DiarisationSettings(num_speakers=1)) == [0] * 5
    diarise = EmbeddingDiariser(band_embedding, DiarisationSettings())
    wave = np.concatenate([tone(2, LOW), tone(2, HIGH)])
    segments = diarise(wave, RATE, [(0.0, 4.0)])
    assert [s.speaker for s in segments] == ["speaker0", "speaker1"]
    assert segments[0].end == pytest.approx(2.0, abs=0.4)  # to within half a step of the change


@pytest.mark.slow
def test_the_whole_path_with_silero_and_tiny_random_models(tmp_path):
    """Real Silero VAD, a tiny random WavLM x-vector and a tiny random Whisper: every output is well-formed."""
    from tests.data_pipelines.voices import voiced
    from tests.evaluation.conftest import build_tiny_speaker_model, build_tiny_whisper

    tiny_whisper, tiny_speaker_model = build_tiny_whisper(tmp_path / "w"), build_tiny_speaker_model(tmp_path / "s")

    folder = tmp_path / "recordings"
    folder.mkdir()
    pause = silence(0.5)
    a, b = voiced(3, 110, [(700, 80), (1220, 90), (2600, 120)]), voiced(3, 220, [(300, 60), (2300, 100)], seed=1)
    sf.write(folder / "talk.wav", np.concatenate([a, pause, b, pause, a]), RATE)
    settings = {"asr_model": str(tiny_whisper), "speaker_model": str(tiny_speaker_model), "asr_language": "en"}
    # A random ASR is unsure of everything: the confidence floors are off to see windows come out.
    floors = {"min_asr_confidence": 0, "min_diarisation_confidence": 0, "min_seconds": 0.1}
    cfg = config(tmp_path, **settings, vad=VadSettings(threshold=0.1).__dict__, windows=floors)
    report = transcribe(cfg)
    out = tmp_path / "out"
    assert report["done"] == 1 and report["hours_in"] == pytest.approx(10 / 3600, abs=1e-4)
    kept = [json.loads(line) for name in ("records.jsonl", "monologues.jsonl") for line in (out / name).open()]
    assert kept, report
    for record in kept:
        assert 0 <= record["start"] < record["end"] <= 10.0  # no word timed past its speech stretch
        clip, rate = sf.read(out / record["file_path"], dtype="float32")
        assert rate == RATE and len(clip) == pytest.approx((record["end"] - record["start"]) * RATE, abs=2)
        assert 0 < record["asr_confidence"] < 0.1  # a random model over a byte vocabulary
        assert record["full_transcript"].startswith("[S1]") or "speaker" in record
    assert transcribe(cfg)["done"] == 1  # resumed: nothing left to do


@pytest.mark.slow
def test_two_worker_processes_write_what_one_process_writes(tmp_path):
    """workers=2 (spawned, each loading Silero and the tiny models) against workers=0 on the same recordings."""
    from tests.data_pipelines.voices import voiced
    from tests.evaluation.conftest import build_tiny_speaker_model, build_tiny_whisper

    folder = tmp_path / "recordings"
    folder.mkdir()
    for n in range(3):
        a = voiced(2 + n, 110, [(700, 80), (1220, 90)], seed=n)
        b = voiced(2, 220, [(300, 60), (2300, 100)], seed=n + 10)
        sf.write(folder / f"talk{n}.wav", np.concatenate([a, silence(0.4), b, silence(0.4), a]), RATE)
    models = {
        "asr_model": str(build_tiny_whisper(tmp_path / "w")),
        "speaker_model": str(build_tiny_speaker_model(tmp_path / "s")),
        "asr_language": "en",
        "vad": {"threshold": 0.1},
        "windows": {"min_asr_confidence": 0, "min_diarisation_confidence": 0, "min_seconds": 0.1},
    }
    outputs = {}
    for workers in (0, 2):
        out = tmp_path / f"out{workers}"
        report = transcribe(config(tmp_path, **models, workers=workers, output_dir=str(out)))
        assert report["done"] == 3
        outputs[workers] = {
            name: (out / name).read_text() for name in ("records.jsonl", "monologues.jsonl", "skipped.jsonl")
        }
        outputs[workers]["audio"] = sorted(p.name for p in (out / "audio").iterdir())
    assert outputs[2] == outputs[0] and outputs[0]["audio"]


@pytest.mark.slow
def test_the_transcription_benchmark_runs():
    from tests.training.test_throughput import run_benchmark

    result = run_benchmark("transcribe.py", "--recordings", "1", "--seconds", "8", "--workers", "2")
    assert set(result["hours_per_hour"]) >= {"vad (silero)", "asr (+confidence)", "whole command, 2 processes"}
    assert result["hours"] == pytest.approx(8 / 3600)
    assert set(result["confidence_overhead"]) == {"asr + confidence", "asr + second decoding"}


def test_a_rerun_with_other_settings_redoes_every_recording_and_leaves_no_stale_audio(tmp_path, recordings):
    models = StandIns()
    transcribe(config(tmp_path), models=models)
    out = tmp_path / "out"
    before = sorted(p.name for p in (out / "audio").iterdir())
    assert len(before) == 4  # the interview's window and the monologue's three
    transcribe(config(tmp_path, windows={"max_seconds": 7}), models=models)  # the interview is cut in two
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [(r["start"], r["end"]) for r in records] == [(0.0, 6.5), (7.0, 10.0)]
    listed = {r["file_path"] for r in records} | {
        json.loads(line)["file_path"] for line in (out / "monologues.jsonl").read_text().splitlines()
    }
    assert {f"audio/{p.name}" for p in (out / "audio").iterdir()} == listed  # the old window's file is gone


def test_a_list_of_recordings_in_jsonl_names_its_bad_line(tmp_path, recordings):
    listing = tmp_path / "list.jsonl"
    listing.write_text(json.dumps({"audio": "recordings/interview.wav"}) + "\n" + json.dumps({"path": "x"}) + "\n")
    with pytest.raises(Exception, match=r'list.jsonl:2: expected \{"audio": "path"\}'):
        transcribe(config(tmp_path, input=str(listing)), models=StandIns())
    listing.write_text(json.dumps({"audio": "recordings/interview.wav"}) + "\n")
    assert transcribe(config(tmp_path, input=str(listing)), models=StandIns())["records"] == 1


def test_special_files_in_a_list_are_refused_without_being_opened(tmp_path, recordings):
    """A FIFO (or device) named in a list blocked the run forever: opening one waits for a writer."""
    import os
    import threading

    os.mkfifo(tmp_path / "pipe.wav")
    listing = tmp_path / "list.jsonl"
    entries = ["recordings/interview.wav", "pipe.wav", "/dev/zero"]
    listing.write_text("".join(json.dumps({"audio": a}) + "\n" for a in entries))
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(transcribe(config(tmp_path, input=str(listing)), models=StandIns())), daemon=True
    )
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():  # release the blocked open, so the test ends
        with open(tmp_path / "pipe.wav", "wb"):
            pass
        pytest.fail("transcription opened the FIFO and waited for a writer")
    assert result["records"] == 1 and result["skipped"] == {"unreadable": 2}
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert any("not a regular file (a pipe)" in r for r in reasons)
    assert any("not a regular file (a device or socket)" in r for r in reasons)


def test_models_that_cannot_be_loaded_are_one_message_before_anything_is_made(tmp_path, recordings):
    from moss.errors import ConfigError

    cfg = config(tmp_path, asr_model=str(tmp_path / "no-whisper"), speaker_model=str(recordings / "interview.wav"))
    with pytest.raises(
        ConfigError, match=r"asr_model=.*no-whisper cannot be loaded .*\n.*speaker_model=.*cannot be loaded"
    ):
        transcribe(cfg)
    assert not (tmp_path / "out").exists()
