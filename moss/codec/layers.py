"""XY-Tokenizer building blocks: Whisper-style transformers, encoders, decoder, adapters, re-sampling convs.

Attribute names follow the original modules so `xy_tokenizer.ckpt` loads key for key. Layout: features are
`[B, D, T]` between blocks (channels first), `[B, T, D]` inside transformers; every block takes per-clip
valid lengths and zeroes its output beyond them, so clips of different lengths share a batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moss.audio import SAMPLE_RATE


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's positional table `[length, channels]`: sines then cosines, geometric timescales."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2))
    scaled = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


def length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """`[B, size]` True where the position is inside the clip."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention over the valid positions of each clip (key bias-free, as trained)."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape

        def heads(t):
            return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        # Padding keys are masked; padding queries still attend the clip (their rows are discarded later),
        # so no row is ever fully masked.
        out = F.scaled_dot_product_attention(
            heads(self.q_proj(x)),
            heads(self.k_proj(x)),
            heads(self.v_proj(x)),
            attn_mask=key_mask[:, None, None, :],
            scale=self.head_dim**-0.5,
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class WhisperLayer(nn.Module):
    """Pre-LayerNorm transformer layer: attention and a GELU feed-forward, each residual."""

    def __init__(self, d_model: int, heads: int, ffn_dim: int):
        super().__init__()
        self.self_attn = SelfAttention(d_model, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), key_mask)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype in (torch.float16, torch.bfloat16):
            limit = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-limit, limit)
        return x


class TransformerStack(nn.Module):
    """Positional table + layers + final LayerNorm over `[B, T, D]`, zeroed beyond each clip."""

    def __init__(self, d_model: int, heads: int, ffn_dim: int, layers: int, positions: int):
        super().__init__()
        self.register_buffer("positional_embedding", sinusoids(positions, d_model))
        self.layers = nn.ModuleList(WhisperLayer(d_model, heads, ffn_dim) for _ in range(layers))
        self.layer_norm = nn.LayerNorm(d_model)

    def run(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = length_mask(lengths, x.shape[1])
        x = (x.float() + self.positional_embedding[: x.shape[1]]).to(x.dtype)
        for layer in self.layers:
            x = layer(x, mask)
        return torch.where(mask[..., None], self.layer_norm(x), 0.0)


class AudioEncoder(TransformerStack):
    """Mel `[B, 80, T]` -> two convolutions (the second halves the rate) -> transformer -> `[B, D, T/2]`."""

    def __init__(
        self,
        num_mel_bins=80,
        d_model=768,
        encoder_layers=12,
        encoder_attention_heads=12,
        encoder_ffn_dim=3072,
        stride_size=2,
        kernel_size=3,
        max_audio_seconds=30,
        sampling_rate=SAMPLE_RATE,
        hop_length=160,
        **_,
    ):
        positions = (max_audio_seconds * sampling_rate // hop_length) // stride_size
        super().__init__(d_model, encoder_attention_heads, encoder_ffn_dim, encoder_layers, positions)
        self.stride_size = stride_size
        self.conv1 = nn.Conv1d(num_mel_bins, d_model, kernel_size, padding=1)
        self.conv2 = nn.Conv1d(d_model, d_model, kernel_size, stride=stride_size, padding=1)

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel.to(self.conv1.weight.dtype)))))
        lengths = lengths // self.stride_size
        return self.run(x.transpose(1, 2), lengths).transpose(1, 2), lengths


class Adapter(TransformerStack):
    """Optional input projection -> transformer -> optional output projection, `[B, D_in, T]` -> `[B, D_out, T]`."""

    def __init__(
        self,
        input_dim=768,
        d_model=768,
        output_dim=768,
        max_source_positions=1500,
        encoder_layers=4,
        encoder_attention_heads=12,
        encoder_ffn_dim=3072,
        **_,
    ):
        super().__init__(d_model, encoder_attention_heads, encoder_ffn_dim, encoder_layers, max_source_positions)
        self.proj = nn.Linear(input_dim, d_model) if input_dim != d_model else None
        self.out_proj = nn.Linear(d_model, output_dim) if output_dim != d_model else None

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.transpose(1, 2)
        if self.proj is not None:
            x = self.proj(x)
        x = self.run(x, lengths)
        if self.out_proj is not None:
            x = self.out_proj(x)
        return x.transpose(1, 2), lengths


class AudioDecoder(TransformerStack):
    """`[B, D, T]` -> transformer -> two transposed convolutions (doubling the rate) -> mel `[B, 80, 2T]`."""

    def __init__(
        self,
        num_mel_bins=80,
        d_model=768,
        decoder_layers=12,
        decoder_attention_heads=12,
        decoder_ffn_dim=3072,
        stride_size=2,
        kernel_size=3,
        max_audio_seconds=30,
        sampling_rate=SAMPLE_RATE,
        hop_length=160,
        **_,
    ):
        positions = (max_audio_seconds * sampling_rate // hop_length) // stride_size
        super().__init__(d_model, decoder_attention_heads, decoder_ffn_dim, decoder_layers, positions)
        self.stride_size = stride_size
        self.deconv1 = nn.ConvTranspose1d(d_model, d_model, kernel_size, stride=stride_size)
        self.deconv2 = nn.ConvTranspose1d(d_model, num_mel_bins, kernel_size, stride=1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        length = x.shape[2]
        x = self.run(x.transpose(1, 2), lengths).transpose(1, 2)
        mel = F.gelu(self.deconv2(F.gelu(self.deconv1(x))))
        return mel[:, :, : length * self.stride_size], lengths * self.stride_size


class ResidualDownConv(nn.Module):
    """Groups `avg_pooler` frames: gated conv (SiLU(gate) * up) -> linear, plus the stacked frames, LayerNorm."""

    def __init__(self, d_model=768, avg_pooler=4):
        super().__init__()
        self.avg_pooler = avg_pooler
        wide = d_model * avg_pooler
        self.gate_proj = nn.Conv1d(d_model, wide, avg_pooler, avg_pooler, bias=False)
        self.up_proj = nn.Conv1d(d_model, wide, avg_pooler, avg_pooler, bias=False)
        self.down_proj = nn.Linear(wide, wide, bias=False)
        self.layer_norm = nn.LayerNorm(wide)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rest = x.shape[2] % self.avg_pooler
        if rest:  # pad time with zeros (the frames past every clip are zero already)
            x = F.pad(x, (0, self.avg_pooler - rest))
        batch, dim, length = x.shape
        gate = self.gate_proj(x).transpose(1, 2)
        up = self.up_proj(x).transpose(1, 2)
        stacked = x.transpose(1, 2).reshape(batch, length // self.avg_pooler, dim * self.avg_pooler)
        out = self.layer_norm(self.down_proj(F.silu(gate) * up) + stacked)
        return out.transpose(1, 2), lengths // self.avg_pooler


class UpConv(nn.Module):
    """Transposed convolution that turns each frame into `stride` frames of `d_model` channels."""

    def __init__(self, d_model=768, stride=4):
        super().__init__()
        self.stride = stride
        self.up_conv = nn.ConvTranspose1d(stride * d_model, d_model, stride, stride, bias=False)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.up_conv(x), lengths * self.stride
