"""The base-vs-tuned report written beside the export, when the run had a quality gate.

The base is the model the run started from (`model.net` built again: the checkpoint of `model.path`, or the
seeded random init of the tiny default); the tuned model is the export itself, loaded as a user would load it.
Both synthesise the gate's scripts with its seed and settings and are scored by its metric models:

    export/eval_report.json    scores per checkpoint (per item, per turn, aggregate), the comparison, the
                               gate's scores over training
    export/eval_report.html    the same as a page that opens from disk: tables, plots, audio side by side
    export/eval_audio/         <base|tuned>_<item>.wav, the audio the page plays
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import soundfile as sf
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from moss.audio import SAMPLE_RATE
from moss.evaluation.report_page import render_report
from moss.evaluation.scoring import comparison
from moss.model.checkpoint import load_model
from moss.outputs import OutputFolder
from moss.training.quality_gate import QualityGate

log = logging.getLogger(__name__)
REPORT, PAGE, AUDIO = "eval_report.json", "eval_report.html", "eval_audio"


def write_eval_report(gate: QualityGate, cfg: DictConfig, config, export_dir: Path, device: torch.device) -> Path:
    """Write the report files into `export_dir` (see the module docstring); returns the page's path."""
    tuned, tokenizer = load_model(export_dir, device=str(device))
    base = instantiate(cfg.model.net, attn_implementation="sdpa")(config=config).to(device)  # as inference loads
    with torch.no_grad():
        report, audio = gate.compare({"base": base, "tuned": tuned}, tokenizer, str(device))
    del base, tuned
    sources = {"base": str(cfg.model.get("path") or "the run's initial weights"), "tuned": str(export_dir)}
    for label, run in report["checkpoints"].items():
        run["checkpoint"] = sources[label]
    report["comparison"] = comparison(report["checkpoints"])
    report["history"] = gate.history()
    folder = OutputFolder(export_dir, "export", resumable=True)
    paths = {}
    for (label, index), wave in sorted(audio.items()):
        name = f"{AUDIO}/{label}_{index:04d}.wav"
        folder.put(name, lambda tmp, wave=wave: sf.write(tmp, wave, SAMPLE_RATE, format="WAV"))
        paths[label, index] = name
    folder.put_text(REPORT, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    page = folder.put_text(PAGE, render_report(report, paths, report["history"]))
    better = [m for m, v in report["comparison"].items() if v["verdict"] == "better"]
    worse = [m for m, v in report["comparison"].items() if v["verdict"] == "worse"]
    log.info("base vs tuned: better %s, worse %s (%s)", better or "-", worse or "-", page)
    return page
