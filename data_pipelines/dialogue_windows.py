"""Untranscribed dialogue -> training windows: diarisation segments + ASR words -> tagged, bounded dialogues.

The assembly step of the transcription pipeline (issue 25), kept free of models and audio so it can be tested
against constructed timelines:

1. every recognised word goes to the speaker whose diarisation segment overlaps it most (a word no segment
   overlaps goes to the nearest one within `max_gap_s`, else it is dropped and reported);
2. consecutive words of one speaker form a turn; a pause over `max_pause_s` ends it;
3. turns are grouped into windows of at most `max_seconds` (the model's limit) and at most two speakers (MOSS-TTSD
   speaks `[S1]` and `[S2]`), cut only between turns (always at a pause over `max_pause_s`), or inside a turn
   longer than a window at its longest pause;
4. each window's speakers are tagged `[S1]`/`[S2]` in order of appearance, and it gets a confidence: the mean
   word probability (ASR) and the share of its words' time inside their speaker's segments (diarisation);
5. windows shorter than `min_seconds` or under the confidence floors are dropped with the reason.

Every dropped stretch comes back as a `Dropped` (start, end, reason) for the skip report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from pydantic import Field

from moss.evaluation.metrics import is_cjk
from moss.evaluation.turns import Word
from moss.settings import NonNegative, Probability, strict


@dataclass(frozen=True)
class Segment:
    """A diarisation segment: who speaks from `start` to `end` (seconds)."""

    start: float
    end: float
    speaker: str


@dataclass
class Turn:
    """Consecutive words of one speaker."""

    speaker: str
    words: list[Word] = field(default_factory=list)
    inside: float = 0.0  # seconds of its words that lie inside their speaker's segments

    @property
    def start(self) -> float:
        return self.words[0].start

    @property
    def end(self) -> float:
        return self.words[-1].end


@dataclass(frozen=True)
class Window:
    """One training record: the audio span, its tagged transcript and confidences."""

    start: float
    end: float
    transcript: str
    speakers: tuple[str, ...]
    asr_confidence: float
    diarisation_confidence: float


@dataclass(frozen=True)
class Dropped:
    """A stretch of the recording left out, and why (a line of the skip report)."""

    start: float
    end: float
    reason: str


@strict
@dataclass(frozen=True)
class WindowSettings:
    """The limits of the assembly (see the module docstring); `max_seconds` at most the model's limit."""

    max_seconds: Annotated[float, Field(gt=0, le=960)] = 120.0  # v0.5's training limit
    min_seconds: NonNegative = 2.0
    max_pause_s: NonNegative = 2.0
    max_gap_s: NonNegative = 0.5
    min_asr_confidence: Probability = 0.5
    min_diarisation_confidence: Probability = 0.7


def assemble(
    words: list[Word], segments: list[Segment], settings: WindowSettings
) -> tuple[list[Window], list[Dropped]]:
    """Windows of a recording and what was dropped, from its ASR words and diarisation (module docstring)."""
    dropped: list[Dropped] = []
    turns = _turns(sorted(words, key=lambda w: w.start), segments, settings, dropped)
    windows = []
    for group in _groups(turns, settings):
        window = _window(group)
        if window.end - window.start < settings.min_seconds:
            dropped.append(Dropped(window.start, window.end, f"shorter than {settings.min_seconds:g} s"))
        elif window.asr_confidence < settings.min_asr_confidence:
            dropped.append(Dropped(window.start, window.end, f"ASR confidence {window.asr_confidence:.2f}"))
        elif window.diarisation_confidence < settings.min_diarisation_confidence:
            reason = f"diarisation confidence {window.diarisation_confidence:.2f}"
            dropped.append(Dropped(window.start, window.end, reason))
        else:
            windows.append(window)
    return windows, dropped


def _speaker_of(word: Word, segments: list[Segment], max_gap: float) -> tuple[str | None, float]:
    """The speaker of `word` and the seconds of it inside that speaker's segments."""
    overlap: dict[str, float] = {}
    for seg in segments:
        inside = min(word.end, seg.end) - max(word.start, seg.start)
        if inside > 0:
            overlap[seg.speaker] = overlap.get(seg.speaker, 0.0) + inside
    if overlap:
        speaker = max(overlap, key=overlap.get)
        return speaker, overlap[speaker]
    middle = (word.start + word.end) / 2
    near = min(segments, key=lambda s: max(s.start - middle, middle - s.end, 0.0), default=None)
    if near is not None and max(near.start - middle, middle - near.end, 0.0) <= max_gap:
        return near.speaker, 0.0
    return None, 0.0


def _turns(words: list[Word], segments: list[Segment], settings: WindowSettings, dropped: list) -> list[Turn]:
    turns: list[Turn] = []
    for word in words:
        speaker, inside = _speaker_of(word, segments, settings.max_gap_s)
        if speaker is None:
            dropped.append(Dropped(word.start, word.end, "a word no speaker segment covers"))
            continue
        last = turns[-1] if turns else None
        if last is None or last.speaker != speaker or word.start - last.end > settings.max_pause_s:
            turns.append(Turn(speaker))
        turns[-1].words.append(word)
        turns[-1].inside += inside
    return turns


def _groups(turns: list[Turn], settings: WindowSettings) -> list[list[Turn]]:
    """Consecutive turns in windows of at most `max_seconds` and two speakers, cut between turns (or pauses)."""
    groups: list[list[Turn]] = []
    for turn in [piece for whole in turns for piece in _fit(whole, settings.max_seconds)]:
        current = groups[-1] if groups else None
        speakers = {t.speaker for t in current} | {turn.speaker} if current else set()
        long_pause = current and turn.start - current[-1].end > settings.max_pause_s
        if current is None or len(speakers) > 2 or turn.end - current[0].start > settings.max_seconds or long_pause:
            groups.append([turn])
        else:
            current.append(turn)
    return groups


def _fit(turn: Turn, max_seconds: float) -> list[Turn]:
    """A turn longer than a window, split at its longest pauses until every piece fits."""
    if turn.end - turn.start <= max_seconds or len(turn.words) < 2:
        return [turn]
    gaps = [turn.words[i + 1].start - turn.words[i].end for i in range(len(turn.words) - 1)]
    cut = max(range(len(gaps)), key=lambda i: (gaps[i], -abs(i - len(gaps) / 2))) + 1
    share = turn.inside / max(1e-9, sum(w.end - w.start for w in turn.words))
    pieces = []
    for words in (turn.words[:cut], turn.words[cut:]):
        piece = Turn(turn.speaker, words, share * sum(w.end - w.start for w in words))
        pieces += _fit(piece, max_seconds)
    return pieces


def _window(turns: list[Turn]) -> Window:
    order = list(dict.fromkeys(t.speaker for t in turns))  # [S1] is whoever speaks first in the window
    text = "".join(f"[S{order.index(t.speaker) + 1}]{_join(t.words)}" for t in turns)
    words = [w for t in turns for w in t.words]
    spoken = sum(w.end - w.start for w in words)
    return Window(
        start=turns[0].start,
        end=turns[-1].end,
        transcript=text,
        speakers=tuple(order),
        asr_confidence=sum(w.probability for w in words) / len(words),
        diarisation_confidence=sum(t.inside for t in turns) / spoken if spoken > 0 else 0.0,
    )


def _join(words: list[Word]) -> str:
    """Words as text: ASR chunks carry their own leading spaces (Whisper), else a space between words of letters."""
    out = ""
    for word in words:
        piece = word.text
        needs_space = out and not piece.startswith(" ") and not is_cjk(out[-1]) and not is_cjk(piece.strip()[:1])
        out += (" " if needs_space else "") + piece
    return out.strip()
