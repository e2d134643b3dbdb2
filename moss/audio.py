"""Reading audio for the codec: any file libsndfile decodes -> mono float32 at 16 kHz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

SAMPLE_RATE = 16000


def read_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 at `sample_rate`: soundfile decodes, channels are averaged, torchaudio resamples.

    Raises:
        soundfile.LibsndfileError: unreadable or corrupt files (callers turn it into a report entry).
    """
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    wave = data.mean(axis=1)
    if rate != sample_rate:
        wave = torchaudio.functional.resample(torch.from_numpy(wave), rate, sample_rate).numpy()
    return np.ascontiguousarray(wave, dtype=np.float32)
