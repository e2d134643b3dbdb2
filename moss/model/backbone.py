"""MossTTSD's parts under the original's key names (channel embeddings + Qwen3 decoder), and its outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Qwen3Model

from moss.model.attention import check_attn_implementation
from moss.model.config import MossTTSDConfig


@dataclass
class MossTTSDOutput:
    """Model outputs.

    Attributes:
        loss: weighted sum of `channel_losses` (None without labels).
        channel_losses: `[C]` mean CE per channel over its valid shifted labels.
        channel_loss_sums: `[C]` summed CE per channel (for step-level normalisation).
        channel_label_counts: `[C]` valid shifted labels per channel.
        logits: tuple of C tensors `[B, T, V_c]`, or None when not requested.
        hidden_states: tuple of per-layer hidden states when requested.
        cache: the KV cache when `use_cache=True`.
        last_hidden_state: `[B, T, H]` final normed hidden states.
    """

    loss: torch.Tensor | None = None
    channel_losses: torch.Tensor | None = None
    channel_loss_sums: torch.Tensor | None = None
    channel_label_counts: torch.Tensor | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    cache: object | None = None
    last_hidden_state: torch.Tensor | None = None


class MossTTSDBackbone(nn.Module):
    """Channel embeddings summed, then the Qwen3 decoder (`AsteroidTTSModel` in the original).

    It holds the parameters under the original key names; `MossTTSD.forward` runs `embed` and the decoder
    itself, flattening packed rows in between.
    """

    def __init__(self, config: MossTTSDConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        embeddings = [nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)]
        embeddings += [
            nn.Embedding(config.speech_vocab_size, config.hidden_size, padding_idx=config.speech_pad_token)
            for _ in range(1, config.channels)
        ]
        self.embedding_list = nn.ModuleList(embeddings)
        # `language_model.embed_tokens` exists in real checkpoints but is never used: inputs arrive as embeddings.
        self.language_model = Qwen3Model(config.qwen3_config(check_attn_implementation(attn_implementation)))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Sum of channel embeddings. input_ids `[B, T, C]` -> `[B, T, H]`."""
        channels = self.config.channels
        if input_ids.ndim != 3 or input_ids.shape[-1] != channels:
            raise ValueError(
                f"expected input_ids [B, T, {channels}] (channels={channels}: text/codebook-0 + "
                f"{channels - 1} codebooks), got {tuple(input_ids.shape)}"
            )
        embeds = self.embedding_list[0](input_ids[..., 0])
        for c in range(1, channels):
            embeds = embeds + self.embedding_list[c](input_ids[..., c])
        return embeds
