"""The MOSS-TTSD delay pattern: channel c is shifted down by c rows (pure tensor functions).

With the model's internal one-row label shift, the hidden state of row t then predicts codebook c of audio
frame t+1-c having already seen codebooks 0..c-1 of that frame.

Layout: grids are `[T, C]` (or `[B, T, C]`); the delayed grid is `[T + C - 1, C]`.
Fill values (as the original `shifting_inputs` / `truncate_and_shift`): channel 0 tail rows get
`text_pad_id` (the tokenizer's pad, 151643 real), channels >= 1 head and tail rows get `speech_pad` (1024);
labels are filled with -100 everywhere outside the shifted data.
"""

from __future__ import annotations

import numpy as np
import torch

from moss.model.loss import IGNORE_INDEX


def apply_delay_pattern(grid: torch.Tensor, text_pad_id: int, speech_pad: int = 1024) -> torch.Tensor:
    """Delay an input grid `[..., T, C]` -> `[..., T + C - 1, C]` (channel c shifted down c rows).

    Accepts a tensor or a numpy array and returns the same kind.
    """
    return _shift(grid, fill=[text_pad_id] + [speech_pad] * (grid.shape[-1] - 1))


def apply_delay_pattern_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Delay a label grid `[..., T, C]` -> `[..., T + C - 1, C]`, filling with `ignore_index`."""
    return _shift(labels, fill=[ignore_index] * labels.shape[-1])


def _shift(grid, fill: list[int]):
    if isinstance(grid, np.ndarray):  # the data loader's path: no per-op torch overhead
        *lead, length, channels = grid.shape
        out = np.empty((*lead, length + channels - 1, channels), dtype=grid.dtype)
        out[:] = np.asarray(fill, dtype=grid.dtype)
        for c in range(channels):
            out[..., c : c + length, c] = grid[..., c]
        return out
    grid = torch.as_tensor(grid)
    *lead, length, channels = grid.shape
    out = torch.empty(*lead, length + channels - 1, channels, dtype=grid.dtype, device=grid.device)
    out[:] = torch.tensor(fill, dtype=grid.dtype, device=grid.device)
    for c in range(channels):
        out[..., c : c + length, c] = grid[..., c]
    return out


def revert_delay_pattern(delayed: torch.Tensor) -> torch.Tensor:
    """Undo the delay: `[..., T', C]` -> `[..., T' - C + 1, C]`, row k = frame k of every channel."""
    delayed = torch.as_tensor(delayed)
    channels = delayed.shape[-1]
    length = delayed.shape[-2] - channels + 1
    if length < 0:
        raise ValueError(f"a delayed grid needs at least {channels - 1} rows, got {delayed.shape[-2]}")
    return torch.stack([delayed[..., c : c + length, c] for c in range(channels)], dim=-1)


def last_valid_frame(codes: torch.Tensor, speech_pad: int = 1024) -> torch.Tensor:
    """Index of the last frame whose channel 1 is not `speech_pad` (-1 if none). codes `[..., T, C]`.

    The original trims generated audio to frames `[0, last]`: the end-of-speech frame has channel 1 = pad.
    """
    if codes.shape[-2] == 0:
        return torch.full(codes.shape[:-2], -1, dtype=torch.long, device=codes.device)
    valid = codes[..., 1] != speech_pad
    idx = torch.arange(codes.shape[-2], device=codes.device)
    return torch.where(valid, idx, torch.full_like(idx, -1)).amax(dim=-1)
