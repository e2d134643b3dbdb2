"""Dialogue scripts -> audio: input formats, prompt batches, generation, decoding, model loading.

Input items (the original inference JSONL formats):

* text only: `{"text"}`;
* per-speaker prompts: `{"text", "prompt_audio_speaker1", "prompt_text_speaker1", "prompt_audio_speaker2",
  "prompt_text_speaker2", "base_path"?}` -> the two clips are joined (speaker 1 first) and the prompt text is
  `[S1]t1[S2]t2`;
* shared prompt: `{"text", "prompt_audio", "prompt_text", "base_path"?}` (prompt text already tagged).

Voice cloning is continuation: prompt text + text are normalised together, the prompt audio's codes follow
`<|begin_of_speech|>`, and the model continues. An item that cannot be prepared (missing audio, unknown
speaker tag, empty text) is reported with its reason; the rest of the batch still runs.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moss.audio import FRAME_RATE, SAMPLE_RATE, AudioLimits, read_audio
from moss.codec.prompt_decode import decode_with_prompt
from moss.errors import ConfigError
from moss.generation import ENGINES, GenerationConfig, frames_of, generate
from moss.model.delay import apply_delay_pattern
from moss.streaming import StreamingDecoder
from moss.text.prompt import PromptBuilder

KNOWN_TAGS = re.compile(r"\[S(\d+)\]")
MIN_PROMPT_SAMPLES = 1280  # one codec frame at 16 kHz: a shorter prompt encodes to nothing
MAX_PROMPT_SECONDS = 120.0  # per clip, from its header: a prompt is a voice sample (the originals use <= 20 s)


# How generated codes become audio: the codec's 30 s windows (v0.5), or windows behind the prompt (v0.7).
DECODERS = ("windows", "prompt_augmented")


class ItemError(ValueError):
    """An input item that cannot be synthesised; the message says why."""


@dataclass
class Item:
    """One script to synthesise, resolved: full text (prompt text + text) and the prompt audio (16 kHz)."""

    index: int
    text: str
    prompt_audio: np.ndarray | None = None
    source: dict = field(default_factory=dict)
    voices: dict[int, np.ndarray] = field(default_factory=dict)  # per-speaker prompts: speaker -> clip (evaluation)


def _string(data: dict, key: str, required: bool = False) -> str | None:
    """`data[key]` as a string that UTF-8 can hold, or None when absent/empty and not required."""
    value = data.get(key)
    if value is None or (value == "" and not required):
        if required:
            raise ItemError(f"missing {key}")
        return None
    if not isinstance(value, str):
        raise ItemError(f"{key} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ItemError(f"{key} has a lone surrogate at character {err.start + 1}") from None
    return value


def _prompt_wave(clip: str, base: str | None, max_seconds: float = MAX_PROMPT_SECONDS) -> np.ndarray:
    path = Path(clip) if base is None or Path(clip).is_absolute() else Path(base) / clip
    try:
        if not path.is_file():
            raise ItemError(f"prompt audio {path} not found (or not a regular file)")
        wave = read_audio(path, limits=AudioLimits(max_seconds=max_seconds))  # the length checked from the header
    except ItemError:
        raise
    except (ValueError, RuntimeError, OSError) as err:  # AudioError, soundfile's errors, odd paths
        raise ItemError(f"prompt audio {path} unreadable ({type(err).__name__}: {err})") from None
    if not np.isfinite(wave).all():
        raise ItemError(f"prompt audio {path} contains NaN or infinite samples")
    if len(wave) < MIN_PROMPT_SAMPLES:
        raise ItemError(
            f"prompt audio {path} too short ({len(wave) / SAMPLE_RATE:.3f} s; at least one codec frame, "
            f"{MIN_PROMPT_SAMPLES / SAMPLE_RATE:.2f} s)"
        )
    return wave


def parse_item(
    data: dict,
    index: int,
    base_path: str | None = None,
    silence_seconds: float = 0.0,
    max_prompt_seconds: float = MAX_PROMPT_SECONDS,
) -> Item:
    """Resolve one input dict of any of the three formats; each prompt clip may last `max_prompt_seconds`.

    Raises:
        ItemError: empty text, wrong field types, unknown speaker tags, missing/unreadable/unusable prompt
            audio, half a speaker pair.
    """
    if not isinstance(data, dict):
        raise ItemError(f"an item must be a JSON object, got {type(data).__name__}")
    text = _string(data, "text", required=True)
    if not text.strip():
        raise ItemError("empty text")
    base = _string(data, "base_path") or base_path
    shared, shared_text = _string(data, "prompt_audio"), _string(data, "prompt_text")
    speakers = [_string(data, f"prompt_audio_speaker{n}") for n in (1, 2)]
    if shared and "prompt_text" in data:
        prompt_text, clips = shared_text or "", [shared]
    elif any(speakers):
        if not all(speakers):
            raise ItemError("per-speaker prompts need both prompt_audio_speaker1 and prompt_audio_speaker2")
        clips = speakers
        t1, t2 = (_string(data, f"prompt_text_speaker{n}") or "" for n in (1, 2))
        prompt_text = ((f"[S1]{t1}" if t1 else "") + (f"[S2]{t2}" if t2 else "")).strip()
    else:
        prompt_text, clips = "", []
    full = prompt_text + text
    unknown = sorted({f"[S{n}]" for n in KNOWN_TAGS.findall(full) if n not in ("1", "2")})
    if unknown:
        raise ItemError(f"unknown speaker tags {unknown}: MOSS-TTSD speaks [S1] and [S2]")
    audio, waves = None, [_prompt_wave(clip, base, max_prompt_seconds) for clip in clips]
    if waves:
        audio = np.concatenate(waves)
        if silence_seconds > 0:
            audio = np.concatenate([audio, np.zeros(int(silence_seconds * SAMPLE_RATE), np.float32)])
    voices = dict(zip((1, 2), waves, strict=True)) if len(waves) == 2 else {}
    return Item(index, full, audio, data, voices)


def batch_prompts(grids: list[np.ndarray], text_pad_id: int, speech_pad: int = 1024):
    """Delay each prompt, then left-pad to one batch: `input_ids` `[B, T + C - 1, C]`, `attention_mask` `[B, ...]`."""
    delayed = [apply_delay_pattern(torch.from_numpy(g), text_pad_id, speech_pad) for g in grids]
    length, channels = max(d.shape[0] for d in delayed), delayed[0].shape[1]
    ids = torch.full((len(grids), length, channels), speech_pad, dtype=torch.long)
    ids[..., 0] = text_pad_id
    mask = torch.zeros(len(grids), length, dtype=torch.long)
    for b, d in enumerate(delayed):
        ids[b, length - d.shape[0] :] = d
        mask[b, length - d.shape[0] :] = 1
    return ids, mask


@dataclass
class Result:
    """What happened to one item: its audio file and duration, or the error."""

    index: int
    text: str
    normalized_text: str | None = None
    path: str | None = None
    duration_s: float | None = None
    error: str | None = None
    first_audio_s: float | None = None


class Synthesizer:
    """Batched (or streaming) synthesis with a MossTTSD, its tokenizer and the XY-Tokenizer codec."""

    def __init__(
        self,
        model,
        tokenizer,
        codec,
        generation: GenerationConfig,
        normalize=None,
        system_prompt: str | None = None,
        batch_size: int = 4,
        decode: str = "windows",
        engine: str = "auto",
        check_every: int = 16,
    ):
        if decode not in DECODERS:
            raise ConfigError(f"decode={decode} is unknown; use one of {DECODERS}")
        if engine not in ("auto", *ENGINES):
            raise ConfigError(f"engine={engine} is unknown; use auto or one of {ENGINES}")
        self.model, self.codec, self.generation, self.batch_size = model.eval(), codec, generation, batch_size
        self.decode = decode
        kwargs = {} if system_prompt is None else {"system_prompt": system_prompt}
        cfg = model.config
        self.prompt = PromptBuilder(
            tokenizer,
            speech_offset=cfg.speech_offset,
            channels=cfg.channels,
            speech_pad=cfg.speech_pad_token,
            normalize=normalize,
            **kwargs,
        )
        self.text_pad_id = tokenizer.pad_token_id
        self.device = next(model.parameters()).device
        # auto: CUDA graphs on a GPU (launch-bound at small batches), the plain growing cache elsewhere.
        self.engine = ("graph" if self.device.type == "cuda" else "dynamic") if engine == "auto" else engine
        self.decoding = {"engine": self.engine, "check_every": check_every}

    def prompt_rows(self, item: Item) -> int:
        """Rows of the item's prompt (template, text tokens, prompt audio frames), without encoding its audio."""
        frames = 0 if item.prompt_audio is None else int(np.ceil(len(item.prompt_audio) / SAMPLE_RATE * FRAME_RATE))
        return len(self.prompt.head_ids) + len(self.prompt.text_ids(item.text)) + len(self.prompt.mid_ids) + frames

    def too_long(self, item: Item, max_rows: int) -> str | None:
        """Why `item` cannot be generated within `max_rows` rows in all (None: it fits).

        Checked before anything is allocated for it: the prompt plus the rows generation may add
        (`max_new_tokens` + the delay tail) must fit, or a long script would ask for a cache of that size.
        """
        prompt = self.prompt_rows(item)
        new = self.generation.max_new_tokens + self.model.config.channels - 1
        if prompt + new > max_rows:
            return (
                f"prompt of {prompt} rows (script tokens and prompt audio) plus up to {new} generated rows "
                f"(max_seconds) exceeds the model's {max_rows} rows; shorten the script or prompt, or lower "
                f"max_seconds"
            )
        return None

    def grids(self, items: list[Item]) -> list[np.ndarray]:
        """Prompt grids; the prompt audios of the batch are encoded in one codec call."""
        with_audio = [it for it in items if it.prompt_audio is not None]
        codes = dict(
            zip(
                [id(it) for it in with_audio],
                self.codec.encode([it.prompt_audio for it in with_audio]) if with_audio else [],
                strict=True,
            )
        )
        return [
            self.prompt.inference_grid(it.text, None if id(it) not in codes else codes[id(it)].cpu().numpy())
            for it in items
        ]

    def synthesize(self, items: list[Item], write: Callable[[Item, torch.Tensor], Result]) -> list[Result]:
        """Generate and decode `items` in batches; `write(item, waveform)` stores one output."""
        results = []
        for start in range(0, len(items), self.batch_size):
            group = items[start : start + self.batch_size]
            ids, mask = batch_prompts(self.grids(group), self.text_pad_id, self.model.config.speech_pad_token)
            out = generate(self.model, ids.to(self.device), mask.to(self.device), self.generation, **self.decoding)
            codes = frames_of(out, self.model.config.speech_offset, self.model.config.speech_pad_token)
            results += [write(item, wave) for item, wave in zip(group, self._decode(group, codes), strict=True)]
        return results

    def _decode(self, items: list[Item], codes: list[torch.Tensor]) -> list[torch.Tensor]:
        """Waveforms of generated codes: 30 s windows (v0.5), or behind each item's prompt (v0.7)."""
        if self.decode == "windows":
            return self.codec.decode([c.to(self.codec.device) for c in codes])
        return [
            self.codec.decode([c.to(self.codec.device)])[0]
            if item.prompt_audio is None
            else decode_with_prompt(self.codec, c, item.prompt_audio)
            for item, c in zip(items, codes, strict=True)
        ]

    def stream(self, item: Item, on_chunk: Callable[[torch.Tensor], None]) -> float | None:
        """Generate one item, handing decoded audio chunks to `on_chunk` as soon as each window is ready.

        Returns the time to the first audio chunk (seconds), or None when no audio was produced.
        """
        ids, mask = batch_prompts(self.grids([item]), self.text_pad_id, self.model.config.speech_pad_token)
        start, first = time.perf_counter(), []

        def chunk(wave):
            if not first:
                first.append(time.perf_counter() - start)
            on_chunk(wave)

        decoder = StreamingDecoder(
            self.codec,
            self.model.config.speech_offset,
            chunk,
            self.model.config.channels,
            self.model.config.speech_pad_token,
        )
        generate(
            self.model,
            ids.to(self.device),
            mask.to(self.device),
            self.generation,
            on_row=lambda row: decoder.push(row[0].cpu()),
            engine=self.engine,
        )
        decoder.finish()
        return first[0] if first else None


def read_items(path: str | Path, max_line_bytes: int = 1 << 20) -> list[dict | Exception]:
    """The JSON objects of an input JSONL, one per line feed (a U+2028 inside a string is not a line break).

    A line that is not valid UTF-8, not JSON, not an object or too long becomes its error (reported, not raised).
    """
    out: list[dict | Exception] = []
    for number, line in enumerate(Path(path).read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            if len(line) > max_line_bytes:
                raise ItemError(f"line {number}: longer than {max_line_bytes} bytes")
            try:
                data = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise ItemError(f"line {number}: invalid UTF-8 at byte {err.start + 1}") from None
            except (ValueError, RecursionError) as err:
                raise ItemError(f"line {number}: invalid JSON ({str(err)[:200]})") from None
            out.append(data if isinstance(data, dict) else ItemError(f"line {number}: not a JSON object"))
        except ItemError as err:
            out.append(err)
    return out
