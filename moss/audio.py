"""Reading audio for the codec: any file libsndfile decodes -> mono float32 at 16 kHz, in bounded memory.

The header is checked before any sample is decoded (rate, channels, duration), channels are averaged block
by block (a 6-channel 96 kHz file never exists in memory as a whole), and resampling takes the exact
torchaudio kernel of the original for the usual rates, or soxr where that kernel would be huge: torchaudio's
kernel grows with `16000 * rate / gcd(16000, rate)^2`, so 44,101 Hz would need gigabytes.
"""

from __future__ import annotations

import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

SAMPLE_RATE = 16000
FRAME_RATE = 12.5  # codec frames per second (16 kHz / 1280 samples): one row of a code grid
# torchaudio's sinc kernel has about (out/g) * (in/g) taps; above this soxr resamples in bounded memory.
MAX_KERNEL_TAPS = 1_000_000
BLOCK_SECONDS = 10


class AudioError(ValueError):
    """Audio that cannot be used; the message says why (the caller adds the path)."""


@dataclass(frozen=True)
class AudioLimits:
    """What a file may claim in its header before it is decoded."""

    max_seconds: float = 3600.0
    min_sample_rate: int = 4000
    max_sample_rate: int = 192000
    max_channels: int = 32


def resample(wave: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 `wave` from `rate` to `target`: torchaudio's kernel (the original's) when it is small."""
    if rate == target or not wave.size:  # an empty clip (a model that ended at once) stays empty
        return wave
    g = math.gcd(rate, target)
    if (rate // g) * (target // g) <= MAX_KERNEL_TAPS:
        return torchaudio.functional.resample(torch.from_numpy(wave), rate, target).numpy()
    import soxr

    return soxr.resample(wave, rate, target, quality="VHQ").astype(np.float32, copy=False)


def read_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, limits: AudioLimits | None = None) -> np.ndarray:
    """Mono float32 at `sample_rate`: header checked, channels averaged per block, then resampled.

    A file cut short is refused rather than read as far as it goes (its transcript would describe audio that is
    not there): fewer samples decoded than the header gives, a WAV whose data chunk runs past the end of the
    file, an Ogg stream without its last page. A header that does not give the length (FLAC with 0 total
    samples, which is legal) is decoded up to the duration limit.

    Raises:
        soundfile.LibsndfileError: unreadable or corrupt files.
        AudioError: a header outside `limits` (rate, channels, duration), a file cut short, or no samples.
    """
    limits = limits or AudioLimits()
    kind = os.stat(path).st_mode
    if not stat.S_ISREG(kind):  # opening a FIFO waits for a writer forever; a device reads forever
        what = "a folder" if stat.S_ISDIR(kind) else "a pipe" if stat.S_ISFIFO(kind) else "a device or socket"
        raise AudioError(f"not a regular file ({what}); name audio files only")
    with sf.SoundFile(str(path)) as f:
        rate, channels, frames = f.samplerate, f.channels, f.frames
        if not limits.min_sample_rate <= rate <= limits.max_sample_rate:
            raise AudioError(
                f"sample rate out of range ({rate} Hz; allowed {limits.min_sample_rate}..{limits.max_sample_rate} Hz)"
            )
        if not 1 <= channels <= limits.max_channels:
            raise AudioError(f"too many channels ({channels} > {limits.max_channels})")
        cap = int(limits.max_seconds * rate) + 1
        if frames >= UNKNOWN_LENGTH:
            mono = _read_unknown_length(f, cap, limits.max_seconds)
        elif frames > cap:
            raise AudioError(f"longer than the maximum (header: {frames / rate:.1f} s > {limits.max_seconds:g} s)")
        else:
            mono = _read_known_length(f, frames)
            if frames - len(mono) > max(TRUNCATION_TOLERANCE, frames // 2000):
                raise AudioError(
                    f"file cut short (decoded {len(mono) / rate:.2f} s of the {frames / rate:.2f} s its header gives)"
                )
        if reason := _cut_short(f, Path(path)):
            raise AudioError(f"file cut short ({reason})")
    if len(mono) == 0:
        raise AudioError("no samples (empty audio stream)")
    wave = resample(mono, rate, sample_rate)
    return np.ascontiguousarray(wave, dtype=np.float32)


UNKNOWN_LENGTH = 1 << 62  # libsndfile reports 2**63 - 1 frames when the header does not give the length
TRUNCATION_TOLERANCE = 64  # samples a decoder may deliver short of the header (codec padding), besides 0.05 %


def _read_known_length(f: sf.SoundFile, frames: int) -> np.ndarray:
    mono = np.empty(max(frames, 0), np.float32)
    filled, block = 0, max(1, int(BLOCK_SECONDS * f.samplerate))
    while filled < len(mono):
        data = f.read(min(block, len(mono) - filled), dtype="float32", always_2d=True)
        if len(data) == 0:
            break
        mono[filled : filled + len(data)] = data.mean(axis=1)
        filled += len(data)
    return mono[:filled]


def _read_unknown_length(f: sf.SoundFile, cap: int, max_seconds: float) -> np.ndarray:
    """Decode block by block up to `cap` frames (soundfile's `read` seeks after reading, which these files refuse)."""
    blocks, total = [], 0
    block = max(1, int(BLOCK_SECONDS * f.samplerate))
    while True:
        buf = np.empty((block, f.channels), np.float32)
        n = sf._snd.sf_readf_float(f._file, sf._ffi.cast("float *", buf.ctypes.data), block)  # noqa: SLF001
        if n <= 0:
            break
        total += n
        if total > cap:
            raise AudioError(f"longer than the maximum (decoded past {max_seconds:g} s; the header gives no length)")
        blocks.append(buf[:n].mean(axis=1))
    return np.concatenate(blocks) if blocks else np.empty(0, np.float32)


_WAV_SHOULD_BE = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.M)


def _cut_short(f: sf.SoundFile, path: Path) -> str | None:
    """Why a decodable file is still incomplete (libsndfile reads such WAV and Ogg files without a word)."""
    if f.format in ("WAV", "WAVEX", "RF64", "W64"):
        if m := _WAV_SHOULD_BE.search(f.extra_info):
            claimed, present = int(m.group(1)), int(m.group(2))
            if present < claimed:
                return f"its data chunk claims {claimed} bytes, the file holds {present}"
    elif f.format == "OGG":
        return _ogg_cut_short(path)
    return None


def _ogg_cut_short(path: Path, tail: int = 1 << 16) -> str | None:
    """An Ogg stream ends with a complete page flagged end-of-stream; a cut file ends without one."""
    size = path.stat().st_size
    with open(path, "rb") as raw:
        raw.seek(max(0, size - tail))
        data = raw.read()
    at = data.rfind(b"OggS")
    if at < 0 or len(data) - at < 27:
        return "no complete Ogg page at its end"
    segments = data[at + 26]
    if len(data) - at < 27 + segments:
        return "its last Ogg page is incomplete"
    body = sum(data[at + 27 : at + 27 + segments])
    if at + 27 + segments + body > len(data):
        return "its last Ogg page is incomplete"
    if not data[at + 5] & 0x04:
        return "its Ogg stream has no end-of-stream page"
    return None
