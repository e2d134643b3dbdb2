"""A quality gate in the training loop: every N validations, synthesise a fixed small set of scripts and score it.

Rank 0 synthesises the scripts with the weights being trained (fixed seed, as `audio_samples` does), scores
them with `moss.evaluation` (ASR for CER/WER and the turn cuts, a speaker model for per-turn similarity and
speaker-switch accuracy) and every rank logs the same values:

    val/cer, val/wer, val/sim_s1, val/sim_s2, val/switch_acc, val/duration_ratio, val/hit_limit_rate

so any of them may be the monitor of `best.ckpt` (and so of `export.from=best`) or of early stopping, like
`val/loss`. A measure that cannot be taken at a validation (no turn long enough to embed yet) is logged at its
worst value (similarity -1, accuracy 0), so a monitor never finds it missing and never takes it for progress.
The scores of each gate run also go to `<output_dir>/step_<step>.json`, for the report at export.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import numpy as np

from moss.audio import FRAME_RATE, SAMPLE_RATE, resample
from moss.errors import ConfigError
from moss.evaluation import Dialogue, load_judges, score_dialogues
from moss.evaluation.scoring import METRICS
from moss.generation import sampling_config
from moss.inference import Synthesizer
from moss.outputs import atomic_write
from moss.text.normalize import normalizer
from moss.training.audio_samples import load_scripts, synthesize_in_training
from moss.training.sharding import is_sharded

log = logging.getLogger(__name__)

# What each gate metric is logged as when it could not be measured: the worst it can be.
WORST = {"sim_s1": -1.0, "sim_s2": -1.0, "switch_acc": 0.0}
GATE_METRICS = METRICS


class QualityGate(L.Callback):
    """Score `scripts` every `every_n_validations` validations (see the module docstring).

    Args:
        codec_config, codec_checkpoint: the XY-Tokenizer that turns generated codes into audio.
        scripts: a JSONL in the inference formats; per-speaker prompts give the voices turns are compared with.
        asr_model: local folder or Hub id of the ASR model (CER/WER, turn cuts); None: not measured.
        speaker_model: local folder or Hub id of the x-vector model (similarity, switch accuracy); None: not measured.
        asr_language: Whisper's language (None: detected).
        every_n_validations: run at every Nth validation (1: each; needed when a gate metric is a monitor).
        max_seconds: longest audio per script.
        sampling: per-channel sampling settings (default greedy: the same weights give the same audio).
        seed: sampling seed.
        normalize: text normalisation of the scripts (as at inference).
        output_dir: where each run's scores are written.
    """

    def __init__(
        self,
        codec_config: str,
        codec_checkpoint: str,
        scripts: str,
        asr_model: str | None = None,
        speaker_model: str | None = None,
        asr_language: str | None = None,
        every_n_validations: int = 1,
        max_seconds: float = 20.0,
        sampling: dict | None = None,
        seed: int = 0,
        normalize: str | None = "v0.5",
        output_dir: str = "quality",
    ):
        if not asr_model and not speaker_model:
            raise ConfigError(
                "callbacks.quality_gate needs asr_model (e.g. openai/whisper-large-v3) and/or speaker_model "
                "(e.g. microsoft/wavlm-base-plus-sv): without them it would measure only lengths"
            )
        if not isinstance(every_n_validations, int) or every_n_validations < 1:
            raise ConfigError(f"callbacks.quality_gate.every_n_validations must be >= 1, got {every_n_validations}")
        self.items = load_scripts([], scripts, "callbacks.quality_gate")  # read now: a bad line fails at the start
        self.codec_paths, self.names = (codec_config, codec_checkpoint), (asr_model, speaker_model, asr_language)
        self.every, self.max_seconds, self.normalize = every_n_validations, float(max_seconds), normalize
        self.generation = sampling_config(dict(sampling or {"do_sample": False}), int(max_seconds * FRAME_RATE), seed)
        self.output_dir = Path(output_dir)
        self.validations = 0
        self._codec = self._judges = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if is_sharded(pl_module.model):  # built by now (configure_model)
            raise ConfigError(
                "callbacks.quality_gate synthesises on rank 0 with the whole model, which FSDP shards; use "
                "strategy=ddp (LoRA fits on each GPU) or drop the gate (~callbacks.quality_gate)"
            )

    def state_dict(self) -> dict:
        """The validations counted so far: a resumed run keeps the every-N schedule of the uninterrupted one."""
        return {"validations": self.validations}

    def load_state_dict(self, state: dict) -> None:
        self.validations = int(state.get("validations", 0))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if (self.validations - 1) % self.every:
            return
        scores = self._score(trainer, pl_module) if trainer.is_global_zero else None
        scores = trainer.strategy.broadcast(scores, src=0)
        for name in GATE_METRICS:
            value = scores.get(name, WORST.get(name))
            if value is not None:
                pl_module.log(f"val/{name}", float(value), batch_size=1, sync_dist=False)

    def _score(self, trainer, pl_module) -> dict:
        self._load(str(pl_module.device))
        synthesize = synthesize_in_training(
            pl_module, trainer.datamodule.tokenizer, self._codec, self.generation, self.normalize
        )
        report, _ = self._measure(synthesize)
        step = trainer.global_step
        report = {"step": step, **report}
        path = self.output_dir / f"step_{step:07d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n"))
        log.info("quality gate at step %d: %s", step, _brief(report["aggregate"]))
        return {k: v for k, v in report["aggregate"].items() if k in GATE_METRICS and v is not None}

    def compare(
        self, models: dict[str, object], tokenizer, device: str
    ) -> tuple[dict, dict[tuple[str, int], np.ndarray]]:
        """Score each of `models` (label -> MossTTSD) on the gate's scripts with the same seed and settings.

        Returns the report (`eval.json`'s shape: `checkpoints[label]` with items and aggregate) and the audio
        (16 kHz) by (label, item index).
        """
        self._load(device)
        report, audio = {"seed": self.generation.seed, "checkpoints": {}}, {}
        for label, model in models.items():
            synth = Synthesizer(model, tokenizer, self._codec, self.generation, normalizer(self.normalize))
            scores, waves = self._measure(synth.synthesize)
            report["checkpoints"][label] = {"checkpoint": label, **scores}
            audio.update({(label, index): wave for index, wave in waves.items()})
        return report, audio

    def history(self) -> list[dict]:
        """The aggregate scores of every gate run of this run so far, by step."""
        runs = [json.loads(p.read_text()) for p in sorted(self.output_dir.glob("step_*.json"))]
        return [{"step": run["step"], "aggregate": run["aggregate"]} for run in runs]

    def _load(self, device: str) -> None:
        if self._codec is not None:
            return
        from moss.codec import XYTokenizer

        asr, speaker, language = self.names
        self._codec = XYTokenizer.from_pretrained(*self.codec_paths, device=device)
        self._judges = load_judges(asr, speaker, device, language)

    def _measure(self, synthesize) -> tuple[dict, dict[int, np.ndarray]]:
        """Synthesise the scripts through `synthesize(items, write)` and score them; also the audio (16 kHz)."""
        waves: dict[int, np.ndarray] = {}
        rate = self._codec.output_sample_rate

        def keep(item, wave):  # an early model may end a script at once: empty audio, scored as saying nothing
            waves[item.index] = resample(wave.float().cpu().numpy(), rate, SAMPLE_RATE)

        synthesize(self.items, keep)
        dialogues = [
            Dialogue(
                item.index,
                str(item.source.get("text", item.text)),
                waves.get(item.index),
                item.voices,
                item.source.get("expected_seconds"),
            )
            for item in self.items
        ]
        return score_dialogues(dialogues, SAMPLE_RATE, self.max_seconds, *self._judges), waves


def _brief(aggregate: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in aggregate.items() if k in GATE_METRICS and v is not None)


def gate_metric(monitor: str | None) -> bool:
    """Whether `monitor` names a metric only the quality gate logs."""
    return bool(monitor) and monitor.removeprefix("val/") in GATE_METRICS
