"""Score a fine-tuned checkpoint, and the base it came from, on held-out scripts (see conf/evaluate.yaml).

Usage: python evaluate.py checkpoint=runs/x/export [base=fnlp/MOSS-TTSD-v0.5] input=heldout.jsonl output_dir=eval/
       [asr_model=openai/whisper-large-v3] [speaker_model=microsoft/wavlm-base-plus-sv]

Each checkpoint synthesises the scripts through `infer.py`'s code (same seed, same settings) into
`output_dir/<tuned|base>/`; the audio is then scored (`moss.evaluation`) and `output_dir/eval.json` written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from infer import NO_AUDIO, check_arguments, infer, parse_items
from moss.audio import FRAME_RATE, SAMPLE_RATE, read_audio
from moss.cli import command, fail, run
from moss.evaluation import Dialogue, Transcriber, VoiceEmbedder, load_judges, score_dialogues
from moss.evaluation.report_page import render_report
from moss.evaluation.scoring import METRICS, comparison
from moss.generation import generation_for
from moss.model.checkpoint import HUB_ID
from moss.model.folder import read_generation_config
from moss.outputs import OutputFolder

log = logging.getLogger("evaluate")
REPORT = "eval.json"
PAGE = "eval_report.html"


def evaluate(cfg: DictConfig) -> dict:
    """Synthesise and score `cfg.input` with `cfg.checkpoint` (and `cfg.base`); returns what eval.json holds."""
    folder = _check(cfg)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    judges = _judges(cfg, device)
    if judges[0] is None or judges[1] is None:
        log.info(
            "metric models off (%s): set asr_model=openai/whisper-large-v3 for CER/WER and turn cuts, "
            "speaker_model=microsoft/wavlm-base-plus-sv for voice similarity and switch accuracy",
            ", ".join(n for n, j in zip(("asr_model", "speaker_model"), judges, strict=True) if j is None),
        )
    report = {
        "input": cfg.input,
        "text": cfg.text,
        "seed": cfg.seed,
        "asr_model": cfg.asr_model,
        "speaker_model": cfg.speaker_model,
        "checkpoints": {},
    }
    audio = {}
    for label, checkpoint in _checkpoints(cfg).items():
        run = _run_config(cfg, label, checkpoint)
        folder.claim(label)  # infer writes its output there
        results = infer(run)
        items = {item.index: item for item in parse_items(run)[0]}
        dialogues = [
            Dialogue(
                index=r.index,
                script=str(items[r.index].source.get("text", "")) if r.index in items else r.text,
                wave=_wave(r),
                voices=items[r.index].voices if r.index in items else {},
                expected_seconds=_expected(items[r.index].source) if r.index in items else None,
                error=r.error,
            )
            for r in results
        ]
        scores = score_dialogues(dialogues, SAMPLE_RATE, _limit_seconds(run), *judges)
        audio.update({(label, r.index): f"{label}/{Path(r.path).name}" for r in results if r.path})
        report["checkpoints"][label] = {"checkpoint": str(checkpoint), **scores}
    if "base" in report["checkpoints"]:
        report["comparison"] = comparison(report["checkpoints"])
    folder.put_text(REPORT, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    folder.put_text(PAGE, render_report(report, audio))
    print(_summary(report, Path(cfg.output_dir) / REPORT))
    return report


def _check(cfg: DictConfig) -> OutputFolder:
    """The command's problems, all at once: each checkpoint's inference settings, the judges, the folder."""
    problems = []
    folder = OutputFolder(cfg.output_dir, "evaluate", overwrite=cfg.overwrite)
    problems += folder.problems()
    for key in ("asr_model", "speaker_model"):
        name = cfg.get(key)
        if name is not None and not Path(str(name)).is_dir() and not HUB_ID.match(str(name)):
            problems.append(f"{key}={name} is neither a model folder nor a Hub id (e.g. openai/whisper-large-v3)")
    fail("invalid evaluation command", problems)
    for label, checkpoint in _checkpoints(cfg).items():
        check_arguments(_run_config(cfg, label, checkpoint))
    return folder.check()


def _checkpoints(cfg: DictConfig) -> dict[str, str]:
    return {"tuned": cfg.checkpoint, **({"base": cfg.base} if cfg.base else {})}


def _run_config(cfg: DictConfig, label: str, checkpoint: str) -> DictConfig:
    """The inference command of one checkpoint: its output in `output_dir/label`, every other setting shared."""
    run = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(run):
        run.checkpoint, run.output_dir = str(checkpoint), str(Path(cfg.output_dir) / label)
        if label == "base":
            run.base_model = None  # an adapter's base is the tuned checkpoint's affair
    return run


def _judges(cfg: DictConfig, device: str) -> tuple[Transcriber | None, VoiceEmbedder | None]:
    """The metric models, loaded once (before any synthesis: a wrong name fails in seconds, not after it)."""
    from moss.errors import ConfigError

    try:
        return load_judges(cfg.asr_model, cfg.speaker_model, device, cfg.asr_language, cfg.judge_batch_size)
    except (OSError, ValueError) as err:
        raise ConfigError(f"a metric model cannot be loaded ({type(err).__name__}: {err})") from None


def _wave(result) -> np.ndarray | None:
    """The audio of a result at 16 kHz: empty when the model ended at once (it said nothing), None on an error."""
    if result.path:
        return read_audio(result.path, SAMPLE_RATE)
    return np.zeros(0, np.float32) if result.error == NO_AUDIO else None


def _expected(source: dict) -> float | None:
    value = source.get("expected_seconds")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 else None


def _limit_seconds(run: DictConfig) -> float:
    """The longest audio generation may make: `max_seconds`, else the checkpoint's or the default limit."""
    if run.max_seconds:
        return float(run.max_seconds)
    folder = Path(run.checkpoint)
    saved = read_generation_config(folder) if folder.is_dir() else None
    return generation_for(saved).max_new_tokens / FRAME_RATE


def _summary(report: dict, path: Path) -> str:
    lines = [f"wrote {path}"]
    labels = list(report["checkpoints"])
    lines.append(f"{'metric':16}" + "".join(f"{label:>12}" for label in labels))
    for metric in METRICS:
        values = [report["checkpoints"][label]["aggregate"].get(metric) for label in labels]
        if any(v is not None for v in values):
            lines.append(f"{metric:16}" + "".join("           -" if v is None else f"{v:12.4f}" for v in values))
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@command
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    evaluate(cfg)


if __name__ == "__main__":
    run(main, Path(__file__).parent / "conf", "evaluate", free_text=("text", "system_prompt"))
