"""Input records of the original fine-tuning JSONL formats: parsing, validation, audio loading.

Formats (one JSON object per line):

1. `{"file_path", "full_transcript"}`: one dialogue, encoded whole;
2. `{"reference_audio", "reference_text", "audio", "text"}`: a reference clip (voice cloning) and the
   target, encoded separately; the training text is `reference_text + text`.

Relative audio paths resolve against the record's `base_path`, else the pipeline's `base_path`, else the
folder of the JSONL file. A record is validated completely (JSON, fields, speaker tags, files present)
before any audio is read; then audio is read with soundfile, down-mixed and resampled to 16 kHz. Every
failure becomes a `Skip` with the reason, never an exception.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from moss.audio import SAMPLE_RATE, read_audio

SPEAKER_TAG = re.compile(r"\[S?[12]\]")


@dataclass
class Record:
    """One input line: where it came from and its raw text."""

    source: str  # the JSONL path as given
    line: int  # 1-based line number
    raw: str
    base_path: str | None = None

    @property
    def key(self) -> str:
        """Stable sample key from (JSONL path, line): reruns and other ranks derive the same one."""
        digest = hashlib.sha1(str(Path(self.source).resolve()).encode()).hexdigest()[:10]
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", Path(self.source).stem)
        return f"{stem}-{digest}-L{self.line:08d}"


@dataclass
class Skip:
    """A record that was not encoded, and why."""

    record: Record
    reason: str
    path: str | None = None

    def to_json(self) -> dict:
        return {"input": self.record.source, "line": self.record.line, "path": self.path, "reason": self.reason}


@dataclass
class Loaded:
    """A validated record with its audio at 16 kHz (`ref_audio` for format 2)."""

    record: Record
    text: str
    audio: np.ndarray
    ref_text: str | None = None
    ref_audio: np.ndarray | None = None
    paths: list[str] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return len(self.audio) + (0 if self.ref_audio is None else len(self.ref_audio))


@dataclass
class Limits:
    """What makes a record unusable (seconds, characters per second, RMS)."""

    min_seconds: float = 0.5
    max_seconds: float = 960.0
    min_chars_per_second: float = 0.1
    max_chars_per_second: float = 30.0
    silence_rms: float = 1e-4


def read_records(paths: list[str], base_path: str | None = None) -> list[Record]:
    """Every line of the JSONL files, in order (blank lines are not records)."""
    records = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    records.append(Record(str(path), number, line, base_path))
    return records


def _resolve(path: str, item: dict, record: Record) -> Path:
    base = item.get("base_path") or record.base_path or Path(record.source).parent
    return Path(path) if Path(path).is_absolute() else Path(base) / path


def parse(record: Record) -> tuple[dict, list[Path]] | Skip:
    """Validate a record without touching audio: `(fields, audio paths)` or a Skip."""
    try:
        item = json.loads(record.raw)
    except json.JSONDecodeError as err:
        return Skip(record, f"invalid JSON ({err.msg} at column {err.colno})")
    if not isinstance(item, dict):
        return Skip(record, "a line must be a JSON object")
    if "file_path" in item or "full_transcript" in item:
        keys, text_keys, audio_keys = ("file_path", "full_transcript"), ("full_transcript",), ("file_path",)
    elif "audio" in item or "reference_audio" in item:
        keys = ("reference_audio", "reference_text", "audio", "text")
        text_keys, audio_keys = ("reference_text", "text"), ("reference_audio", "audio")
    else:
        return Skip(
            record,
            "unknown format: expected file_path + full_transcript, or reference_audio + reference_text + audio + text",
        )
    missing = [k for k in keys if not isinstance(item.get(k), str)]
    if missing:
        return Skip(record, f"missing fields {missing}")
    text = "".join(item[k] for k in text_keys)
    if not text.strip() or not item[text_keys[-1]].strip():
        return Skip(record, "empty transcript")
    if not SPEAKER_TAG.search(text):
        return Skip(record, "no [S1]/[S2] speaker tag in the transcript")
    paths = [_resolve(item[k], item, record) for k in audio_keys]
    for path in paths:
        if not path.is_file():
            return Skip(record, "missing file", str(path))
    return item, paths


def load(record: Record, limits: Limits) -> Loaded | Skip:
    """Parse, validate, read and check one record (runs in a CPU worker process)."""
    parsed = parse(record)
    if isinstance(parsed, Skip):
        return parsed
    item, paths = parsed
    waves = []
    for path in paths:
        try:
            wave = read_audio(path)
        except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as err:
            return Skip(record, f"unreadable or corrupt audio ({type(err).__name__}: {err})", str(path))
        if not np.isfinite(wave).all():
            return Skip(record, "audio contains NaN or infinite samples", str(path))
        seconds = len(wave) / SAMPLE_RATE
        if seconds < limits.min_seconds:
            return Skip(record, f"too short ({seconds:.2f} s < {limits.min_seconds} s)", str(path))
        if np.sqrt(np.mean(np.square(wave, dtype=np.float64))) < limits.silence_rms:
            return Skip(record, "silent audio", str(path))
        waves.append(wave)
    total = sum(len(w) for w in waves) / SAMPLE_RATE
    if total > limits.max_seconds:
        return Skip(record, f"longer than the maximum ({total:.1f} s > {limits.max_seconds} s)", str(paths[-1]))
    if len(paths) == 1:
        text, ref_text = item["full_transcript"], None
    else:
        text, ref_text = item["text"], item["reference_text"]
    chars = len(SPEAKER_TAG.sub("", (ref_text or "") + text).replace(" ", ""))
    rate = chars / total
    if not limits.min_chars_per_second <= rate <= limits.max_chars_per_second:
        return Skip(record, f"transcript/audio mismatch ({rate:.2f} characters per second)", str(paths[-1]))
    return Loaded(record, text, waves[-1], ref_text, waves[0] if len(waves) == 2 else None, [str(p) for p in paths])
