"""Scores of synthesised dialogues: intelligibility, per-turn voice similarity, speaker switching, length.

`score_dialogues` takes what was generated (a waveform per script) and what was asked for (the script, each
speaker's prompt clip, the expected length) and returns the `eval.json` section of one checkpoint: a record
per item and per turn, and the aggregate. The metric models are optional: without the ASR model there is no
CER/WER (and turns are cut in proportion to the text), without the speaker model no similarity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moss.evaluation.metrics import Errors, cosine, errors, mean
from moss.evaluation.speech_models import Transcriber, Transcript, VoiceEmbedder
from moss.evaluation.turns import script_turns, turn_spans

# The aggregate metrics compared between checkpoints, and how each improves: down, up, or towards 1.
DIRECTION = {
    "cer": "down",
    "wer": "down",
    "sim_s1": "up",
    "sim_s2": "up",
    "switch_acc": "up",
    "duration_ratio": "one",
    "hit_limit_rate": "down",
}
METRICS = tuple(DIRECTION)
# A turn shorter than this is not embedded: a speaker embedding of a fraction of a second says little.
MIN_TURN_SECONDS = 0.5


@dataclass
class Dialogue:
    """One generated script and what it was asked to be.

    Args:
        index: the item's index in the input.
        script: the text that was to be spoken (without the prompt's transcript).
        wave: the generated audio (mono, `sample_rate`): empty when the model ended at once (scored as saying
            nothing: every unit deleted), None when the item could not be synthesised (not scored).
        voices: speaker number -> that speaker's prompt clip (16 kHz), for similarity.
        expected_seconds: the length the audio should have (e.g. the held-out recording's), if known.
        error: why nothing was generated.
    """

    index: int
    script: str
    wave: np.ndarray | None
    voices: dict[int, np.ndarray] = field(default_factory=dict)
    expected_seconds: float | None = None
    error: str | None = None


def score_dialogues(
    dialogues: list[Dialogue],
    sample_rate: int,
    limit_seconds: float | None = None,
    asr: Transcriber | None = None,
    voices: VoiceEmbedder | None = None,
    voice_rate: int = 16000,
) -> dict:
    """The per-item, per-turn and aggregate scores of `dialogues` (see the module docstring)."""
    done = [d for d in dialogues if d.wave is not None]
    audible = [d for d in done if len(d.wave)]
    heard = dict(zip(map(id, audible), asr([d.wave for d in audible], sample_rate), strict=True)) if asr else {}
    silent = Transcript("", [])  # what an ASR model hears in no audio
    records, total = [], Errors(0, 0, 0, 0)
    for dialogue in done:
        transcript = heard.get(id(dialogue), silent) if asr else None
        record = _length_record(dialogue, sample_rate, limit_seconds)
        turns = script_turns(dialogue.script)
        spans = turn_spans(turns, record["duration_s"], transcript.words if transcript else None)
        if transcript is not None:
            counted = errors(dialogue.script, transcript.text)
            total += counted
            record.update(transcript=transcript.text, cer=counted.cer, wer=counted.wer)
        record["turns"] = [
            {
                "speaker": t.speaker,
                "text": t.text,
                "start_s": round(s.start, 3),
                "end_s": round(s.end, 3),
                "cut": s.method,
            }
            for t, s in zip(turns, spans, strict=True)
        ]
        records.append((dialogue, spans, record))
    if voices:
        _voice_scores(records, sample_rate, voices, voice_rate)
    items = [r for _, _, r in records] + [
        {"index": d.index, "script": d.script, "error": d.error or "not generated"} for d in dialogues if d.wave is None
    ]
    items.sort(key=lambda r: r["index"])
    return {"aggregate": _aggregate(items, total, asr is not None, voices is not None), "items": items}


def _length_record(dialogue: Dialogue, sample_rate: int, limit_seconds: float | None) -> dict:
    duration = len(dialogue.wave) / sample_rate
    record = {"index": dialogue.index, "script": dialogue.script, "duration_s": round(duration, 3)}
    if dialogue.expected_seconds:
        record["expected_seconds"] = dialogue.expected_seconds
        record["duration_ratio"] = round(duration / dialogue.expected_seconds, 4)
    if limit_seconds:
        # Generation stopped by the limit rather than by its end token (the delay tail is within a second).
        record["hit_limit"] = duration >= limit_seconds - 1.0
    return record


def _voice_scores(records: list, sample_rate: int, embedder: VoiceEmbedder, voice_rate: int) -> None:
    """Similarity of each turn to its speaker's prompt and to the other's, and whether it is closer to its own."""
    clips, owners = [], []
    for n, (dialogue, spans, _) in enumerate(records):
        for k, span in enumerate(spans):
            if span.end - span.start >= MIN_TURN_SECONDS:
                clips.append(dialogue.wave[int(span.start * sample_rate) : int(span.end * sample_rate)])
                owners.append((n, k))
    prompts = [(n, s) for n, (d, _, _) in enumerate(records) for s in sorted(d.voices)]
    turn_rows = embedder(clips, sample_rate) if clips else []
    prompt_rows = embedder([records[n][0].voices[s] for n, s in prompts], voice_rate) if prompts else []
    prompt_of = {key: row for key, row in zip(prompts, prompt_rows, strict=True)}
    for (n, k), row in zip(owners, turn_rows, strict=True):
        turn = records[n][2]["turns"][k]
        own, other = prompt_of.get((n, turn["speaker"])), prompt_of.get((n, 3 - turn["speaker"]))
        if own is None:
            continue
        turn["sim_own"] = round(cosine(row, own), 4)
        if other is not None:
            turn["sim_other"] = round(cosine(row, other), 4)
            turn["switch_ok"] = turn["sim_own"] > turn["sim_other"]


def _aggregate(items: list[dict], total: Errors, asr: bool, voices: bool) -> dict:
    done = [r for r in items if "error" not in r]
    turns = [t for r in done for t in r["turns"]]
    out = {
        "items": len(items),
        "generated": len(done),
        "seconds": round(sum(r["duration_s"] for r in done), 3),
        "duration_ratio": mean(r.get("duration_ratio") for r in done),
        "hit_limit_rate": mean(float(r["hit_limit"]) for r in done if "hit_limit" in r),
    }
    if asr:
        out.update(cer=total.cer, wer=total.wer)
    if voices:
        for speaker in (1, 2):
            out[f"sim_s{speaker}"] = mean(t.get("sim_own") for t in turns if t["speaker"] == speaker)
        out["switch_acc"] = mean(float(t["switch_ok"]) for t in turns if "switch_ok" in t)
        out["turns_scored"] = sum("sim_own" in t for t in turns)
    return out


def verdict(metric: str, base: float | None, tuned: float | None) -> str:
    """`better`, `worse` or `same` for tuned against base, in the metric's direction."""
    if base is None or tuned is None or base == tuned:
        return "same"
    if DIRECTION.get(metric, "up") == "one":
        return "better" if abs(tuned - 1) < abs(base - 1) else "worse"
    return "better" if (tuned < base) == (DIRECTION.get(metric, "up") == "down") else "worse"


def comparison(runs: dict) -> dict:
    """Each aggregate metric of `runs["base"]` and `runs["tuned"]`, tuned minus base, and better or worse."""
    out = {}
    for metric in METRICS:
        base, tuned = runs["base"]["aggregate"].get(metric), runs["tuned"]["aggregate"].get(metric)
        if base is None and tuned is None:
            continue
        delta = None if base is None or tuned is None else tuned - base
        out[metric] = {"base": base, "tuned": tuned, "delta": delta, "verdict": verdict(metric, base, tuned)}
    return out
