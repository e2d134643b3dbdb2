"""Where each `[S1]`/`[S2]` turn of a script lies in its audio.

MOSS-TTSD generates the audio rows of a whole dialogue after its text; no speaker marker is emitted in the
audio, so the turn boundaries are found by aligning the ASR words (with their timestamps) to the script's
units: the cut between two turns lies midway between the last recognised unit of the one and the first of the
next. A boundary with no recognised unit on one side (or every boundary, when the ASR model is off or gives no
timestamps) is placed in proportion to the script's units, and marked so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moss.evaluation.metrics import aligned_units, scoring_units

_TAG = re.compile(r"\[S(\d+)\]")


@dataclass(frozen=True)
class Turn:
    """One speaker's turn of a script; `speaker` 0 for text before the first tag."""

    speaker: int
    text: str


@dataclass(frozen=True)
class Word:
    """A recognised word (or chunk), its time in the audio (seconds) and the ASR model's probability for it."""

    text: str
    start: float
    end: float
    probability: float = 1.0  # 1.0 when the model gives none


@dataclass(frozen=True)
class Span:
    """Where a turn lies: seconds, and how its boundaries were found (asr, proportional, or mixed)."""

    start: float
    end: float
    method: str


def script_turns(text: str) -> list[Turn]:
    """The turns of a script, in order; a turn with no text is dropped, consecutive ones of a speaker merged."""
    turns: list[Turn] = []
    speaker, last = 0, 0
    for tag in [*_TAG.finditer(text), None]:
        piece = text[last : tag.start() if tag else len(text)].strip()
        if piece:
            if turns and turns[-1].speaker == speaker:
                turns[-1] = Turn(speaker, f"{turns[-1].text} {piece}")
            else:
                turns.append(Turn(speaker, piece))
        if tag:
            speaker, last = int(tag.group(1)), tag.end()
    return turns


def turn_spans(turns: list[Turn], duration: float, words: list[Word] | None = None) -> list[Span]:
    """A span per turn covering `[0, duration]` without overlap (see the module docstring for how)."""
    units = [scoring_units(t.text) for t in turns]
    counts = [len(u) for u in units]
    total = sum(counts) or 1
    owner = [i for i, n in enumerate(counts) for _ in range(n)]  # the turn of each reference unit
    times = _unit_times([u for turn in units for u in turn], words or [])
    cuts, found = [0.0], []
    for i in range(1, len(turns)):
        before = [t for u, t in enumerate(times) if t is not None and owner[u] < i]
        after = [t for u, t in enumerate(times) if t is not None and owner[u] >= i]
        if before and after:
            cut, by_asr = (before[-1][1] + after[0][0]) / 2, True
        else:
            cut, by_asr = duration * sum(counts[:i]) / total, False
        cuts.append(min(max(cut, cuts[-1]), duration))
        found.append(by_asr)
    cuts.append(duration)
    spans = []
    for i in range(len(turns)):
        sides = found[max(0, i - 1) : i + 1]  # the boundaries of this turn (one for the first and last turn)
        method = "asr" if sides and all(sides) else "proportional" if not any(sides) else "mixed"
        spans.append(Span(cuts[i], cuts[i + 1], method))
    return spans


def _unit_times(reference: list[str], words: list[Word]) -> list[tuple[float, float] | None]:
    """The (start, end) of each reference unit's recognised counterpart; a word of several units shares its time."""
    hyp, hyp_times = [], []
    for word in words:
        pieces = scoring_units(word.text)
        step = (word.end - word.start) / max(1, len(pieces))
        for k, piece in enumerate(pieces):
            hyp.append(piece)
            hyp_times.append((word.start + k * step, word.start + (k + 1) * step))
    return [None if h is None else hyp_times[h] for h in aligned_units(reference, hyp)]
