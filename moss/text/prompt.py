r"""The MOSS-TTSD prompt template: (text, codes, optional reference) -> un-delayed `[T, C]` grid and labels.

Channel-0 text of every sample (identical in inference and fine-tuning):

    <|begin_of_style|>{SYSTEM_PROMPT}<|end_of_style|>\\n<|begin_of_text|>{text}<|end_of_text|>\\n<|begin_of_speech|>
    [audio frames] <|end_of_speech|>

Text rows carry the token in channel 0 and `speech_pad` elsewhere, labels -100. Audio rows carry
codebook-0 + speech offset in channel 0 and codebooks 1..C-1 raw; labels equal the inputs (reference audio
included, as in the original). The end row is labelled on channel 0 only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from moss.model.loss import IGNORE_INDEX

SYSTEM_PROMPT = (
    "You are a speech synthesizer that generates natural, realistic, and human-like conversational audio from "
    "dialogue text."
)
SPEAKER_TOKENS = {"[S1]": "<speaker1>", "[S2]": "<speaker2>"}
CONTROL_TOKENS = (
    "<|begin_of_style|>",
    "<|end_of_style|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|begin_of_speech|>",
    "<|end_of_speech|>",
    "<speaker1>",
    "<speaker2>",
)


def map_speaker_tags(text: str) -> str:
    """`[S1]`/`[S2]` -> `<speaker1>`/`<speaker2>` (only these two are mapped, as in the original)."""
    for tag, token in SPEAKER_TOKENS.items():
        text = text.replace(tag, token)
    return text


class PromptBuilder:
    """Builds training grids; the constant template pieces are tokenised once.

    Args:
        tokenizer: a tokenizer with the MOSS control tokens (`encode` must add no special tokens).
        speech_offset: channel-0 id of codebook-0 code 0 (151665 real; `config.speech_token_range[0]`).
        channels: token channels (8).
        speech_pad: audio pad code of channels 1..C-1 (1024).
        normalize: optional text normaliser applied before speaker-tag mapping.
        system_prompt: the style prompt of the template (the original's `SYSTEM_PROMPT` by default).
    """

    def __init__(
        self,
        tokenizer,
        speech_offset: int,
        channels: int = 8,
        speech_pad: int = 1024,
        normalize: Callable[[str], str] | None = None,
        system_prompt: str = SYSTEM_PROMPT,
    ):
        unknown = [t for t in CONTROL_TOKENS if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
        if unknown:
            raise ValueError(f"tokenizer lacks the MOSS-TTSD control tokens {unknown}; use the checkpoint's tokenizer")
        self.tokenizer = tokenizer
        self.speech_offset = speech_offset
        self.channels = channels
        self.speech_pad = speech_pad
        self.normalize = normalize
        self.head_ids = self._encode(f"<|begin_of_style|>{system_prompt}<|end_of_style|>\n<|begin_of_text|>")
        self.mid_ids = self._encode("<|end_of_text|>\n<|begin_of_speech|>")
        self.end_id = tokenizer.convert_tokens_to_ids("<|end_of_speech|>")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def text_ids(self, text: str) -> list[int]:
        """Token ids of a dialogue transcript after optional normalisation and speaker-tag mapping."""
        if self.normalize is not None:
            text = self.normalize(text)
        return self._encode(map_speaker_tags(text))

    def __call__(
        self,
        text: str,
        codes: np.ndarray,
        ref_text: str | None = None,
        ref_codes: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Un-delayed grid and labels, both int64 `[T, C]`.

        Args:
            text: target transcript with `[S1]`/`[S2]` tags.
            codes: `[A, Q]` codec codes of the target audio (Q codebooks; truncated or padded to C).
            ref_text: transcript of the reference audio, prepended to `text` (voice cloning by continuation).
            ref_codes: `[R, Q]` codes of the reference audio, placed before `codes`.
        """
        if ref_codes is not None:
            codes = np.concatenate([np.asarray(ref_codes), np.asarray(codes)], axis=0)
        full_text = (ref_text or "") + text
        text_rows = self.head_ids + self.text_ids(full_text) + self.mid_ids
        audio = self._audio_rows(np.asarray(codes))
        n_text, n_audio = len(text_rows), audio.shape[0]
        grid = np.full((n_text + n_audio + 1, self.channels), self.speech_pad, dtype=np.int64)
        grid[:n_text, 0] = text_rows
        grid[n_text : n_text + n_audio] = audio
        grid[-1, 0] = self.end_id
        labels = np.full_like(grid, IGNORE_INDEX)
        labels[n_text : n_text + n_audio] = audio
        labels[-1, 0] = self.end_id
        return grid, labels

    def inference_grid(self, text: str, prompt_codes: np.ndarray | None = None) -> np.ndarray:
        """Un-delayed prompt for generation `[T, C]`.

        The template ends with `<|begin_of_speech|>`, followed by the prompt audio's codes if any (the model
        continues them). `text` already includes the prompt text.
        """
        text_rows = self.head_ids + self.text_ids(text) + self.mid_ids
        audio = self._audio_rows(np.asarray(prompt_codes)) if prompt_codes is not None else None
        grid = np.full(
            (len(text_rows) + (0 if audio is None else len(audio)), self.channels), self.speech_pad, dtype=np.int64
        )
        grid[: len(text_rows), 0] = text_rows
        if audio is not None:
            grid[len(text_rows) :] = audio
        return grid

    def _audio_rows(self, codes: np.ndarray) -> np.ndarray:
        if codes.ndim != 2:
            raise ValueError(f"expected codes [frames, codebooks], got shape {codes.shape}")
        rows = np.full((codes.shape[0], self.channels), self.speech_pad, dtype=np.int64)
        q = min(codes.shape[1], self.channels)
        rows[:, :q] = codes[:, :q]
        rows[:, 0] += self.speech_offset
        return rows
