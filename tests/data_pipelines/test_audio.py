"""Reading audio: the original's torchaudio kernel for usual rates, bounded soxr for odd ones, headers first."""

import math

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from moss import audio
from moss.audio import AudioError, AudioLimits, read_audio


def sine(rate: int, seconds: float = 1.0, freq: float = 440.0) -> np.ndarray:
    return (0.5 * np.sin(2 * math.pi * freq * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_usual_rates_use_the_original_kernel_exactly(tmp_path, rate):
    stereo = np.stack([sine(rate), sine(rate, freq=300)], axis=1)
    sf.write(tmp_path / "a.wav", stereo, rate, subtype="FLOAT")
    expected = torchaudio.functional.resample(torch.from_numpy(stereo.mean(axis=1)), rate, 16000).numpy()
    np.testing.assert_array_equal(read_audio(tmp_path / "a.wav"), expected)


@pytest.mark.parametrize("rate", [7919, 44101, 96001])
def test_odd_rates_resample_in_bounded_memory(tmp_path, rate, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torchaudio's kernel for this ratio would take gigabytes")

    monkeypatch.setattr(audio.torchaudio.functional, "resample", refuse)
    sf.write(tmp_path / "a.wav", sine(rate, 1.2), rate, subtype="FLOAT")
    wave = read_audio(tmp_path / "a.wav")
    assert abs(len(wave) - 1.2 * 16000) <= 2
    reference = sine(16000, 1.2)
    middle = slice(800, len(wave) - 800)  # away from the filter's edges
    np.testing.assert_allclose(wave[middle], reference[: len(wave)][middle], atol=2e-3)


def test_headers_are_refused_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(audio, "BLOCK_SECONDS", 0.07)  # several blocks per file
    sf.write(tmp_path / "long.wav", sine(16000, 3.0), 16000)
    with pytest.raises(AudioError, match="longer than the maximum"):
        read_audio(tmp_path / "long.wav", limits=AudioLimits(max_seconds=2.0))
    sf.write(tmp_path / "slow.wav", sine(4000), 4000)
    with pytest.raises(AudioError, match="sample rate out of range"):
        read_audio(tmp_path / "slow.wav", limits=AudioLimits(min_sample_rate=8000))
    six = np.stack([sine(16000)] * 6, axis=1)
    sf.write(tmp_path / "six.wav", six, 16000)
    with pytest.raises(AudioError, match="too many channels"):
        read_audio(tmp_path / "six.wav", limits=AudioLimits(max_channels=2))
    np.testing.assert_allclose(read_audio(tmp_path / "six.wav"), sine(16000), atol=1e-4)  # down-mixed per block
