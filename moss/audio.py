"""Reading audio for the codec: any file libsndfile decodes -> mono float32 at 16 kHz, in bounded memory.

The header is checked before any sample is decoded (rate, channels, duration), channels are averaged block
by block (a 6-channel 96 kHz file never exists in memory as a whole), and resampling takes the exact
torchaudio kernel of the original for the usual rates, or soxr where that kernel would be huge: torchaudio's
kernel grows with `16000 * rate / gcd(16000, rate)^2`, so 44,101 Hz would need gigabytes.
"""

from __future__ import annotations

import math
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
    if rate == target:
        return wave
    g = math.gcd(rate, target)
    if (rate // g) * (target // g) <= MAX_KERNEL_TAPS:
        return torchaudio.functional.resample(torch.from_numpy(wave), rate, target).numpy()
    import soxr

    return soxr.resample(wave, rate, target, quality="VHQ").astype(np.float32, copy=False)


def read_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, limits: AudioLimits | None = None) -> np.ndarray:
    """Mono float32 at `sample_rate`: header checked, channels averaged per block, then resampled.

    Raises:
        soundfile.LibsndfileError: unreadable or corrupt files.
        AudioError: a header outside `limits` (rate, channels, duration) or no samples.
    """
    limits = limits or AudioLimits()
    with sf.SoundFile(str(path)) as f:
        rate, channels, frames = f.samplerate, f.channels, f.frames
        if not limits.min_sample_rate <= rate <= limits.max_sample_rate:
            raise AudioError(
                f"sample rate out of range ({rate} Hz; allowed {limits.min_sample_rate}..{limits.max_sample_rate} Hz)"
            )
        if not 1 <= channels <= limits.max_channels:
            raise AudioError(f"too many channels ({channels} > {limits.max_channels})")
        cap = int(limits.max_seconds * rate) + 1
        if frames > cap:
            raise AudioError(f"longer than the maximum (header: {frames / rate:.1f} s > {limits.max_seconds:g} s)")
        # Decoders may deliver fewer frames than the header claims (truncated files), never more than `cap`.
        mono = np.empty(max(frames, 0), np.float32)
        filled = 0
        block = max(1, int(BLOCK_SECONDS * rate))
        while filled < len(mono):
            data = f.read(min(block, len(mono) - filled), dtype="float32", always_2d=True)
            if len(data) == 0:
                break
            mono[filled : filled + len(data)] = data.mean(axis=1)
            filled += len(data)
    if filled == 0:
        raise AudioError("no samples (empty audio stream)")
    wave = resample(mono[:filled], rate, sample_rate)
    return np.ascontiguousarray(wave, dtype=np.float32)
