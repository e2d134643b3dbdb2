r"""Untranscribed dialogue recordings -> MOSS-TTSD fine-tuning records (format 1, `[S1]`/`[S2]` tags).

    python -m data_pipelines.transcribe input=/data/podcasts output_dir=/data/transcribed [workers=4]

For each recording (a folder searched recursively for audio, a glob, a list, or a JSONL of `{"audio": path}`):
voice activity (Silero VAD), speakers (x-vectors clustered: `data_pipelines.diarisation`), words with times and a
confidence per speech stretch (transformers ASR: `moss.evaluation.speech_models.Transcriber`), then the assembly of
`data_pipelines.dialogue_windows`: turns, windows of at most `windows.max_seconds` and two speakers, tags in order
of appearance, confidences, and what was dropped. Each kept window's audio is cut, loudness-normalised to
`loudness_lufs` (ITU-R BS.1770 through torchaudio, peaks kept under -1 dBFS) and written as 16 kHz WAV.

Output (`output_dir`):
* `records.jsonl`: format 1 (`file_path`, `full_transcript`) with `asr_confidence`, `diarisation_confidence`,
  `source_audio`, `start`, `end`: what `data_pipelines.preprocess` (or `train.py raw.train=...`) reads;
* `monologues.jsonl`: windows of recordings in which one speaker was found, in the input format of
  `data_pipelines.single_speaker` (`speaker` is the recording's name); `single_speaker=pairs|dialogues` runs that
  builder on them into `output_dir/single_speaker`;
* `skipped.jsonl` (one line per dropped stretch or file: `input`, `stage`, `start`, `end`, `reason`) and `report.json`
  (hours in and out, records, reasons counted);
* `audio/` (the windows), `parts/` (one result per recording: a rerun skips recordings already done, so an
  interrupted run resumes and a finished one is not redone; other models or settings, recorded in `plan.json`
  (`data_pipelines.journal`), start it again; the outputs are rebuilt from the parts in input order).

Recordings go to `workers` processes (each loads the models once, on `devices` in turn); a worker that crashes or
hangs on a recording costs that recording (reported, retried by the next run), not the run.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Literal

import hydra
import numpy as np
import soundfile as sf
from omegaconf import DictConfig, OmegaConf
from pydantic import Field

from data_pipelines.dialogue_windows import Dropped, WindowSettings, assemble
from data_pipelines.diarisation import DiarisationSettings, EmbeddingDiariser, SileroVad, VadSettings
from data_pipelines.journal import Journal
from data_pipelines.workers import WorkerFailure, WorkerPool
from moss.audio import SAMPLE_RATE, AudioLimits, read_audio
from moss.cli import command, fail, require, run
from moss.config_schema import check_mapping
from moss.errors import ConfigError
from moss.evaluation.speech_models import Language
from moss.evaluation.turns import Word
from moss.outputs import OutputFolder, atomic_write, refused_errno
from moss.settings import Count, Seconds, Size, TypedDict

log = logging.getLogger(__name__)
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a")
METHOD = 2  # what a part's numbers mean; 2: the ASR confidence scores the transcript kept (parts of 1 are redone)
ASR_PIECE_S = 28.0  # speech stretches are transcribed in pieces under Whisper's 30 s window
PEAK = 10 ** (-1 / 20)  # -1 dBFS


def recordings(spec) -> list[Path]:
    """The recordings named by `input` (see the module docstring), in a fixed order, each once."""
    items = list(spec) if isinstance(spec, list | tuple) else [spec]
    found: list[Path] = []
    for item in map(str, items):
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
        elif path.suffix == ".jsonl" and path.is_file():
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        entry = json.loads(line)
                    except ValueError as err:
                        raise ConfigError(f"input {path}:{n}: not JSON ({err})") from err
                    if not isinstance(entry, dict) or not isinstance(entry.get("audio"), str):
                        raise ConfigError(f'input {path}:{n}: expected {{"audio": "path"}}, got {line[:80]!r}')
                    audio = Path(entry["audio"])
                    found.append(audio if audio.is_absolute() else path.parent / audio)
        else:
            found += [Path(p) for p in sorted(glob.glob(item))]
    return list(dict.fromkeys(p.resolve() for p in found))


def recording_id(path: Path) -> str:
    """A stable, readable name for a recording's outputs: its stem and a hash of its full path."""
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in path.stem)[:40]
    return f"{stem}-{digest}"


class Models:
    """The models of one worker: VAD, diariser, ASR (built from the command's config, once per process)."""

    def __init__(self, cfg: DictConfig, device: str):
        from moss.evaluation.speech_models import Transcriber, VoiceEmbedder

        self.vad = SileroVad(VadSettings(**cfg.vad))
        embedder = VoiceEmbedder(cfg.speaker_model, device, int(cfg.batch_size))
        self.diarise = EmbeddingDiariser(embedder, DiarisationSettings(**cfg.diarisation))
        self.asr = Transcriber(cfg.asr_model, device, int(cfg.batch_size), cfg.get("asr_language"))


def transcribe_recording(path: Path, models, cfg: DictConfig, out: Path) -> dict:
    """One recording -> its part: records, monologues, dropped stretches and hours (audio written to `out/audio`)."""
    rid, source = recording_id(path), str(path)
    limits = AudioLimits(max_seconds=float(cfg.max_recording_seconds))
    try:
        wave = read_audio(path, SAMPLE_RATE, limits)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported, never fatal
        return _part(source, 0.0, dropped=[_skip(source, 0, 0, f"unreadable: {type(err).__name__}: {err}", "read")])
    seconds = len(wave) / SAMPLE_RATE
    regions = models.vad(wave, SAMPLE_RATE)
    if not regions:
        return _part(source, seconds, dropped=[_skip(source, 0, seconds, "no speech found", "vad")])
    segments = models.diarise(wave, SAMPLE_RATE, regions)
    words = transcribe_regions(wave, regions, models.asr)
    settings = WindowSettings(**cfg.windows)
    windows, dropped = assemble(words, segments, settings)
    one_speaker = len({s.speaker for s in segments}) == 1
    records, monologues = [], []
    for window in windows:
        name = f"audio/{rid}-{round(window.start * 1000):08d}.wav"
        clip = wave[int(window.start * SAMPLE_RATE) : int(np.ceil(window.end * SAMPLE_RATE))]
        clip = loudness_normalised(clip, float(cfg.loudness_lufs))
        atomic_write(out / name, lambda tmp, clip=clip: sf.write(tmp, clip, SAMPLE_RATE, subtype="PCM_16"))
        common = {
            "file_path": name,
            "source_audio": source,
            "start": round(window.start, 3),
            "end": round(window.end, 3),
        }
        scores = {"asr_confidence": round(window.asr_confidence, 4)}
        if one_speaker:
            text = window.transcript.replace("[S1]", " ").strip()
            monologues.append({**common, "full_transcript": text, "speaker": rid, **scores})
        else:
            scores["diarisation_confidence"] = round(window.diarisation_confidence, 4)
            records.append({**common, "full_transcript": window.transcript, **scores})
    skipped = [_skip(source, d.start, d.end, d.reason, "assembly") for d in _merged(dropped)]
    return _part(source, seconds, records, monologues, skipped)


def asr_pieces(regions) -> list[tuple[float, float]]:
    """The speech stretches cut into pieces the ASR model takes whole (under Whisper's 30 s window)."""
    pieces = []
    for start, end in regions:
        while end - start > ASR_PIECE_S:
            pieces.append((start, start + ASR_PIECE_S))
            start += ASR_PIECE_S
        pieces.append((start, end))
    return pieces


def transcribe_regions(wave: np.ndarray, regions, asr) -> list[Word]:
    """Words of every speech stretch, timed in the recording, each with its stretch's ASR confidence."""
    pieces = asr_pieces(regions)
    clips = [wave[int(a * SAMPLE_RATE) : int(b * SAMPLE_RATE)] for a, b in pieces]
    words = []
    for (offset, end), transcript in zip(pieces, asr(clips, SAMPLE_RATE, confidence=True), strict=True):
        for w in transcript.words or []:
            start = offset + max(w.start, 0.0)
            if w.text.strip() and start < end:  # a time past its stretch (a hallucinating model) is no time at all
                words.append(Word(w.text, start, min(offset + max(w.end, w.start), end), transcript.confidence))
    return words


def loudness_normalised(clip: np.ndarray, target_lufs: float) -> np.ndarray:
    """`clip` at `target_lufs` integrated loudness (BS.1770), scaled down if its peaks would pass -1 dBFS."""
    import torch
    import torchaudio.functional as F

    if len(clip) < int(0.4 * SAMPLE_RATE) or not np.any(clip):  # BS.1770 gates 400 ms blocks
        return clip.astype(np.float32)
    loudness = float(F.loudness(torch.from_numpy(clip.astype(np.float32))[None], SAMPLE_RATE))
    gain = 10 ** ((target_lufs - loudness) / 20) if np.isfinite(loudness) else 1.0
    peak = float(np.max(np.abs(clip))) * gain
    if peak > PEAK:
        gain *= PEAK / peak
    return (clip * gain).astype(np.float32)


def _merged(dropped: list[Dropped]) -> list[Dropped]:
    """Consecutive dropped words of one reason as one stretch (the report lists stretches, not words)."""
    out: list[Dropped] = []
    for d in sorted(dropped, key=lambda d: d.start):
        if out and out[-1].reason == d.reason and d.start - out[-1].end < 1.0:
            out[-1] = Dropped(out[-1].start, max(out[-1].end, d.end), d.reason)
        else:
            out.append(d)
    return out


def _skip(source: str, start: float, end: float, reason: str, stage: str) -> dict:
    """A line of the skip report, in preprocessing's form (`input`, `stage`, `reason`) with the stretch's times."""
    return {"input": source, "stage": stage, "start": round(start, 3), "end": round(end, 3), "reason": reason}


def _part(source, seconds, records=(), monologues=(), dropped=()) -> dict:
    return {
        "source": source,
        "seconds": seconds,
        "records": list(records),
        "monologues": list(monologues),
        "skipped": list(dropped),
    }


# -- workers ---------------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(cfg_yaml: str, out: str, devices: list[str], counter) -> None:
    import torch

    with counter.get_lock():
        index, counter.value = counter.value, counter.value + 1
    cfg = OmegaConf.create(cfg_yaml)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(cfg.workers)))  # the cores shared, not oversubscribed
    _WORKER.update(cfg=cfg, out=Path(out), models=Models(cfg, devices[index % len(devices)]))


def _work(path: str) -> dict:
    try:
        return transcribe_recording(Path(path), _WORKER["models"], _WORKER["cfg"], _WORKER["out"])
    except Exception as err:  # noqa: BLE001 - one recording's failure is reported, not fatal to the worker
        if (code := refused_errno(err)) is not None:  # a full disk fails every recording: the run stops
            return {"refused": [code, getattr(err, "filename", None) or str(_WORKER["out"])]}
        return _part(path, 0.0, dropped=[_skip(path, 0, 0, f"failed: {type(err).__name__}: {err}", "worker")])


def transcribe(cfg: DictConfig, models=None) -> dict:
    """Run the command (module docstring); `models` replaces the loaded ones (tests' stand-ins, in process)."""
    out = Path(cfg.output_dir)
    folder = OutputFolder(out, "transcribe", resumable=True).check()
    paths = recordings(cfg.input)
    if not paths:
        fail("nothing to transcribe", [f"input={cfg.input} names no audio file ({', '.join(AUDIO_SUFFIXES)})"])
    if models is None:  # before any folder is made or worker started
        from moss.evaluation.speech_models import model_problem

        named = {"asr_model": cfg.asr_model, "speaker_model": cfg.speaker_model}
        fail("the models cannot be loaded", [p for key, name in named.items() if (p := model_problem(str(name), key))])
    folder.open()  # made, locked and recorded after the checks: a refused command leaves no folder
    made = journal(cfg)
    if made.saved is None or made.changes():  # a new folder, or other models or settings: everything again
        for sub in ("audio", "parts"):
            shutil.rmtree(out / sub, ignore_errors=True)
    made.begin()
    for sub in ("audio", "parts"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    todo = [p for p in paths if made.done(_part_name(p)) is None]
    log.info("%d recordings, %d already done, %d to transcribe", len(paths), len(paths) - len(todo), len(todo))
    for path in todo:  # a killed run's window audio of a recording not done
        for stale in (out / "audio").glob(f"{recording_id(path)}-*.wav"):
            stale.unlink()
    for path, part in _results(cfg, todo, out, models):
        if "refused" in part:
            code, name = part["refused"]
            raise OSError(code, os.strerror(code), name)
        if any(s["reason"].startswith("failed:") for s in part["skipped"]):
            log.warning("%s: %s (retried by the next run)", path, part["skipped"][0]["reason"])
            continue
        made.finish(_part_name(path), part)
    return _finish(cfg, folder, paths, made)


def journal(cfg: DictConfig) -> Journal:
    """The output folder's journal: its parts are made from the models and every setting of the steps."""
    keys = ("asr_model", "asr_language", "speaker_model", "vad", "diarisation", "windows", "loudness_lufs")
    made = {k: OmegaConf.to_container(cfg[k]) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in keys}
    return Journal(cfg.output_dir, {**made, "method": METHOD})


def _part_name(path: Path) -> str:
    """The record of a done recording: its records, monologues, dropped stretches and hours."""
    return f"parts/{recording_id(path)}.json"


def _results(cfg: DictConfig, todo: list[Path], out: Path, models):
    """(recording, part) as each is done: in process, or over `workers` processes."""
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="rec", disable=not cfg.progress, desc="transcribe")
    workers = int(cfg.workers)
    if workers <= 0 or models is not None:
        models = models or Models(cfg, _devices(cfg)[0])
        for path in todo:
            yield path, transcribe_recording(path, models, cfg, out)
            bar.update()
        bar.close()
        return
    ctx = multiprocessing.get_context("spawn")
    init = functools.partial(_init_worker, OmegaConf.to_yaml(cfg), str(out), _devices(cfg), ctx.Value("i", 0))
    pool = WorkerPool(_work, workers, ctx, timeout=float(cfg.recording_timeout), initializer=init)
    try:
        for index, part in pool.map_unordered([str(p) for p in todo]):
            if isinstance(part, WorkerFailure):
                part = _part(
                    str(todo[index]), 0.0, dropped=[_skip(str(todo[index]), 0, 0, f"failed: {part.reason}", "worker")]
                )
            yield todo[index], part
            bar.update()
    finally:
        pool.close()
        bar.close()


def _devices(cfg: DictConfig) -> list[str]:
    devices = cfg.devices
    if devices == "auto":
        import torch

        return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    return [str(d) for d in (devices if isinstance(devices, list) or OmegaConf.is_list(devices) else [devices])]


def _finish(cfg: DictConfig, folder: OutputFolder, paths: list[Path], made: Journal) -> dict:
    """The outputs rebuilt from every done recording's part, in input order."""
    out = made.folder
    parts = [part for path in paths if (part := made.done(_part_name(path))) is not None]
    lines = {
        key: [json.dumps(r, ensure_ascii=False) for p in parts for r in p[key]]
        for key in ("records", "monologues", "skipped")
    }
    folder.put_text("records.jsonl", "".join(line + "\n" for line in lines["records"]))
    folder.put_text("monologues.jsonl", "".join(line + "\n" for line in lines["monologues"]))
    folder.put_text("skipped.jsonl", "".join(line + "\n" for line in lines["skipped"]))
    kept = [r for p in parts for key in ("records", "monologues") for r in p[key]]
    report = {
        "recordings": len(paths),
        "done": len(parts),
        "hours_in": round(sum(p["seconds"] for p in parts) / 3600, 4),
        "hours_out": round(sum(r["end"] - r["start"] for r in kept) / 3600, 4),
        "records": len(lines["records"]),
        "monologues": len(lines["monologues"]),
        "one_speaker_recordings": sum(1 for p in parts if p["monologues"]),
        "skipped": dict(Counter(s["reason"].split(":")[0].split(" 0.")[0] for p in parts for s in p["skipped"])),
        "settings": {"windows": asdict(WindowSettings(**cfg.windows)), "loudness_lufs": cfg.loudness_lufs},
    }
    folder.put_text("report.json", json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    if cfg.get("single_speaker") and lines["monologues"]:
        report["single_speaker"] = _single_speaker(cfg, out)
    print(
        f"transcribed {report['done']} of {report['recordings']} recordings ({report['hours_in']:.3f} h): "
        f"{report['records']} dialogue records, {report['monologues']} monologue windows "
        f"({report['hours_out']:.3f} h kept) into {out}; skipped {sum(report['skipped'].values())} stretches "
        f"(see {out / 'skipped.jsonl'})"
    )
    return report


def _single_speaker(cfg: DictConfig, out: Path) -> dict:
    """The monologues through the single-speaker builder (`single_speaker=pairs|dialogues`)."""
    from data_pipelines.single_speaker import single_speaker

    base = OmegaConf.load(Path(__file__).parents[1] / "conf" / "single_speaker.yaml")
    settings = OmegaConf.masked_copy(base, [k for k in base if k not in ("defaults", "hydra")])
    sub = OmegaConf.merge(
        settings,
        {"input": str(out / "monologues.jsonl"), "output_dir": str(out / "single_speaker"), "mode": cfg.single_speaker},
        {"overwrite": True, "base_path": str(out)},
    )
    return single_speaker(sub)


class TranscribeSettings(TypedDict, total=False):
    """conf/transcribe.yaml's settings with their limits."""

    input: str | list[str]
    output_dir: str
    asr_model: str
    asr_language: Language | None
    speaker_model: str
    vad: VadSettings
    diarisation: DiarisationSettings
    windows: WindowSettings
    loudness_lufs: Annotated[float, Field(ge=-70, le=0)]
    single_speaker: Literal["pairs", "dialogues"] | None
    max_recording_seconds: Seconds
    workers: Size
    devices: Literal["cpu", "auto"] | list[str]
    batch_size: Count
    recording_timeout: Seconds
    progress: bool


def check_arguments(cfg: DictConfig) -> None:
    """Every problem of the command at once, each with its fix, before a model is loaded."""
    problems = require(cfg, {"input": "/data/recordings", "output_dir": "/data/transcribed"})
    problems += require(cfg, {"asr_model": "openai/whisper-large-v3", "speaker_model": "microsoft/wavlm-base-plus-sv"})
    problems += check_mapping(cfg, TranscribeSettings)
    fail("invalid transcription command", problems)


@hydra.main(version_base="1.3", config_path="../conf", config_name="transcribe")
@command
def main(cfg: DictConfig) -> None:
    """Hydra entry point: `python -m data_pipelines.transcribe input=... output_dir=...`."""
    check_arguments(cfg)
    transcribe(cfg)


if __name__ == "__main__":
    run(main, Path(__file__).parents[1] / "conf", "transcribe")
