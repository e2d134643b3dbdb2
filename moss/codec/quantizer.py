"""Residual vector quantiser of the XY-Tokenizer, inference only: 8 codebooks of 1024 codes.

Each stage picks the nearest code (squared Euclidean distance, float32) for the remaining residual; the
quantised vector is the sum over stages, projected back by a weight-normalised 1x1 convolution. Training
machinery of the original (EMA updates, k-means init, dead-code replacement, dropout) is not needed to
encode or decode; its buffers are kept so checkpoints load strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormConv1d(nn.Module):
    """1-D convolution with weight = g * v / ||v|| (norm per output channel): the legacy `weight_norm` keys."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_channels, 1, 1))
        self.weight_v = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        nn.init.kaiming_uniform_(self.weight_v, a=5**0.5)

    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=(1, 2), keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight(), self.bias)


class Codebook(nn.Module):
    """One quantiser stage; `codebook` `[size, dim]` is a buffer, as in the original checkpoints."""

    def __init__(self, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.register_buffer("codebook", torch.zeros(codebook_size, codebook_dim))
        self.register_buffer("inited", torch.tensor([False]))
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed_avg", torch.zeros(codebook_size, codebook_dim))

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Indices `[N]` of the nearest codes to rows of `x` `[N, dim]`."""
        codebook = self.codebook.float()
        dist = x.pow(2).sum(1, keepdim=True) - 2 * x @ codebook.T + codebook.pow(2).sum(1)[None, :]
        return dist.argmin(dim=1)


class ResidualVQ(nn.Module):
    """`[B, D_in, T]` -> codes `[Q, B, T]` and the quantised `[B, D_out, T]`; `decode_codes` inverts."""

    def __init__(
        self, input_dim=3072, rvq_dim=512, output_dim=3072, num_quantizers=8, codebook_size=1024, codebook_dim=512, **_
    ):
        super().__init__()
        if codebook_dim != rvq_dim:
            raise ValueError(f"codebook_dim ({codebook_dim}) must equal rvq_dim ({rvq_dim}), as in every XY config")
        self.rvq_dim = rvq_dim
        self.input_proj = WeightNormConv1d(input_dim, rvq_dim) if input_dim != rvq_dim else nn.Identity()
        self.output_proj = WeightNormConv1d(rvq_dim, output_dim) if rvq_dim != output_dim else nn.Identity()
        self.quantizers = nn.ModuleList(Codebook(codebook_size, codebook_dim) for _ in range(num_quantizers))

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, z: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Always float32: nearest-code decisions must not depend on the compute dtype of the encoders."""
        residual = self.input_proj(z.float()).float()
        batch, dim, length = residual.shape
        mask = (torch.arange(length, device=z.device)[None, :] < lengths[:, None]).unsqueeze(1)
        quantized = torch.zeros_like(residual)
        codes = []
        for stage in self.quantizers:
            rows = (residual * mask).transpose(1, 2).reshape(-1, dim)
            index = stage.nearest(rows).view(batch, length)
            chosen = F.embedding(index, stage.codebook.float()).transpose(1, 2) * mask
            quantized = quantized + chosen
            residual = residual - chosen
            codes.append(index)
        return self.output_proj(quantized), torch.stack(codes)

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes `[Q, B, T]` -> `[B, D_out, T]` (sum of the chosen codes, projected)."""
        emb = sum(
            F.embedding(codes[i], stage.codebook.float()) for i, stage in enumerate(self.quantizers[: len(codes)])
        )
        return self.output_proj(emb.transpose(1, 2))
