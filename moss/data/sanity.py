"""Before training: would inference build the same prompt, and do the codes say what the transcripts say?

Two failures that a loss curve never shows (it falls either way):

* **a template mismatch**: the training grid of a sample is not the prompt `infer.py` builds for the same
  script and audio (a different text normalisation: `data.normalize` against the release inference uses,
  grids imported from the original preprocessing without `--use_normalize`, another system prompt). The
  model then learns a prompt it never sees at inference. Checked on the first `samples` training samples
  with only the tokenizer: on by default.
* **mislabelled data or the wrong codec**: the samples' target codes are decoded with the run's codec and
  transcribed by an ASR model; a CER over `max_cer` means the audio does not say its transcript. Checked when
  `sanity_check.asr_model` is set.

Either stops the run before it starts, with one message naming the samples; `sanity_check.samples=0` skips both.
"""

from __future__ import annotations

import logging
from itertools import islice

import numpy as np
import torch

from moss.audio import SAMPLE_RATE, resample
from moss.data.dataset import expand_shards
from moss.data.schema import SampleError, ShardSample
from moss.data.stages import tar_samples
from moss.errors import ConfigError
from moss.evaluation.metrics import errors
from moss.text import PromptBuilder
from moss.text.normalize import normalizer

log = logging.getLogger(__name__)


def sanity_check(
    train_shards: dict[str, object],
    builder_prompt: PromptBuilder,
    tokenizer,
    samples: int = 4,
    normalize: str | None = "v0.5",
    asr_model: str | None = None,
    asr_language: str | None = None,
    max_cer: float = 0.5,
    codec=None,
    device: str = "cpu",
) -> None:
    """Raise ConfigError when the first `samples` training samples fail either check (module docstring).

    `train_shards` maps the setting that names a training shard set to its spec (one per data source): the first
    samples of each are checked.
    """
    if samples <= 0:
        return
    first = [
        sample for name, spec in train_shards.items() for sample in first_samples(expand_shards(spec, name), samples)
    ]
    inference = PromptBuilder(
        tokenizer,
        speech_offset=builder_prompt.speech_offset,
        channels=builder_prompt.channels,
        speech_pad=builder_prompt.speech_pad,
        normalize=normalizer(normalize),
    )
    problems = [p for sample in first if (p := grid_problem(sample, builder_prompt, inference, normalize))]
    if asr_model and codec is not None:
        problems += transcript_problems(first, codec, asr_model, asr_language, max_cer, device)
    if problems:
        raise ConfigError(
            "the training data failed the check before training (sanity_check.samples=0 skips it):\n  - "
            + "\n  - ".join(problems)
        )
    log.info("sanity check passed on %d training samples%s", len(first), " (with ASR)" if asr_model else "")


def first_samples(urls: list[str], count: int) -> list[ShardSample]:
    """The first `count` readable samples of the shard set, in shard order (unreadable ones are the loader's)."""

    def parsed():
        for url in urls:
            for raw in tar_samples(url, handler=lambda err: True):
                try:
                    yield ShardSample.from_wds(raw).validate()
                except SampleError:
                    continue

    return list(islice(parsed(), count))


def grid_problem(sample: ShardSample, training: PromptBuilder, inference: PromptBuilder, normalize) -> str | None:
    """Where the sample's training grid leaves the prompt inference would build for its script, else None.

    The rows up to `<|begin_of_speech|>` are compared (style prompt, script, template); the audio rows are
    placed by the same code in both (or, for imported grids, were checked when they were imported).
    """
    if sample.grid is not None and not sample.text:
        return None  # an imported grid without its transcript: nothing to rebuild it from
    if sample.grid is not None:
        grid, text = np.asarray(sample.grid), sample.text
    else:
        grid, _ = training(sample.text, sample.codes, sample.ref_text, sample.ref_codes)
        text = (sample.ref_text or "") + sample.text
    expected = inference.inference_grid(text)
    rows = min(len(expected), len(grid))
    differ = np.flatnonzero((grid[:rows] != expected[:rows]).any(axis=1))
    if len(differ) == 0 and len(grid) >= len(expected):
        return None
    row = int(differ[0]) if len(differ) else rows
    where = "the style prompt" if row < len(inference.head_ids) else "the script's text or the template"
    return (
        f"{sample.key}: its training grid differs from the prompt inference builds from row {row} on ({where}); "
        f"inference normalises with sanity_check.normalize={normalize}: train with the same data.normalize "
        f"(or set sanity_check.normalize to the release you will decode with: infer.py release=v05 -> v0.5, "
        f"v07 -> v0.7)"
    )


def transcript_problems(
    samples: list[ShardSample], codec, asr_model: str, language: str | None, max_cer: float, device: str
) -> list[str]:
    """Samples whose decoded target audio an ASR model hears as something else than their transcript."""
    from moss.evaluation.speech_models import Transcriber

    usable = [s for s in samples if s.text and len(s.codes)]
    with torch.no_grad():
        waves = codec.decode([torch.as_tensor(s.codes, dtype=torch.long, device=codec.device) for s in usable])
    rate = codec.output_sample_rate
    clips = [resample(w.float().cpu().numpy(), rate, SAMPLE_RATE) for w in waves]
    heard = Transcriber(asr_model, device, language=language)(clips, SAMPLE_RATE)
    rates = [(s, errors(s.text, t.text).cer, t.text) for s, t in zip(usable, heard, strict=True)]
    bad = [(s, cer, text) for s, cer, text in rates if cer is not None and cer > max_cer]
    if len(bad) <= len(usable) // 2:  # one odd sample is the loader's business; most of them is the data's
        return []
    shown = "; ".join(f"{s.key}: CER {cer:.2f}, heard {text[:60]!r}" for s, cer, text in bad[:3])
    return [
        f"{len(bad)} of {len(usable)} samples do not say their transcript (CER over sanity_check.max_cer={max_cer}: "
        f"{shown}); check the transcripts, that the shards were made with this codec (codec=...), and the ASR "
        f"language (sanity_check.asr_language)"
    ]


def check_training_data(cfg, datamodule, tokenizer) -> None:
    """`sanity_check` of a training config (conf/train.yaml) on its training shards, before the fit."""
    settings = cfg.get("sanity_check") or {}
    if int(settings.get("samples") or 0) <= 0:
        return
    datamodule.prepare_data()  # the built-in corpus is generated on first use
    codec, device = None, "cpu"
    if settings.get("asr_model"):
        from moss.codec import load_codec

        accelerator = str(cfg.trainer.get("accelerator"))
        device = "cuda" if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu"
        codec = load_codec(cfg.codec, device=device)
    sanity_check(
        {
            "data.train_shards" if spec.name == "train" else f"data.sources.{spec.name}.shards": spec.shards
            for spec in datamodule.source_specs
        },
        datamodule.builder.prompt,
        tokenizer,
        samples=int(settings.samples),
        normalize=settings.get("normalize"),
        asr_model=settings.get("asr_model"),
        asr_language=settings.get("asr_language"),
        max_cer=float(settings.get("max_cer", 0.5)),
        codec=codec,
        device=device,
    )
