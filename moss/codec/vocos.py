"""The XY-Tokenizer vocoder: a Vocos ConvNeXt backbone and an inverse-STFT head ("same" padding).

Mel `[B, 80, T]` at 100 frames/s -> waveform `[B, T * hop]`. Clips of different lengths share a batch:
the backbone zeroes every convolution's input past each clip, and the inverse STFT runs per clip over its
own frames, so a clip decodes to the same samples alone or batched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvNeXtBlock(nn.Module):
    """Depthwise conv (k7) -> LayerNorm -> Linear -> GELU -> Linear -> layer scale, residual."""

    def __init__(self, dim: int, intermediate_dim: int, layer_scale: float):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x * mask).transpose(1, 2)
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + y.transpose(1, 2)


class VocosBackbone(nn.Module):
    """Embedding conv -> LayerNorm -> ConvNeXt blocks -> LayerNorm, at the mel frame rate."""

    def __init__(self, input_channels: int, dim: int, intermediate_dim: int, num_layers: int):
        super().__init__()
        self.embed = nn.Conv1d(input_channels, dim, kernel_size=7, padding=3)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.convnext = nn.ModuleList(ConvNeXtBlock(dim, intermediate_dim, 1 / num_layers) for _ in range(num_layers))
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Mel `[B, C, T]` -> `[B, T, dim]`."""
        mask = (torch.arange(mel.shape[2], device=mel.device)[None, :] < lengths[:, None]).unsqueeze(1).to(mel.dtype)
        x = self.norm(self.embed(mel * mask).transpose(1, 2)).transpose(1, 2)
        for block in self.convnext:
            x = block(x, mask)
        return self.final_layer_norm(x.transpose(1, 2))


class InverseSTFT(nn.Module):
    """Overlap-add inverse STFT with "same" padding: T frames -> T * hop samples, window-envelope normalised."""

    def __init__(self, n_fft: int, hop_length: int):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.register_buffer("window", torch.hann_window(n_fft))

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        """spec: complex `[B, n_fft/2 + 1, T]` -> `[B, T * hop]`."""
        frames = spec.shape[2]
        pad = (self.n_fft - self.hop_length) // 2
        size = (frames - 1) * self.hop_length + self.n_fft
        chunks = torch.fft.irfft(spec, self.n_fft, dim=1, norm="backward") * self.window[None, :, None]

        def overlap_add(columns):
            return F.fold(columns, output_size=(1, size), kernel_size=(1, self.n_fft), stride=(1, self.hop_length))

        signal = overlap_add(chunks)[:, 0, 0, pad : size - pad]
        envelope = overlap_add(self.window.square()[None, :, None].expand(1, -1, frames))[0, 0, 0, pad : size - pad]
        return signal / envelope


class ISTFTHead(nn.Module):
    """Linear -> log-magnitude and phase halves -> complex spectrum -> inverse STFT."""

    def __init__(self, dim: int, n_fft: int, hop_length: int):
        super().__init__()
        self.out = nn.Linear(dim, n_fft + 2)
        self.istft = InverseSTFT(n_fft, hop_length)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """Hidden `[B, T, dim]` -> one waveform per clip, over its own `lengths[b]` frames."""
        magnitude, phase = self.out(x).transpose(1, 2).float().chunk(2, dim=1)
        spec = torch.clip(torch.exp(magnitude), max=1e2) * torch.exp(1j * phase)
        return [self.istft(spec[b : b + 1, :, : int(n)])[0] for b, n in enumerate(lengths)]


class Vocos(nn.Module):
    """Mel frames -> waveform (`hop_size` samples per frame)."""

    def __init__(
        self,
        input_channels=80,
        dim=512,
        intermediate_dim=4096,
        num_layers=30,
        n_fft=1280,
        hop_size=320,
        padding="same",
        **_,
    ):
        super().__init__()
        if padding != "same":
            raise ValueError(f"only Vocos padding='same' is supported (the XY-Tokenizer's), got {padding!r}")
        self.hop_size = hop_size
        self.backbone = VocosBackbone(input_channels, dim, intermediate_dim, num_layers)
        self.head = ISTFTHead(dim, n_fft, hop_size)

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        return self.head(self.backbone(mel, lengths), lengths)
