"""Input records of the original fine-tuning JSONL formats: indexing, parsing, validation, audio loading.

Formats (one JSON object per line):

1. `{"file_path", "full_transcript"}`: one dialogue, encoded whole;
2. `{"reference_audio", "reference_text", "audio", "text"}`: a reference clip (voice cloning) and the
   target, encoded separately; the training text is `reference_text + text`.

Relative audio paths resolve against the record's `base_path`, else the pipeline's `base_path`, else the
folder of the JSONL file.

Input is untrusted and arrives by the million, so: the JSONL files are indexed (line number, byte offset,
length) without holding their text; a worker reads its own line, bounded by `Limits.max_line_bytes`; every
check that needs no audio (JSON, field types, Unicode, speaker tags, path length, file type and size) runs
before any sample is decoded; audio headers are checked before decoding (`moss.audio`). `load` never
raises: every failure, foreseen or not, becomes a `Skip` naming the input line, the stage and the reason.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field

from moss.audio import SAMPLE_RATE, AudioLimits, read_audio
from moss.settings import Count, NonNegative, Positive, Seconds, strict

SPEAKER_TAG = re.compile(r"\[S?[12]\]")
OTHER_SPEAKER = re.compile(r"\[S(?![12]\])\d+\]")  # [S3], [S12]: speakers the model has no token pattern for
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # tab, line feed and carriage return are text
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
FORMATS = {
    "dialogue": (("file_path", "full_transcript"), ("full_transcript",), ("file_path",)),
    "cloning": (
        ("reference_audio", "reference_text", "audio", "text"),
        ("reference_text", "text"),
        ("reference_audio", "audio"),
    ),
}


@dataclass
class Record:
    """One input line: where it is (file, 1-based line, byte offset and length); its text is read by `read_line`."""

    source: str  # the JSONL path as given
    line: int
    offset: int = 0
    length: int = 0
    base_path: str | None = None

    @property
    def key(self) -> str:
        """Stable sample key from (JSONL path, line): reruns and other ranks derive the same one."""
        digest = hashlib.sha1(str(Path(self.source).resolve()).encode()).hexdigest()[:10]
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", Path(self.source).stem)
        return f"{stem}-{digest}-L{self.line:08d}"


@dataclass
class Skip:
    """A record that was not encoded: where it is, at which stage it failed, and why."""

    record: Record
    reason: str
    path: str | None = None
    stage: str = "parse"

    def to_json(self) -> dict:
        return {
            "input": self.record.source,
            "line": self.record.line,
            "stage": self.stage,
            "path": self.path,
            "reason": self.reason,
        }


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


@strict
@dataclass
class Limits:
    """What makes a record unusable: sizes checked before reading, then audio and transcript checks."""

    min_seconds: NonNegative = 0.5
    max_seconds: Seconds = 960.0
    min_chars_per_second: NonNegative = 0.1
    max_chars_per_second: Positive = 30.0
    silence_rms: NonNegative = 1e-4
    max_amplitude: Positive = 16.0  # |sample| above this is not audio (integer formats decode to [-1, 1])
    max_line_bytes: Annotated[int, Field(ge=1, le=1 << 30)] = 1 << 20
    max_bytes_per_second: Positive = 4.0e6  # file size / max_seconds: 96 kHz x 6 ch x float32 is 2.3 MB/s
    min_sample_rate: Count = 4000
    max_sample_rate: Count = 192000
    max_channels: Count = 32

    @property
    def audio(self) -> AudioLimits:
        return AudioLimits(self.max_seconds, self.min_sample_rate, self.max_sample_rate, self.max_channels)


class RecordError(ValueError):
    """A record that cannot be used; carries the stage and the audio path it concerns."""

    def __init__(self, stage: str, reason: str, path: str | None = None):
        super().__init__(reason)
        self.stage, self.reason, self.path = stage, reason, path


# ---------------------------------------------------------------------------------------------- indexing
def index_lines(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(line numbers, byte offsets, byte lengths) of the non-blank lines of one JSONL file.

    Lines end at a line feed only (a carriage return or U+2028 inside a line is part of it). A line is read
    in 1 MiB pieces, so even a multi-gigabyte line costs no memory here (its length is recorded, and it is
    refused later).
    """
    lines, offsets, lengths = [], [], []
    with open(path, "rb") as f:
        number, offset = 0, 0
        while True:
            piece = f.readline(1 << 20)
            if not piece:
                break
            number += 1
            length, blank = len(piece), not piece.strip()
            while not piece.endswith(b"\n"):
                piece = f.readline(1 << 20)
                if not piece:
                    break
                length += len(piece)
                blank = blank and not piece.strip()
            if not blank:
                lines.append(number)
                offsets.append(offset)
                lengths.append(length)
            offset += length
    return np.asarray(lines, np.int64), np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)


class RecordIndex:
    """Every non-blank line of the input files, in order, as compact arrays (no text held)."""

    def __init__(self, paths: list[str], base_path: str | None = None):
        self.paths, self.base_path = [str(p) for p in paths], base_path
        self.stats = [_identity(p) for p in self.paths]  # before indexing: a change while indexing shows too
        parts = [index_lines(p) for p in self.paths]
        self.file = np.concatenate([np.full(len(p[0]), i, np.int32) for i, p in enumerate(parts)] or [np.zeros(0)])
        self.line, self.offset, self.length = (
            np.concatenate([p[k] for p in parts] or [np.zeros(0, np.int64)]) for k in range(3)
        )

    def __len__(self) -> int:
        return len(self.line)

    def __getitem__(self, i: int) -> Record:
        return Record(
            self.paths[int(self.file[i])], int(self.line[i]), int(self.offset[i]), int(self.length[i]), self.base_path
        )

    def take(self, positions) -> list[Record]:
        return [self[int(i)] for i in positions]

    def changed(self) -> str | None:
        """Which input changed (size or modification time) since it was indexed, or None."""
        for path, before in zip(self.paths, self.stats, strict=True):
            if _identity(path) != before:
                return path
        return None


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def read_line(record: Record, limits: Limits) -> str:
    """The record's text, read from its file and decoded as strict UTF-8."""
    if record.length > limits.max_line_bytes:
        limit = limits.max_line_bytes
        raise RecordError("read", f"line too long ({record.length} bytes > limits.max_line_bytes={limit})")
    with open(record.source, "rb") as f:
        f.seek(record.offset)
        data = f.read(record.length)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecordError("read", f"invalid UTF-8 (byte {err.start + 1} of the line)") from None


# ---------------------------------------------------------------------------------------------- validation
def _text(item: dict, key: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise RecordError("validate", f"wrong field type ({key} must be a string, got {type(value).__name__})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        reason = f"invalid Unicode ({key} has a lone surrogate at character {err.start + 1})"
        raise RecordError("validate", reason) from None
    return value


def check_transcript(key: str, text: str) -> None:
    """Raise RecordError unless `text` is a transcript to learn from.

    Words (not only speaker tags), no control characters, no speaker but [S1]/[S2].
    """
    if bad := CONTROL.search(text):
        reason = f"control character U+{ord(bad.group()):04X} in {key} at character {bad.start() + 1}"
        raise RecordError("validate", reason)
    if unknown := sorted(set(OTHER_SPEAKER.findall(text))):
        raise RecordError("validate", f"unknown speaker tags {unknown} in {key}: MOSS-TTSD speaks [S1] and [S2]")
    if not text.strip():
        raise RecordError("validate", "empty transcript")
    if not SPEAKER_TAG.sub("", text).strip():
        raise RecordError("validate", f"empty transcript ({key} holds only speaker tags)")


def _resolve(value: str, item: dict, record: Record) -> Path:
    base = item.get("base_path")
    if base is not None and not isinstance(base, str):
        raise RecordError("path", f"wrong field type (base_path must be a string, got {type(base).__name__})")
    base = base or record.base_path or str(Path(record.source).parent)
    path = value if os.path.isabs(value) else os.path.join(base, value)
    encoded = path.encode("utf-8", "surrogateescape")
    if b"\0" in encoded:
        raise RecordError("path", "invalid path (contains a NUL character)")
    if len(encoded) > MAX_PATH_BYTES or any(len(part) > MAX_NAME_BYTES for part in encoded.split(b"/")):
        raise RecordError("path", f"audio path too long ({len(encoded)} bytes)", path[:200] + "...")
    return Path(path)


def check_file(path: Path, limits: Limits) -> None:
    """A regular, non-empty file no larger than `max_seconds` of audio can be (raises RecordError)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise RecordError("path", "missing file", str(path)) from None
    except OSError as err:
        reason = "unreadable path (symlink loop)" if err.errno == errno.ELOOP else f"unreadable path ({err.strerror})"
        raise RecordError("path", reason, str(path)) from None
    if stat.S_ISDIR(info.st_mode):
        raise RecordError("path", "not a regular file (a directory)", str(path))
    if not stat.S_ISREG(info.st_mode):
        raise RecordError("path", "not a regular file (a device, pipe or socket)", str(path))
    if info.st_size == 0:
        raise RecordError("path", "empty file (0 bytes)", str(path))
    if info.st_size > limits.max_seconds * limits.max_bytes_per_second:
        raise RecordError(
            "path",
            f"file too large ({info.st_size / 1e6:.0f} MB for at most {limits.max_seconds:g} s of audio)",
            str(path),
        )


def parse(record: Record, limits: Limits | None = None) -> tuple[dict, list[Path]]:
    """Validate a record without decoding audio: `(fields, audio paths)`; raises RecordError."""
    limits = limits or Limits()
    raw = read_line(record, limits)
    try:
        item = json.loads(raw)
    except json.JSONDecodeError as err:
        raise RecordError("parse", f"invalid JSON ({err.msg} at character {err.pos + 1})") from None
    except RecursionError:
        raise RecordError("parse", "invalid JSON (nested too deeply)") from None
    except ValueError as err:  # e.g. integers beyond the interpreter's digit limit
        raise RecordError("parse", f"invalid JSON ({err})") from None
    if not isinstance(item, dict):
        raise RecordError("parse", f"not a JSON object ({type(item).__name__})")
    if "file_path" in item or "full_transcript" in item:
        keys, text_keys, audio_keys = FORMATS["dialogue"]
    elif "audio" in item or "reference_audio" in item:
        keys, text_keys, audio_keys = FORMATS["cloning"]
    else:
        raise RecordError(
            "parse",
            "unknown format (expected file_path + full_transcript, or reference_audio + reference_text + audio + text)",
        )
    missing = [k for k in keys if k not in item]
    if missing:
        raise RecordError("validate", f"missing fields ({', '.join(missing)})")
    texts = {k: _text(item, k) for k in keys}
    text = "".join(texts[k] for k in text_keys)
    for k in text_keys:
        check_transcript(k, texts[k])
    if len(text) > limits.max_seconds * limits.max_chars_per_second:
        reason = f"transcript too long ({len(text)} characters for at most {limits.max_seconds:g} s of audio)"
        raise RecordError("validate", reason)
    if not SPEAKER_TAG.search(text):
        raise RecordError("validate", "no [S1]/[S2] speaker tag in the transcript")
    for k in audio_keys:
        if not texts[k].strip():
            raise RecordError("validate", f"empty audio path ({k})")
    paths = [_resolve(texts[k], item, record) for k in audio_keys]
    for path in paths:
        check_file(path, limits)
    return item, paths


def _audio(path: Path, limits: Limits) -> np.ndarray:
    try:
        wave = read_audio(path, limits=limits.audio)
    except ValueError as err:  # AudioError and soundfile's own checks
        raise RecordError("audio", str(err), str(path)) from None
    except (RuntimeError, OSError) as err:  # soundfile.LibsndfileError is a RuntimeError
        raise RecordError("audio", f"unreadable or corrupt audio ({type(err).__name__}: {err})", str(path)) from None
    if not np.isfinite(wave).all():
        raise RecordError("audio", "audio contains NaN or infinite samples", str(path))
    peak = float(np.abs(wave).max())
    if peak > limits.max_amplitude:
        raise RecordError("audio", f"amplitude out of range (peak {peak:.3g} > {limits.max_amplitude:g})", str(path))
    seconds = len(wave) / SAMPLE_RATE
    if seconds < limits.min_seconds:
        raise RecordError("audio", f"too short ({seconds:.2f} s < {limits.min_seconds} s)", str(path))
    if np.sqrt(np.mean(np.square(wave, dtype=np.float64))) < limits.silence_rms:
        raise RecordError("audio", "silent audio", str(path))
    return wave


def _load(record: Record, limits: Limits) -> Loaded:
    item, paths = parse(record, limits)
    waves = [_audio(path, limits) for path in paths]
    total = sum(len(w) for w in waves) / SAMPLE_RATE
    if total > limits.max_seconds:
        raise RecordError("audio", f"longer than the maximum ({total:.1f} s > {limits.max_seconds} s)", str(paths[-1]))
    if len(paths) == 1:
        text, ref_text = item["full_transcript"], None
    else:
        text, ref_text = item["text"], item["reference_text"]
    chars = len(SPEAKER_TAG.sub("", (ref_text or "") + text).replace(" ", ""))
    rate = chars / total
    if not limits.min_chars_per_second <= rate <= limits.max_chars_per_second:
        raise RecordError("check", f"transcript/audio mismatch ({rate:.2f} characters per second)", str(paths[-1]))
    return Loaded(record, text, waves[-1], ref_text, waves[0] if len(waves) == 2 else None, [str(p) for p in paths])


def load(record: Record, limits: Limits) -> Loaded | Skip:
    """Parse, validate, read and check one record (runs in a CPU worker process); never raises."""
    try:
        return _load(record, limits)
    except RecordError as err:
        return Skip(record, err.reason, err.path, err.stage)
    except MemoryError:
        return Skip(record, "out of memory while loading", stage="audio")
    except Exception as err:  # noqa: BLE001 - one record's surprise must not end a million-record run
        return Skip(record, f"unexpected error ({type(err).__name__}: {str(err)[:300]})", stage="load")
