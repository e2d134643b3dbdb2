"""The shard contract shared by `data_pipelines/` (writers) and the training loaders (readers).

One WebDataset sample per utterance or dialogue:

* `__key__`: stable id derived from the source (path + line), so reruns are idempotent;
* `codes.npy`: int16 `[A, 8]` codec codes (0..1023) of the target audio at 12.5 frames/s;
* `ref_codes.npy` (optional): int16 `[R, 8]` codes of the reference (voice-cloning) audio;
* `json`: `{"text", "ref_text"?, "source", "duration_s", "frames", "codec", "codec_sample_rate"}` with raw
  transcripts (normalisation and the prompt template run at training time).

Samples imported from the original `.pkl` preprocessing carry the finished grid instead of codes and text:
`input_ids.npy` and `labels.npy` (int32 `[T, 8]`, un-delayed, as stored) and a `json` with `"grid": true`.

Every shard set has `manifest.json` (per shard: name, samples, audio frames) so training knows its size
without opening tars.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from moss.audio import FRAME_RATE, SAMPLE_RATE
from moss.model.loss import IGNORE_INDEX

CODES = "codes.npy"
REF_CODES = "ref_codes.npy"
GRID = "input_ids.npy"
GRID_LABELS = "labels.npy"
META = "json"
MANIFEST = "manifest.json"
CODEBOOKS = 8
CODEBOOK_SIZE = 1024
# 4 hours of codes (180,000 frames x 8): no sample is longer; a header claiming more is refused unread.
MAX_ELEMENTS = 180_000 * CODEBOOKS


class SampleError(ValueError):
    """A shard sample that breaks the schema; the message names the sample key and the problem."""


@dataclass
class ShardSample:
    """One training sample as stored in a shard (codes `[A, 8]`, raw transcripts)."""

    key: str
    codes: np.ndarray
    text: str
    source: str
    codec: str = "xy_tokenizer"
    codec_sample_rate: int = SAMPLE_RATE
    ref_codes: np.ndarray | None = None
    ref_text: str | None = None
    grid: np.ndarray | None = None
    grid_labels: np.ndarray | None = None
    audio_frames: int | None = None

    @property
    def frames(self) -> int:
        """Audio frames of target plus reference."""
        if self.grid is not None:
            return int(self.audio_frames or 0)
        return int(self.codes.shape[0]) + (0 if self.ref_codes is None else int(self.ref_codes.shape[0]))

    def validate(self) -> ShardSample:
        """Check types, shapes, dtypes and ranges; returns self.

        Raises:
            SampleError: naming the key and what is wrong.
        """
        if self.grid is not None:
            for name, array in ((GRID, self.grid), (GRID_LABELS, self.grid_labels)):
                _check_integer(self.key, name, array)
            if self.grid.ndim != 2 or self.grid.shape != self.grid_labels.shape or self.grid.shape[1] != CODEBOOKS:
                raise SampleError(
                    f"{self.key}: grid and labels must be two [T, {CODEBOOKS}] arrays of one shape, got "
                    f"{self.grid.shape} and {self.grid_labels.shape}"
                )
            speech, labels = self.grid[:, 1:], self.grid_labels
            if self.grid[:, 0].min(initial=0) < 0 or speech.min(initial=0) < 0 or speech.max(initial=0) > CODEBOOK_SIZE:
                raise SampleError(f"{self.key}: grid ids out of range (speech channels lie in [0, {CODEBOOK_SIZE}])")
            if ((labels < 0) & (labels != IGNORE_INDEX)).any() or labels[:, 1:].max(initial=0) > CODEBOOK_SIZE:
                raise SampleError(f"{self.key}: grid labels out of range (-100 or valid ids)")
            return self
        for name, codes in ((CODES, self.codes), (REF_CODES, self.ref_codes)):
            if codes is None:
                continue
            _check_integer(self.key, name, codes)
            if codes.ndim != 2 or codes.shape[1] != CODEBOOKS or codes.shape[0] == 0:
                raise SampleError(f"{self.key}: {name} must be [frames>0, {CODEBOOKS}], got {codes.shape}")
            if codes.min() < 0 or codes.max() >= CODEBOOK_SIZE:
                raise SampleError(f"{self.key}: {name} has codes outside [0, {CODEBOOK_SIZE})")
        if not isinstance(self.text, str) or not self.text.strip():
            raise SampleError(f"{self.key}: empty transcript or not a string")
        if self.ref_text is not None and not isinstance(self.ref_text, str):
            raise SampleError(f"{self.key}: ref_text must be a string")
        if (self.ref_codes is None) != (self.ref_text is None):
            raise SampleError(f"{self.key}: ref_codes and ref_text must be given together")
        return self

    def to_wds(self) -> dict:
        """The dict a `webdataset.TarWriter` writes (bytes values, no pickle)."""
        self.validate()
        if self.grid is not None:
            meta = {"grid": True, "source": self.source, "frames": self.frames, "duration_s": self.frames / FRAME_RATE}
            return {
                "__key__": self.key,
                GRID: _npy_bytes(self.grid, np.int32),
                GRID_LABELS: _npy_bytes(self.grid_labels, np.int32),
                META: json.dumps(meta).encode("utf-8"),
            }
        meta = {
            "text": self.text,
            "source": self.source,
            "duration_s": self.codes.shape[0] / FRAME_RATE,
            "frames": int(self.codes.shape[0]),
            "codec": self.codec,
            "codec_sample_rate": self.codec_sample_rate,
        }
        out = {"__key__": self.key, CODES: _npy_bytes(self.codes)}
        if self.ref_codes is not None:
            meta["ref_text"] = self.ref_text
            out[REF_CODES] = _npy_bytes(self.ref_codes)
        out[META] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
        return out

    @classmethod
    def from_wds(cls, raw: dict) -> ShardSample:
        """Parse a raw WebDataset sample (bytes values).

        Raises:
            SampleError: missing fields, unreadable arrays or JSON, schema violations.
        """
        key = raw.get("__key__", "<no key>")
        where = f"{raw.get('__url__', '?')}:{key}"
        if GRID in raw or GRID_LABELS in raw:
            meta, arrays = _read_fields(raw, where, (GRID, GRID_LABELS))
            sample = cls(
                key=key,
                codes=np.zeros((0, CODEBOOKS), np.int16),
                text="",
                source=str(meta.get("source", "")),
                grid=arrays[GRID],
                grid_labels=arrays[GRID_LABELS],
                audio_frames=meta.get("frames") if isinstance(meta.get("frames"), int) else None,
            )
        else:
            meta, arrays = _read_fields(raw, where, (CODES,), optional=(REF_CODES,))
            if not isinstance(meta.get("text"), str):
                raise SampleError(f"{where}: json 'text' is missing or not a string")
            sample = cls(
                key=key,
                codes=arrays[CODES],
                text=meta["text"],
                source=meta.get("source", ""),
                codec=meta.get("codec", "xy_tokenizer"),
                codec_sample_rate=meta.get("codec_sample_rate", 16000),
                ref_codes=arrays.get(REF_CODES),
                ref_text=meta.get("ref_text"),
            )
        try:
            return sample.validate()
        except SampleError as err:
            raise SampleError(f"{raw.get('__url__', '?')}:{err}") from None


def _read_fields(raw: dict, where: str, required: tuple, optional: tuple = ()) -> tuple[dict, dict]:
    """The json object and the named arrays of a raw sample, or a SampleError naming what is wrong."""
    missing = [k for k in (*required, META) if k not in raw]
    if missing:
        raise SampleError(f"{where}: missing fields {missing} (has {sorted(k for k in raw if not k.startswith('__'))})")
    try:
        meta = json.loads(raw[META])
    except (ValueError, RecursionError) as err:
        raise SampleError(f"{where}: unreadable json ({err})") from None
    if not isinstance(meta, dict):
        raise SampleError(f"{where}: json must be an object, got {type(meta).__name__}")
    return meta, {k: _npy_load(raw[k], f"{where}: {k}") for k in (*required, *optional) if k in raw}


def _check_integer(key: str, name: str, array: np.ndarray) -> None:
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "iu":
        kind = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
        raise SampleError(f"{key}: {name} must hold integers, got {kind}")


def _npy_bytes(array: np.ndarray, dtype=np.int16) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, dtype=dtype), allow_pickle=False)
    return buf.getvalue()


def _npy_load(data: bytes, where: str, max_elements: int = MAX_ELEMENTS) -> np.ndarray:
    """An integer array from `.npy` bytes; the header is checked against the payload before anything is allocated."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SampleError(f"{where}: not bytes")
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(stream)
    except (ValueError, TypeError, SyntaxError, OverflowError) as err:
        raise SampleError(f"{where}: unreadable npy header ({err})") from None
    if dtype.hasobject or dtype.kind not in "iu":
        raise SampleError(f"{where}: must hold integers, got dtype {dtype}")
    count = int(np.prod(shape, dtype=object))
    if count > max_elements:
        raise SampleError(f"{where}: {shape} is too large ({count} elements > {max_elements})")
    if count * dtype.itemsize != len(data) - stream.tell():
        raise SampleError(f"{where}: header says {shape} {dtype}, payload has {len(data) - stream.tell()} bytes")
    stream.seek(0)
    return np.load(stream, allow_pickle=False)
