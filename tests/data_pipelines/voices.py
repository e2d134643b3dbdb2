"""A synthetic voiced sound (a pulse train through formant resonators, syllables at 4 Hz) that Silero VAD hears
as speech at a low threshold: test audio for the real VAD, with no recording needed."""

import numpy as np
from scipy.signal import lfilter


def voiced(seconds: float, f0: float, formants: list[tuple[float, float]], seed: int = 0, rate: int = 16000):
    """`seconds` of a vowel-like sound at pitch `f0` with `(frequency, bandwidth)` formants, peak 0.3."""
    t = np.arange(int(seconds * rate)) / rate
    phase = np.cumsum(f0 * (1 + 0.05 * np.sin(2 * np.pi * 0.7 * t)) / rate)
    x = (np.diff(np.floor(phase), prepend=0) > 0).astype(float)
    x += 0.02 * np.random.default_rng(seed).standard_normal(len(t))
    for freq, bandwidth in formants:
        r, theta = np.exp(-np.pi * bandwidth / rate), 2 * np.pi * freq / rate
        x = lfilter([1], [1, -2 * r * np.cos(theta), r * r], x)
    x *= 0.5 * (1 - np.cos(2 * np.pi * 4 * t))
    return (0.3 * x / np.abs(x).max()).astype(np.float32)
