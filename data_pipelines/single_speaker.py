r"""Fine-tuning data from one-speaker recordings: voice-cloning pairs, or spliced two-speaker dialogues.

    python -m data_pipelines.single_speaker mode=pairs input=monologues.jsonl output_dir=pairs/
    python -m data_pipelines.single_speaker mode=dialogues input=monologues.jsonl output_dir=dialogues/

The input has one utterance per line: `{"file_path" (or "audio"), "full_transcript" (or "text"), "speaker"}`;
relative audio paths resolve against `base_path`, else the JSONL's folder. A transcript's own `[S1]`/`[S2]`
tags are dropped (one speaker speaks).

* `mode=pairs` writes `pairs.jsonl` in the original fine-tuning format 2: each utterance is a target, with
  a reference drawn from the *other* utterances of the same speaker whose duration lies in
  `pairs.reference_seconds` (`{"reference_audio", "reference_text", "audio", "text"}`, texts tagged `[S1]`):
  the model learns to continue a voice it was prompted with.
* `mode=dialogues` writes `dialogues.jsonl` (format 1: `file_path`, `full_transcript`) and `audio/*.wav`:
  two different speakers alternate, `[S1]` the first, `[S2]` the second, each turn one of their
  utterances (16 kHz mono, `dialogues.gap_seconds` of silence between turns), `dialogues.turns` turns per
  dialogue, no utterance used twice.

Both are deterministic (the input order and `seed` fix every choice), never modify their input, and write
`report.json`: records made, hours of audio, and every input line left out with its reason (also printed).
Their output is what `data_pipelines.preprocess` (or `train.py raw.train=...`) reads.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import soundfile as sf
from omegaconf import DictConfig

from moss.audio import SAMPLE_RATE, read_audio
from moss.cli import command, fail, require, run
from moss.outputs import OutputFolder, atomic_write

TAGS = re.compile(r"\[S?\d+\]")


@dataclass(frozen=True)
class Utterance:
    """One usable input line: who speaks, what, where the audio is and how long it lasts."""

    line: int
    speaker: str
    text: str
    path: Path
    seconds: float


def read_utterances(path: str | Path, base_path: str | None = None) -> tuple[list[Utterance], list[dict]]:
    """The usable utterances of a monologue JSONL, and the lines left out (`{"line", "reason"}`)."""
    base = Path(base_path) if base_path else Path(path).resolve().parent
    utterances, skipped = [], []
    for number, raw in enumerate(Path(path).read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw.decode("utf-8"))
            if not isinstance(item, dict):
                raise ValueError("not a JSON object")
            audio, text = item.get("file_path", item.get("audio")), item.get("full_transcript", item.get("text"))
            speaker = item.get("speaker")
            if not isinstance(audio, str) or not isinstance(text, str) or not isinstance(speaker, str | int):
                raise ValueError("needs file_path (or audio), full_transcript (or text) and speaker")
            text = " ".join(TAGS.sub(" ", text).split())
            if not text:
                raise ValueError("empty transcript")
            clip = Path(audio) if os.path.isabs(audio) else base / audio
            seconds = sf.info(str(clip)).duration
            if not seconds > 0:
                raise ValueError(f"{clip}: no audio")
            utterances.append(Utterance(number, str(speaker), text, clip.resolve(), float(seconds)))
        except (ValueError, UnicodeDecodeError, RuntimeError, OSError) as err:  # bad JSON, fields, audio headers
            skipped.append({"line": number, "reason": f"{type(err).__name__}: {err}"[:300]})
    return utterances, skipped


def cloning_pairs(utterances: list[Utterance], window: tuple[float, float], seed: int) -> tuple[list[dict], list[dict]]:
    """Format-2 records: every utterance as a target behind a reference of the same speaker within `window` s."""
    rng = np.random.default_rng(seed)
    by_speaker: dict[str, list[Utterance]] = {}
    for u in utterances:
        by_speaker.setdefault(u.speaker, []).append(u)
    records, skipped = [], []
    for target in utterances:
        candidates = [u for u in by_speaker[target.speaker] if u is not target and window[0] <= u.seconds <= window[1]]
        if not candidates:
            skipped.append({"line": target.line, "reason": f"no other utterance of {target.speaker} lasts {window} s"})
            continue
        reference = candidates[int(rng.integers(len(candidates)))]
        records.append(
            {
                "reference_audio": str(reference.path),
                "reference_text": f"[S1]{reference.text}",
                "audio": str(target.path),
                "text": f"[S1]{target.text}",
                "speaker": target.speaker,
                "seconds": round(target.seconds, 3),
            }
        )
    return records, skipped


def spliced_dialogues(
    utterances: list[Utterance], out_dir: Path, turns: tuple[int, int], gap_seconds: float, seed: int
) -> list[dict]:
    """Format-1 dialogues of two speakers taking turns, their audio written to `out_dir/audio/`."""
    rng = np.random.default_rng(seed)
    queues: dict[str, list[Utterance]] = {}
    for u in utterances:
        queues.setdefault(u.speaker, []).append(u)
    for queue in queues.values():
        rng.shuffle(queue)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    gap = np.zeros(int(round(gap_seconds * SAMPLE_RATE)), np.float32)
    records = []
    while True:
        ready = sorted(s for s, q in queues.items() if q)
        if len(ready) < 2:
            return records
        first, second = (str(s) for s in rng.choice(ready, size=2, replace=False))
        want = int(rng.integers(turns[0], turns[1] + 1))
        text, pieces = "", []
        for turn in range(want):
            speaker = (first, second)[turn % 2]
            if not queues[speaker]:
                break
            u = queues[speaker].pop()
            text += f"[S{1 + turn % 2}]{u.text}"
            pieces += [read_audio(u.path), gap]
        name = f"audio/dialogue-{len(records):06d}.wav"
        wave = np.concatenate(pieces[:-1])
        sf.write(out_dir / name, wave, SAMPLE_RATE)
        records.append({"file_path": name, "full_transcript": text, "seconds": round(len(wave) / SAMPLE_RATE, 3)})


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write records atomically (a rerun never sees half a file)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def single_speaker(cfg: DictConfig) -> dict:
    """Run `cfg.mode` over `cfg.input` into `cfg.output_dir`; returns the report (also `report.json`)."""
    out = Path(cfg.output_dir)
    folder = OutputFolder(out, "single_speaker", overwrite=cfg.get("overwrite", False)).check()
    utterances, skipped = read_utterances(cfg.input, cfg.base_path)
    with folder.staged() as stage:  # the whole output appears at once, an earlier one's leftovers removed
        report = _build(cfg, utterances, skipped, stage)
    reasons = Counter(s["reason"].split(":")[0] for s in skipped)
    print(
        f"{cfg.mode}: {report['records']} records ({report['hours']:.3f} h of audio) from {len(utterances)} "
        f"utterances of {report['speakers']} speakers into {out}; left out {len(skipped)} lines"
        + "".join(f", {n} {reason}" for reason, n in reasons.most_common())
        + f" (see {out / 'report.json'})"
    )
    return report


def _build(cfg: DictConfig, utterances: list[Utterance], skipped: list[dict], out: Path) -> dict:
    if cfg.mode == "pairs":
        records, unpaired = cloning_pairs(utterances, tuple(cfg.pairs.reference_seconds), int(cfg.seed))
        skipped += unpaired
        write_jsonl(out / "pairs.jsonl", records)
    else:
        records = spliced_dialogues(
            utterances, out, tuple(cfg.dialogues.turns), float(cfg.dialogues.gap_seconds), int(cfg.seed)
        )
        write_jsonl(out / "dialogues.jsonl", records)
    report = {
        "mode": cfg.mode,
        "utterances": len(utterances),
        "speakers": len({u.speaker for u in utterances}),
        "records": len(records),
        "hours": sum(r["seconds"] for r in records) / 3600,
        "skipped": sorted(skipped, key=lambda s: s["line"]),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return report


def check_arguments(cfg: DictConfig) -> None:
    """Every problem of the command at once, each with its fix, before anything is read or written."""
    problems = require(cfg, {"input": "monologues.jsonl", "output_dir": "pairs/"})
    if not problems and not Path(str(cfg.input)).is_file():
        problems.append(f"input={cfg.input} is not a file; give a JSONL of file_path, full_transcript, speaker")
    if cfg.mode not in ("pairs", "dialogues"):
        problems.append(f"mode={cfg.mode} is unknown; use mode=pairs or mode=dialogues")
    low, high = cfg.pairs.reference_seconds
    if not 0 <= low <= high:
        problems.append(f"pairs.reference_seconds={[low, high]} must be [shortest, longest] seconds")
    if not 1 <= cfg.dialogues.turns[0] <= cfg.dialogues.turns[1]:
        problems.append(f"dialogues.turns={list(cfg.dialogues.turns)} must be [fewest, most] turns, at least 1")
    fail("invalid single-speaker command", problems)


@hydra.main(version_base="1.3", config_path="../conf", config_name="single_speaker")
@command
def main(cfg: DictConfig) -> None:
    """Hydra entry point: `python -m data_pipelines.single_speaker mode=... input=... output_dir=...`."""
    check_arguments(cfg)
    single_speaker(cfg)


if __name__ == "__main__":
    run(main, Path(__file__).parents[1] / "conf", "single_speaker")
