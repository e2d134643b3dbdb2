"""Audio while a sample generates: `StreamingDecoder` decodes the codec's windows as the rows arrive.

It decodes 30 s windows every 20 s (the codec's own windows for a whole sequence), so the concatenated
chunks equal decoding all frames at the end, and the first audio is ready after 30 s of speech are generated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class StreamingDecoder:
    """Decodes the audio of one generating sample in the codec's windows (30 s every 20 s) as rows arrive.

    `push(row)` takes each generated row `[C]` (delayed); `finish()` decodes the rest. `on_chunk(wave)` gets
    every finished piece of waveform; the concatenation equals decoding all frames at the end.
    """

    def __init__(
        self,
        codec,
        speech_offset: int,
        on_chunk: Callable[[torch.Tensor], None],
        channels: int = 8,
        speech_pad: int = 1024,
    ):
        self.codec, self.offset, self.on_chunk = codec, speech_offset, on_chunk
        self.channels, self.pad = channels, speech_pad
        self.rows: list[torch.Tensor] = []
        self.frames: list[torch.Tensor] = []
        self.decoded = 0
        self.window = codec.config.window_frames
        self.keep = 20 * codec.input_sample_rate // codec.encoder_downsample_rate
        self.ended = False

    def push(self, row: torch.Tensor) -> None:
        self.rows.append(row)
        index = len(self.rows) - self.channels  # frame completed by this row
        if index < 0 or self.ended:
            return
        frame = torch.stack([self.rows[index + c][c] for c in range(self.channels)])
        if frame[1] == self.pad or frame[0] < self.offset or frame[0] >= self.offset + 1024:
            self.ended = True  # the end-of-speech frame: nothing after it is audio
            return
        frame = frame.clone()
        frame[0] -= self.offset
        self.frames.append(frame)
        while len(self.frames) >= self.decoded + self.window:
            self._decode(self.decoded + self.window, final=False)

    def _decode(self, end: int, final: bool) -> None:
        """Decode the window starting at `self.decoded`, keep its first 20 s (all of it when it is the last)."""
        codes = torch.stack(self.frames[self.decoded : end])
        (wave,) = self.codec.decode([codes])
        kept = len(codes) if final and len(codes) <= self.keep else self.keep
        self.on_chunk(wave[: kept * self.codec.decoder_upsample_rate])
        self.decoded += kept

    def finish(self) -> None:
        """Decode what is left with the same windows `codec.decode` uses for the whole sequence."""
        while len(self.frames) > self.decoded:
            self._decode(min(self.decoded + self.window, len(self.frames)), final=True)
