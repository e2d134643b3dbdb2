"""Listening to a run: every N optimiser steps, synthesise a few scripts with the current weights.

Rank 0 generates each script (LoRA active, eval mode, no gradients), decodes it with the XY-Tokenizer,
writes `<output_dir>/step_<step>_<i>.wav`, logs `samples/duration_s_<i>`, and hands the audio to the
TensorBoard or wandb logger when there is one. Under FSDP (sharded weights) sampling is skipped with a
warning: every rank would have to join each forward pass.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import soundfile as sf
import torch

from moss.audio import FRAME_RATE
from moss.generation import sampling_config
from moss.inference import Synthesizer, parse_item
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
        texts: list[str],
        output_dir: str,
        every_n_steps: int = 1000,
        max_seconds: float = 30.0,
        sampling: dict | None = None,
        seed: int = 0,
        normalize: str | None = "v0.5",
    ):
        self.codec_paths = (codec_config, codec_checkpoint)
        self.texts, self.output_dir, self.every = list(texts), Path(output_dir), every_n_steps
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

    @torch.no_grad()
    def _sample(self, trainer, pl_module, step: int) -> None:
        from moss.codec import XYTokenizer

        if self._codec is None:
            self._codec = XYTokenizer.from_pretrained(*self.codec_paths, device=str(pl_module.device))
        model = unwrap(pl_module.model)
        was_training, attention = model.training, model.attn_implementation
        model.eval()
        if attention == "varlen_sdpa":
            model.set_attn_implementation("sdpa")  # generation needs a KV cache
        synth = Synthesizer(
            model,
            trainer.datamodule.tokenizer,
            self._codec,
            self.generation,
            normalizer(self.normalize),
            batch_size=len(self.texts),
        )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        rate = self._codec.output_sample_rate
        items = [parse_item({"text": t}, i) for i, t in enumerate(self.texts)]

        def write(item, wave):
            wave = wave.float().cpu()
            sf.write(self.output_dir / f"step_{step:07d}_{item.index}.wav", wave.numpy(), rate)
            if wave.numel():  # an early model may end at once: nothing to listen to
                self._publish(trainer, item.index, wave, rate, step)
            pl_module.log(f"samples/duration_s_{item.index}", wave.numel() / rate, batch_size=1)

        try:
            synth.synthesize(items, write)
        finally:
            model.set_attn_implementation(attention)
            model.train(was_training)

    @staticmethod
    def _publish(trainer, index: int, wave: torch.Tensor, rate: int, step: int) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_audio(f"samples/{index}", wave[None], step, sample_rate=rate)
            elif isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({f"samples/{index}": wandb.Audio(wave.numpy(), sample_rate=rate)}, step=step)
