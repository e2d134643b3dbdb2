"""Prompt-augmented decoding, as MOSS-TTSD v0.7 decodes generated codes.

The codec decodes a window better when it has heard the voice before. So the prompt audio is cut or padded to
20 s and encoded once, and the generated codes are decoded in 10 s windows (125 frames) starting every 85
frames, each window behind the 20 s of prompt codes; the prompt's samples are dropped from each result. Of
each window the first one keeps frames [0, 105), the others [20, 105) (20 frames of left context are decoded
but not kept), and a last window that starts less than 105 frames before the end keeps [20, end). Segments
are joined with a 0.1 s linear cross-fade, the earlier one extended by 0.1 s past its kept end unless its
window reaches the end of the codes, so the result has `frames * decoder_upsample_rate` samples (0.1 s fewer
when the second-to-last window already reaches the end, 106-125 frames before it: the original does the
same). Items without prompt audio use the plain windowed decode (`XYTokenizer.decode`).
"""

from __future__ import annotations

import numpy as np
import torch

PROMPT_SECONDS = 20.0
WINDOW_SECONDS = 10.0
STRIDE_FRAMES = 85  # a window starts this many frames after the previous one, and keeps as many
LEFT_CONTEXT_FRAMES = 20  # decoded before the kept part of every window but the first
CROSSFADE_SECONDS = 0.1


def pad_or_cut(wave: torch.Tensor, seconds: float, rate: int) -> torch.Tensor:
    """A mono waveform cut, or padded with zeros at the end, to exactly `seconds`."""
    target = int(round(seconds * rate))
    wave = wave.reshape(-1)[:target]
    return torch.cat([wave, wave.new_zeros(target - wave.numel())])


def crossfade(segments: list[torch.Tensor], samples: int) -> torch.Tensor:
    """Join waveforms, blending each boundary linearly over `samples` (fewer when a segment is shorter)."""
    out = segments[0]
    for nxt in segments[1:]:
        n = min(samples, out.numel(), nxt.numel())
        if n <= 0:
            out = torch.cat([out, nxt])
            continue
        fade_in = torch.linspace(0.0, 1.0, n, dtype=out.dtype, device=out.device)
        fade_out = torch.linspace(1.0, 0.0, n, dtype=out.dtype, device=out.device)
        out = torch.cat([out[:-n], out[-n:] * fade_out + nxt[:n] * fade_in, nxt[n:]])
    return out


def kept_frames(start: int, length: int, total: int) -> tuple[int, int]:
    """The frames of a window (at `start`, `length` frames, of `total`) that go into the output, window-relative."""
    tail = STRIDE_FRAMES + LEFT_CONTEXT_FRAMES
    if start == 0:
        return 0, min(tail, length)
    if start + length >= total and total - start < tail:
        return min(LEFT_CONTEXT_FRAMES, length), length
    return min(LEFT_CONTEXT_FRAMES, length), min(tail, length)


@torch.inference_mode()
def decode_with_prompt(codec, codes: torch.Tensor, prompt_wave: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Decode generated codes `[frames, Q]` behind the 20 s prompt (see the module docstring); a float32 waveform.

    `prompt_wave` is the item's prompt audio at the codec's input rate (16 kHz).
    """
    device, rate_in, rate_out = codec.device, codec.input_sample_rate, codec.output_sample_rate
    prompt = pad_or_cut(torch.as_tensor(np.asarray(prompt_wave), dtype=torch.float32), PROMPT_SECONDS, rate_in)
    reference = codec.encode([prompt])[0].to(device)  # [250, Q]
    frames_per_second = rate_in / codec.encoder_downsample_rate
    window = int(round(WINDOW_SECONDS * frames_per_second))
    per_frame = int(round(rate_out / frames_per_second))
    fade = int(round(CROSSFADE_SECONDS * rate_out))
    skip = int(round(PROMPT_SECONDS * rate_out))
    codes = torch.as_tensor(codes).long().to(device)
    total, segments = codes.shape[0], []
    for start in range(0, total, STRIDE_FRAMES):
        chunk = codes[start : start + window]
        combined = torch.cat([reference, chunk])
        (wave,) = codec.detokenize(combined.T[:, None], torch.tensor([combined.shape[0]], device=device))
        wave = wave.float()[skip:]
        if wave.numel() == 0:
            continue
        first, last = kept_frames(start, chunk.shape[0], total)
        extend = 0 if start + chunk.shape[0] >= total else fade  # reaches into the next segment's fade-in
        segment = wave[first * per_frame : min(wave.numel(), last * per_frame + extend)]
        if segment.numel():
            segments.append(segment)
    if not segments:
        return torch.zeros(int(0.01 * rate_out), device=device)
    return crossfade(segments, fade)
