"""How each channel picks its token: per-channel sampling settings and a sampler that batches equal channels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.generation import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass
class ChannelSampling:
    """How one channel picks its token: greedy, or sampled after penalty/temperature/top-k/top-p."""

    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None

    def processors(self) -> LogitsProcessorList:
        out = LogitsProcessorList()
        if self.repetition_penalty not in (None, 1.0):
            out.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.temperature not in (None, 1.0):
            out.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            out.append(TopKLogitsWarper(int(self.top_k)))
        if self.top_p not in (None, 1.0):
            out.append(TopPLogitsWarper(float(self.top_p)))
        return out


class ChannelSampler:
    """Picks each channel's token: its logits processors, then greedy or a draw from a seeded generator.

    Neighbouring channels with the same settings and vocabulary (the 7 audio channels, as configured by
    every release) are processed and drawn in one call over their stacked logits, channel after channel: the
    same numbers and the same random draws as one call per channel, in a seventh of the launches.
    """

    def __init__(self, channels: Sequence[ChannelSampling], seed: int | None, device: torch.device):
        self.channels = list(channels)
        self.generator = None
        if any(c.do_sample for c in self.channels):
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed if seed is not None else torch.seed())
        self.groups: list[tuple[list[int], LogitsProcessorList, bool]] | None = None

    def _group(self, logits: list[torch.Tensor]) -> list[tuple[list[int], LogitsProcessorList, bool]]:
        groups: list[tuple[list[int], LogitsProcessorList, bool]] = []
        for c, sampling in enumerate(self.channels):
            last = groups[-1][0][-1] if groups else None
            if last is not None and self.channels[last] == sampling and logits[last].shape == logits[c].shape:
                groups[-1][0].append(c)
            else:
                groups.append(([c], sampling.processors(), sampling.do_sample))
        return groups

    def __call__(self, history: torch.Tensor, logits: list[torch.Tensor]) -> torch.Tensor:
        self.groups = self.groups or self._group(logits)
        batch, picks = history.shape[0], [None] * len(self.channels)
        for members, processors, do_sample in self.groups:
            scores = torch.cat([logits[c] for c in members]) if len(members) > 1 else logits[members[0]]
            if len(processors):
                past = history[..., members].permute(2, 0, 1).reshape(len(members) * batch, -1)
                scores = processors(past, scores)
            if do_sample:
                chosen = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator).squeeze(1)
            else:
                chosen = scores.argmax(dim=-1)
            for i, c in enumerate(members):
                picks[c] = chosen[i * batch : (i + 1) * batch]
        return torch.stack(picks, dim=-1)
