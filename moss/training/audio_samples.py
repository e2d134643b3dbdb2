"""Listening to a run: every N optimiser steps, synthesise a few scripts with the current weights.

Scripts are plain texts, or a JSONL in the inference formats: text only, per-speaker prompts or a shared
prompt, so the run shows how the voices it is learning clone (the prompt audio is continued, as at
inference). A line may add `expected_seconds`: the length the audio should have.

Rank 0 generates each script (LoRA active, eval mode, no gradients), decodes it with the XY-Tokenizer,
writes `<output_dir>/step_<step>_<i>.wav`, logs `samples/duration_s_<i>`, `samples/duration_ratio_<i>`
(generated / expected, when given) and `samples/hit_limit_<i>` (1 when generation ran to `max_seconds`
without ending: a model that has not learnt to stop), and hands the audio to the TensorBoard or wandb logger
when there is one. Under FSDP (sharded weights) sampling is skipped with a warning: every rank would have to
join each forward pass.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import soundfile as sf
import torch

from moss.audio import FRAME_RATE
from moss.errors import ConfigError
from moss.generation import sampling_config
from moss.inference import Item, ItemError, Synthesizer, parse_item, read_items
from moss.model.lora import unwrap
from moss.text.normalize import normalizer
from moss.training.sharding import is_sharded

log = logging.getLogger(__name__)


class AudioSamples(L.Callback):
    """Generate `texts` every `every_n_steps` optimiser steps (see the module docstring)."""

    def __init__(
        self,
        codec_config: str,
        codec_checkpoint: str,
        texts: list[str] | None = None,
        output_dir: str = "samples",
        scripts: str | None = None,
        every_n_steps: int = 1000,
        max_seconds: float = 30.0,
        sampling: dict | None = None,
        seed: int = 0,
        normalize: str | None = "v0.5",
    ):
        self.codec_paths = (codec_config, codec_checkpoint)
        self.output_dir, self.every, self.max_seconds = Path(output_dir), every_n_steps, max_seconds
        self.items = load_scripts(list(texts or []), scripts)  # read now: a bad script fails the run at its start
        self.generation = sampling_config(dict(sampling or {"do_sample": False}), int(max_seconds * FRAME_RATE), seed)
        self.normalize = normalize
        self._codec = None
        self._done_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every or step == self._done_step:
            return
        self._done_step = step
        if is_sharded(pl_module.model):
            log.warning("audio samples are skipped under FSDP (sharded weights)")
            return
        if not trainer.is_global_zero:
            return
        self._sample(trainer, pl_module, step)

    def _sample(self, trainer, pl_module, step: int) -> None:
        from moss.codec import XYTokenizer

        if self._codec is None:
            self._codec = XYTokenizer.from_pretrained(*self.codec_paths, device=str(pl_module.device))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        rate = self._codec.output_sample_rate

        def write(item, wave):
            wave = wave.float().cpu()
            sf.write(self.output_dir / f"step_{step:07d}_{item.index}.wav", wave.numpy(), rate)
            if wave.numel():  # an early model may end at once: nothing to listen to
                self._publish(trainer, item.index, wave, rate, step)
            for key, value in self._measures(item, wave.numel() / rate).items():
                pl_module.log(f"samples/{key}_{item.index}", torch.tensor(value), batch_size=1)

        synthesize_in_training(pl_module, trainer.datamodule.tokenizer, self._codec, self.generation, self.normalize)(
            self.items, write
        )

    def _measures(self, item: Item, seconds: float) -> dict[str, float]:
        measures = {"duration_s": seconds, "hit_limit": float(seconds >= 0.99 * self.max_seconds)}
        expected = item.source.get("expected_seconds")
        if expected:
            measures["duration_ratio"] = seconds / float(expected)
        return measures

    @staticmethod
    def _publish(trainer, index: int, wave: torch.Tensor, rate: int, step: int) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_audio(f"samples/{index}", wave[None], step, sample_rate=rate)
            elif isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({f"samples/{index}": wandb.Audio(wave.numpy(), sample_rate=rate)}, step=step)


def synthesize_in_training(pl_module, tokenizer, codec, generation, normalize: str | None):
    """A function `(items, write)` that synthesises with the weights being trained, then restores training mode.

    LoRA stays active; generation runs in eval mode without gradients, through the static engine (no CUDA
    graphs inside training: their memory pool would stay) and eagerly (layers compiled for training are not
    recompiled per step); the decoding cache is dropped afterwards.
    """

    @torch.no_grad()
    def run(items: list[Item], write) -> list:
        model = unwrap(pl_module.model)
        was_training = model.training
        model.eval()  # the static engine attends through its own cache, whatever attention training uses
        synth = Synthesizer(
            model, tokenizer, codec, generation, normalizer(normalize), batch_size=len(items), engine="static"
        )
        try:
            with torch.compiler.set_stance("force_eager"):
                return synth.synthesize(items, write)
        finally:
            model.__dict__.pop("_static_decoder", None)  # the decoding cache is not kept through training
            model.train(was_training)

    return run


def load_scripts(texts: list[str], scripts: str | None, setting: str = "callbacks.audio_samples") -> list[Item]:
    """Text-only `texts`, then the items of the JSONL `scripts` (prompt audio paths relative to its folder).

    Raises:
        ConfigError: a script that cannot be synthesised, named by its line, or no script at all.
    """
    items = [parse_item({"text": t}, i) for i, t in enumerate(texts)]
    if scripts:
        base = str(Path(scripts).resolve().parent)
        for line, data in enumerate(read_items(scripts), start=1):
            try:
                if isinstance(data, Exception):
                    raise data
                expected = data.get("expected_seconds")
                if expected is not None and not (isinstance(expected, int | float) and expected > 0):
                    raise ItemError(f"expected_seconds must be a positive number, got {expected!r}")
                items.append(parse_item(data, len(items), base_path=base))
            except ItemError as err:
                raise ConfigError(f"{setting}.scripts={scripts}, line {line}: {err}") from None
    if not items:
        raise ConfigError(f"{setting} needs texts or scripts (a JSONL in the inference formats)")
    return items
