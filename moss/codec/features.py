"""Whisper-style 80-bin log-mel features, as the XY-Tokenizer computes them.

Hann STFT (n_fft 400, hop 160, centred, reflect padding), power spectrum with the last frame dropped, Slaney
mel filters over 0-8 kHz, log10 clamped at 1e-10, floored at (per-clip max - 8), then `(x + 4) / 4`.

The original pads every clip with zeros to a 30 s window before this. Only the frames next to the clip
matter to the model (attention masks the rest, and the floor's max comes from frames that see the clip),
so `log_mel` pads just far enough past the longest clip of a batch: the valid frames come out the same,
for a fraction of the work on short clips.
"""

from __future__ import annotations

import torch
from transformers.audio_utils import mel_filter_bank

from moss.audio import SAMPLE_RATE

# Frames kept past the longest clip: the encoder's convolutions look 3 mel frames beyond a clip's end.
MARGIN_FRAMES = 4


class LogMel(torch.nn.Module):
    """Batched log-mel features `[B, 80, T]` and valid frame counts from padded waveforms `[B, N]`."""

    def __init__(
        self,
        n_fft: int = 400,
        hop_length: int = 160,
        n_mels: int = 80,
        sample_rate: int = SAMPLE_RATE,
        window_samples: int = 480000,
    ):
        super().__init__()
        self.n_fft, self.hop_length, self.window_samples = n_fft, hop_length, window_samples
        filters = mel_filter_bank(
            num_frequency_bins=1 + n_fft // 2,
            num_mel_filters=n_mels,
            min_frequency=0.0,
            max_frequency=sample_rate / 2,
            sampling_rate=sample_rate,
            norm="slaney",
            mel_scale="slaney",
        )
        self.register_buffer("filters", torch.from_numpy(filters).float().T.contiguous(), persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(
        self, waveforms: torch.Tensor, lengths: torch.Tensor, full_window: bool = False, longest: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of a zero-padded batch.

        Args:
            waveforms: `[B, N]` float, 16 kHz, zero beyond each clip's length (N <= the 30 s window).
            lengths: `[B]` valid samples per clip.
            full_window: compute all frames of the 30 s window, as the original does (3000 frames).
            longest: `max(lengths)`, when known on the host (else read from the device).

        Returns:
            (`[B, 80, T]` features, `[B]` valid frames = ceil(length / hop)).
        """
        frames = self.window_samples // self.hop_length
        if not full_window:
            longest = int(lengths.max()) if longest is None else longest
            frames = min(longest // self.hop_length + 1 + MARGIN_FRAMES, frames)
        total = frames * self.hop_length
        if waveforms.shape[1] < total:
            waveforms = torch.nn.functional.pad(waveforms, (0, total - waveforms.shape[1]))
        stft = torch.stft(
            waveforms[:, :total].float(), self.n_fft, self.hop_length, window=self.window, return_complex=True
        )
        power = stft[..., :-1].abs() ** 2
        log_spec = torch.clamp(self.filters @ power, min=1e-10).log10()
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
        features = (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0
        valid = (lengths + self.hop_length - 1) // self.hop_length
        return features, valid
