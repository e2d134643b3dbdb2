"""The arithmetic of the quality metrics: error rates over normalised text, cosine similarity, switch accuracy.

Text is normalised the same way on both sides (Whisper's `BasicTextNormalizer`: speaker tags, bracketed and
parenthesised asides, punctuation and case removed), then split into units: a Chinese, Japanese or Korean
character is a unit of its own, any other run of letters and digits is a word. `wer` counts units (so a
Chinese script is scored by characters, an English one by words, a mixed one by both); `cer` counts characters
with the spaces removed. Alignments are jiwer's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_TAGS = re.compile(r"[<\[][^>\]]*[>\]]")  # [S1], [laugh], <|...|>
# CJK ideographs, kana and hangul: scripts written without spaces between words.
_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff])")


def scoring_units(text: str) -> list[str]:
    """The units `text` is scored by, after the normalisation both sides share."""
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    text = _TAGS.sub(" ", text)  # the normaliser drops tags without a space: "[S1]a[S2]b" would become "ab"
    return _CJK.sub(r" \1 ", BasicTextNormalizer()(text)).split()


def is_cjk(char: str) -> bool:
    """Whether `char` is a Chinese, Japanese or Korean character (written without spaces between words)."""
    return bool(_CJK.fullmatch(char))


@dataclass(frozen=True)
class Errors:
    """Edit counts of a hypothesis against a reference, in units (`wer`) and in characters (`cer`)."""

    unit_edits: int
    units: int
    char_edits: int
    chars: int

    @property
    def wer(self) -> float | None:
        return self.unit_edits / self.units if self.units else None

    @property
    def cer(self) -> float | None:
        return self.char_edits / self.chars if self.chars else None

    def __add__(self, other: Errors) -> Errors:
        """Corpus totals: rates over the sum of the edits and of the reference lengths (not a mean of rates)."""
        return Errors(
            self.unit_edits + other.unit_edits,
            self.units + other.units,
            self.char_edits + other.char_edits,
            self.chars + other.chars,
        )


def errors(reference: str, hypothesis: str) -> Errors:
    """Substitutions + deletions + insertions of `hypothesis` against `reference`."""
    ref, hyp = scoring_units(reference), scoring_units(hypothesis)
    ref_chars, hyp_chars = list("".join(ref)), list("".join(hyp))
    return Errors(_edits(ref, hyp), len(ref), _edits(ref_chars, hyp_chars), len(ref_chars))


def _edits(ref: list[str], hyp: list[str]) -> int:
    if not ref or not hyp:
        return len(ref) + len(hyp)
    import jiwer

    out = jiwer.process_words(" ".join(ref), " ".join(hyp))
    return out.substitutions + out.deletions + out.insertions


def aligned_units(reference: list[str], hypothesis: list[str]) -> list[int | None]:
    """For each reference unit, the hypothesis unit it was recognised as (equal or substituted), else None."""
    matched: list[int | None] = [None] * len(reference)
    if not reference or not hypothesis:
        return matched
    import jiwer

    for chunk in jiwer.process_words(" ".join(reference), " ".join(hypothesis)).alignments[0]:
        if chunk.type in ("equal", "substitute"):
            for offset in range(chunk.ref_end_idx - chunk.ref_start_idx):
                matched[chunk.ref_start_idx + offset] = chunk.hyp_start_idx + offset
    return matched


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings (0 when either is all zeros)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norm) if norm else 0.0


def switch_correct(turn: np.ndarray, own: np.ndarray, other: np.ndarray) -> bool:
    """Whether a turn's voice is closer to its own speaker's prompt than to the other speaker's."""
    return cosine(turn, own) > cosine(turn, other)


def mean(values) -> float | None:
    """The mean of the values that are not None (None when there are none)."""
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None
