"""Delay-aware generation of MOSS-TTSD, with the original `_sample` mechanics, and streaming decode.

Input: the delayed, left-padded prompt `[B, T0 + 7, C]` and its mask. Generation starts after the first T0
rows (the 7-row delay tail is dropped and replayed as teacher forcing), one row of C channels per step:

* steps 0..6: channels > k are teacher-forced from the prompt tail; channel 0 may not emit end-of-speech;
* channel i >= 1 may not sample the audio pad once k >= i;
* the first channel-0 token outside the speech range starts a countdown of 7: the row is kept, the next 6
  rows drain the delay (channel 0 = end-of-speech, channel i = pad once the countdown < C - i), then the
  sequence is finished and padded with (end, pad, ...);
* sampling per channel: repetition penalty (over that channel's history), temperature, top-k, top-p, or
  greedy; a seeded generator makes sampling reproducible.

`frames_of` turns the output into frame-aligned codes (un-delay, subtract the speech offset, keep frames up to
the last one whose channel 1 is not the pad, as the original trims); `moss.streaming` decodes audio while
rows arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from moss.model.delay import last_valid_frame, revert_delay_pattern
from moss.model.static_kv import DEFAULT_BUCKET, DecodeGraphs, StaticKV
from moss.model.static_kv import NAME as STATIC_KV
from moss.sampling import ChannelSampler, ChannelSampling

__all__ = ["ChannelSampling", "GenerationConfig", "frames_of", "generate", "generation_for", "sampling_config"]

# SDPA backends for decoding. Not cuDNN's: it builds an execution plan for every new shape, and the KV cache
# grows by one row per step (32 ms per call for a tiny model on an H100, measured).
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# Sampling when neither the checkpoint nor the user says: the values of OpenMOSS' own v0.5 client.
DEFAULT_SAMPLING = {"do_sample": True, "temperature": 0.9, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.0}
DEFAULT_MAX_NEW_TOKENS = 12000  # 960 s at 12.5 frames/s, the v0.5 length limit


@dataclass
class GenerationConfig:
    """Per-channel sampling and length.

    `max_new_tokens` counts from the end of the full (delayed) prompt, as the original `generate` does, so up
    to `max_new_tokens + 7` rows are generated.
    """

    channels: list[ChannelSampling] = field(default_factory=lambda: [ChannelSampling() for _ in range(8)])
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int | None = None

    def to_dict(self, model_config=None) -> dict:
        """The original's `generation_config.json` form: `do_samples` and one `layers` dict per channel.

        The original `_sample` reads `do_samples[i]` and builds channel i's processors from `layers[i]`
        (repetition penalty, temperature, top-k, top-p); the token ids come from the model's config.
        """
        keys = ("repetition_penalty", "temperature", "top_k", "top_p")
        data = {
            "do_sample": any(c.do_sample for c in self.channels),
            "do_samples": [bool(c.do_sample) for c in self.channels],
            "layers": [{k: getattr(c, k) for k in keys if getattr(c, k) is not None} for c in self.channels],
            "max_new_tokens": int(self.max_new_tokens),
        }
        backbone = getattr(model_config, "backbone", {}) or {}
        data.update({k: backbone[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in backbone})
        return data

    @classmethod
    def from_dict(cls, data: dict, channels: int = 8) -> GenerationConfig:
        """From the original `generation_config.json` (`do_samples` + `layers`) or global sampling keys."""
        max_new = int(data.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        if data.get("do_samples") is not None:
            layers = data.get("layers") or [{}] * channels
            per = [
                ChannelSampling(bool(d), **{k: v for k, v in layer.items() if k in ChannelSampling.__annotations__})
                for d, layer in zip(data["do_samples"], layers, strict=True)
            ]
            return cls(per, max_new, data.get("seed"))
        shared = ChannelSampling(
            bool(data.get("do_sample", False)),
            data.get("temperature"),
            data.get("top_k"),
            data.get("top_p"),
            data.get("repetition_penalty"),
        )
        return cls([shared] * channels, max_new, data.get("seed"))


@dataclass
class GenerationOutput:
    """What `generate` returns.

    `sequences` `[B, T0 + steps, C]`: the prompt without its 7-row tail, then the generated rows;
    `prompt_rows` = T0; `logits`: per step, the C last-position logits after the pad/end masks (when requested).
    """

    sequences: torch.Tensor
    prompt_rows: int
    logits: list[tuple[torch.Tensor, ...]] | None = None


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions of left-padded rows: 0 at each sample's first real row (pads get 1, as transformers does)."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)


ENGINES = ("dynamic", "static", "graph", "compiled")


@torch.inference_mode()
@sdpa_kernel(DECODE_BACKENDS)
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    *,
    use_cache: bool = True,
    output_logits: bool = False,
    on_row: Callable[[torch.Tensor], None] | None = None,
    engine: str = "dynamic",
    check_every: int = 1,
    bucket: int = DEFAULT_BUCKET,
) -> GenerationOutput:
    """Generate after a delayed, left-padded prompt `[B, T0 + C - 1, C]` (see the module docstring).

    Args:
        model: a `MossTTSD` (merged weights: a live LoRA model decodes many times slower).
        input_ids: the delayed, left-padded prompt.
        attention_mask: its mask (0 = left pad).
        config: sampling and length.
        use_cache: False recomputes the whole sequence every step (the reference the cached paths are tested
            against; `engine` is then unused).
        output_logits: also return every step's logits.
        on_row: receives every generated row `[B, C]` (streaming; the end is then checked every step).
        engine: `dynamic` (transformers' growing cache), `static` (`moss.model.static_kv`: buffers allocated
            once, attention over the filled bucket), `graph` (static, each step replayed as a CUDA graph) or
            `compiled` (graph, of a `torch.compile`d step). The first three give the same rows; compiled
            kernels round differently.
        check_every: read whether every sequence has ended once per this many steps (each read waits for the
            GPU); rows made after the end are dropped, so the output does not depend on it.
        bucket: rows per attention bucket of the static engines.
    """
    if engine not in ENGINES:
        raise ValueError(f"generation engine {engine!r} is not one of {ENGINES}")
    if engine in ("graph", "compiled") and input_ids.device.type != "cuda":
        raise ValueError(f"engine={engine!r} replays CUDA graphs: it needs the model on a CUDA device (use 'static')")
    tail = input_ids.shape[-1] - 1
    steps = config.max_new_tokens + tail
    rows = _Rows(input_ids, attention_mask, steps)
    rules = _DelayRules(model.config, input_ids[:, rows.prompt_rows :])
    sampler = ChannelSampler(config.channels, config.seed, input_ids.device)
    check_every = 1 if on_row is not None else max(1, int(check_every))
    all_logits = [] if output_logits else None
    running = torch.ones((), dtype=torch.bool, device=input_ids.device)
    made = torch.zeros((), dtype=torch.long, device=input_ids.device)  # rows made while a sequence was running
    with _decoder(model, rows, engine if use_cache else None, bucket) as forward:
        for step in range(steps):
            logits = rules.mask_logits([head[:, -1].float().clone() for head in forward(step)], step)
            if all_logits is not None:
                all_logits.append(tuple(x.clone() for x in logits))
            tokens = rules.enforce(sampler(rows.history(), logits), step)
            rows.append(tokens)
            if on_row is not None:
                on_row(tokens)
            made += running
            running &= rules.advance(tokens)
            if (step + 1) % check_every == 0 and not bool(running):  # a host read: whether to go on
                break
    made = int(made)
    length = rows.prompt_rows + made
    return GenerationOutput(rows.ids[:, :length], rows.prompt_rows, all_logits[:made] if all_logits else all_logits)


def _static_decoder(model, rows: _Rows, engine: str, bucket: int):
    """Cache, step inputs and step of the static engines; the last ones are kept on the model and reused.

    A call of the same batch size and capacity (bucket-rounded) reuses the buffers and the captured graphs: a
    service generating batch after batch captures each bucket once. Stale rows need no clearing: the cache
    attends only to columns marked valid, and every column is written before it is marked.
    """
    batch, capacity = rows.ids.shape[0], -(-rows.ids.shape[1] // bucket) * bucket
    key = (batch, capacity, bucket, engine, rows.ids.device, next(model.parameters()).dtype)
    kept = model.__dict__.get("_static_decoder")
    if kept is not None and kept[0] == key:
        kv, feed, positions, run = kept[1]
        kv.valid.zero_()
        return kv, feed, positions, run
    model.__dict__.pop("_static_decoder", None)  # free the previous buffers and graphs first
    kv = StaticKV.for_model(model, batch, capacity, bucket)
    feed, positions = rows.ids[:, :1].clone(), rows.last_position[:, None].clone()  # the decode step's inputs

    def one_row():
        return model(feed, position_ids=positions, static_kv=kv, output_logits=True, logits_to_keep=1).logits

    if engine == "compiled":  # inductor's kernels for the step (two compilations: a width, then any width)
        one_row = torch.compile(one_row, fullgraph=True)
    run = DecodeGraphs(kv, one_row) if engine in ("graph", "compiled") else one_row
    model.__dict__["_static_decoder"] = (key, (kv, feed, positions, run))
    return kv, feed, positions, run


@contextmanager
def _decoder(model, rows: _Rows, engine: str | None, bucket: int):
    """`forward(step) -> logits` of one generation step with the chosen cache (None: recompute everything)."""
    if engine in (None, "dynamic"):
        cache = model.new_cache() if engine else None

        def forward(step: int):
            feed, positions, mask = rows.inputs(whole=step == 0 or cache is None)
            kwargs = {"use_cache": cache is not None, "cache": cache, "output_logits": True, "logits_to_keep": 1}
            return model(feed, attention_mask=mask, position_ids=positions, **kwargs).logits

        yield forward
        return
    kv, feed, positions, run = _static_decoder(model, rows, engine, bucket)

    def forward(step: int):
        if step == 0:  # the prompt: eager, once
            prompt, prompt_positions, _ = rows.inputs(whole=True)
            kv.place(0, rows.prompt_rows, rows.mask[:, : rows.prompt_rows])
            return model(
                prompt, position_ids=prompt_positions, static_kv=kv, output_logits=True, logits_to_keep=1
            ).logits
        kv.place(rows.length - 1, 1)
        feed.copy_(rows.ids[:, rows.length - 1 : rows.length])
        positions.copy_(rows.last_position[:, None])
        return run()

    with model.attention(STATIC_KV):
        yield forward


class _Rows:
    """The sequences being generated: preallocated rows and mask, one row written in place per step."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_rows: int):
        batch, total, channels = input_ids.shape
        self.prompt_rows = self.length = total - (channels - 1)  # the delay tail is replayed, not fed
        self.ids = input_ids.new_empty((batch, self.prompt_rows + new_rows, channels))
        self.ids[:, : self.prompt_rows] = input_ids[:, : self.prompt_rows]
        self.mask = torch.zeros(self.ids.shape[:2], dtype=torch.long, device=input_ids.device)
        self.mask[:, : self.prompt_rows] = attention_mask[:, : self.prompt_rows]
        self.last_position = position_ids_from_mask(self.mask[:, : self.prompt_rows])[:, -1]
        # Without left padding the mask is all ones: passing none lets attention skip masking altogether.
        self.padded = not bool(self.mask[:, : self.prompt_rows].all())

    def inputs(self, whole: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(rows, positions, mask) to feed: every row so far, or only the newest (with a KV cache)."""
        mask = self.mask[:, : self.length] if self.padded else None
        if whole:
            return self.ids[:, : self.length], position_ids_from_mask(self.mask[:, : self.length]), mask
        return self.ids[:, self.length - 1 : self.length], self.last_position[:, None], mask

    def history(self) -> torch.Tensor:
        return self.ids[:, : self.length]

    def append(self, tokens: torch.Tensor) -> None:
        self.ids[:, self.length] = tokens
        self.mask[:, self.length] = 1
        self.length += 1
        self.last_position = self.last_position + 1


class _DelayRules:
    """What the delay pattern demands of each generated row, and when a sequence is finished."""

    def __init__(self, model_config, prompt_tail: torch.Tensor):
        self.eos, self.pad = model_config.speech_eos_token, model_config.speech_pad_token
        self.lo, self.hi = model_config.speech_token_range
        self.prompt_tail = prompt_tail  # `[B, C - 1, C]`: teacher-forced into the first C - 1 rows
        batch, self.tail, self.channels = prompt_tail.shape
        device = prompt_tail.device
        self.needs = torch.full((batch,), -1, dtype=torch.long, device=device)  # rows left of the drain
        self.unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        self.finished_row = torch.tensor([self.eos] + [self.pad] * self.tail, device=device)

    def mask_logits(self, logits: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        for c in range(1, min(step, self.channels - 1) + 1):
            logits[c][:, self.pad] = -torch.inf  # channel c may not pad once its delay has passed
        if step < self.tail:
            logits[0][:, self.eos] = -torch.inf  # no end of speech inside the prompt's delay tail
        return logits

    def enforce(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """Teacher forcing of the tail, the drain after the first non-speech text token, finished rows."""
        is_speech = (tokens[:, 0] >= self.lo) & (tokens[:, 0] < self.hi)
        start = ~is_speech & (self.needs < 0)
        self.needs = torch.where(start, torch.full_like(self.needs, self.tail), self.needs)
        if step < self.tail:
            tokens[:, step + 1 :] = self.prompt_tail[:, step, step + 1 :]
        # Element-wise selections, not boolean indexing (which reads the device to count the rows).
        drain = ((self.needs > 0) & (self.needs < self.tail))[:, None]
        channel = torch.arange(self.channels, device=tokens.device)
        padded = drain & (channel > 0) & (self.needs[:, None] < self.channels - channel)
        tokens = torch.where(drain & (channel == 0), self.eos, torch.where(padded, self.pad, tokens))
        return torch.where(self.unfinished[:, None], tokens, self.finished_row)

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Count the drain down after a row; whether any sequence is unfinished (a device bool: no read)."""
        self.needs = torch.where(self.needs > 0, self.needs - 1, self.needs)
        stop = (tokens[:, 0] == self.eos) | (self.needs == 0)
        self.unfinished = (self.unfinished & ~stop) | (self.needs > 0)
        return self.unfinished.any()


def frames_of(output: GenerationOutput, speech_offset: int, speech_pad: int = 1024) -> list[torch.Tensor]:
    """Frame-aligned generated codes per sample, `[frames, C]`, trimmed after the last valid frame.

    Rows from T0 on are un-delayed; channel 0 loses the speech offset; frames are kept up to the last one
    whose channel 1 is not the pad (the end-of-speech frame and everything after it are dropped).
    """
    frames = revert_delay_pattern(output.sequences[:, output.prompt_rows :])
    out = []
    for sample, last in zip(frames, last_valid_frame(frames, speech_pad).tolist(), strict=True):
        codes = sample[: last + 1].clone()
        codes[:, 0] -= speech_offset
        out.append(codes)
    return out


def sampling_config(channels: Sequence[dict] | dict, max_new_tokens: int, seed: int | None) -> GenerationConfig:
    """A GenerationConfig from one sampling dict for every channel, or one per channel."""
    per = [channels] * 8 if isinstance(channels, dict) else list(channels)
    return GenerationConfig([ChannelSampling(**dict(c)) for c in per], max_new_tokens, seed)


def generation_for(
    saved: dict | None,
    sampling: Sequence[dict] | dict | None = None,
    max_new_tokens: int | None = None,
    seed: int | None = None,
) -> GenerationConfig:
    """What to generate with.

    `sampling` and `max_new_tokens` where given, else the checkpoint's `generation_config.json` (`saved`), else
    `DEFAULT_SAMPLING` and `DEFAULT_MAX_NEW_TOKENS`.
    """
    default = sampling_config(DEFAULT_SAMPLING, DEFAULT_MAX_NEW_TOKENS, None)
    base = GenerationConfig.from_dict(saved) if saved else default
    if sampling is not None:
        base = sampling_config(sampling, base.max_new_tokens, None)
    return GenerationConfig(base.channels, int(max_new_tokens or base.max_new_tokens), seed)
