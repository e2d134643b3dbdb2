"""Who speaks when: voice activity detection (Silero VAD) and speaker diarisation (x-vectors, clustered).

* `SileroVad`: the `silero-vad` package's model (its weights ship in the wheel: nothing is downloaded), through
  the package's own `get_speech_timestamps`.
* `EmbeddingDiariser`: the speech is cut into short overlapping windows (1.5 s every 0.75 s), each window gets a
  speaker embedding (`moss.evaluation.speech_models.VoiceEmbedder`: any transformers x-vector model, by local folder or
  Hub id), and the windows are clustered agglomeratively on cosine distance (scipy), to a known number of speakers
  or until the clusters are further apart than a threshold. Each window speaks for the middle of its span, so
  turn boundaries are placed to within half a step. This is the embedding-and-clustering recipe of pyannote's
  and NeMo's diarisers, on models transformers loads.

Both take and give plain numbers (16 kHz mono arrays, seconds), so the transcription command can swap either for a
deterministic stand-in in tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from pydantic import Field

from data_pipelines.dialogue_windows import Segment
from moss.settings import Count, NonNegative, Probability, Seconds, strict

Regions = list[tuple[float, float]]  # speech stretches, seconds


@strict
@dataclass(frozen=True)
class VadSettings:
    """Silero VAD's thresholds: speech probability, shortest speech and shortest silence kept (seconds)."""

    threshold: Probability = 0.5
    min_speech_s: NonNegative = 0.25
    min_silence_s: NonNegative = 0.3


class SileroVad:
    """Speech stretches of a 16 kHz mono recording (Silero VAD, CPU)."""

    def __init__(self, settings: VadSettings = VadSettings()):
        from silero_vad import load_silero_vad

        self.settings, self.model = settings, load_silero_vad()

    def __call__(self, wave: np.ndarray, sample_rate: int) -> Regions:
        import torch
        from silero_vad import get_speech_timestamps

        stamps = get_speech_timestamps(
            torch.from_numpy(np.ascontiguousarray(wave, np.float32)),
            self.model,
            sampling_rate=sample_rate,
            threshold=self.settings.threshold,
            min_speech_duration_ms=int(self.settings.min_speech_s * 1000),
            min_silence_duration_ms=int(self.settings.min_silence_s * 1000),
        )
        return [(s["start"] / sample_rate, s["end"] / sample_rate) for s in stamps]


@strict
@dataclass(frozen=True)
class DiarisationSettings:
    """Window length and step (seconds); `num_speakers` when known, else clusters merge below `threshold`."""

    window_s: Seconds = 1.5
    step_s: Seconds = 0.75
    threshold: Annotated[float, Field(ge=0, le=2)] = 0.6  # cosine distance (average linkage) beyond which two
    num_speakers: Count | None = None  # clusters are two speakers


class EmbeddingDiariser:
    """Speaker segments from clustered window embeddings (module docstring).

    Args:
        embed: `(clips, sample_rate) -> [n, dim]` embeddings (a `VoiceEmbedder`, or a stand-in).
        settings: the windows and the clustering.
    """

    def __init__(self, embed: Callable[[list[np.ndarray], int], np.ndarray], settings: DiarisationSettings):
        self.embed, self.settings = embed, settings

    def __call__(self, wave: np.ndarray, sample_rate: int, regions: Regions) -> list[Segment]:
        spans = windows(regions, self.settings.window_s, self.settings.step_s)
        if not spans:
            return []
        clips = [wave[int(a * sample_rate) : max(int(b * sample_rate), int(a * sample_rate) + 1)] for a, b in spans]
        labels = cluster(np.asarray(self.embed(clips, sample_rate), np.float64), self.settings)
        return segments(spans, labels, regions)


def windows(regions: Regions, length: float, step: float) -> Regions:
    """Windows of `length` every `step` over each region; a region shorter than `length` is one window."""
    out = []
    for start, end in regions:
        if end - start <= length:
            out.append((start, end))
            continue
        count = int(np.ceil((end - start - length) / step)) + 1
        for i in range(count):
            a = min(start + i * step, end - length)
            out.append((a, a + length))
    return out


def cluster(embeddings: np.ndarray, settings: DiarisationSettings) -> list[int]:
    """Cluster labels, numbered in order of first appearance (average linkage on cosine distance)."""
    from scipy.cluster.hierarchy import fcluster, linkage

    if len(embeddings) == 1:
        return [0]
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    unit = embeddings / np.where(norms > 0, norms, 1.0)
    tree = linkage(unit, method="average", metric="cosine")
    if settings.num_speakers:
        raw = fcluster(tree, t=settings.num_speakers, criterion="maxclust")
    else:
        raw = fcluster(tree, t=settings.threshold, criterion="distance")
    order: dict[int, int] = {}
    return [order.setdefault(int(label), len(order)) for label in raw]


def segments(spans: Regions, labels: list[int], regions: Regions) -> list[Segment]:
    """Each window speaks for its span up to the midpoints with its neighbours in the same region; runs merge."""
    pieces = []
    for i, ((a, b), label) in enumerate(zip(spans, labels, strict=True)):
        region = next(r for r in regions if r[0] <= a + 1e-9 and b <= r[1] + 1e-9)
        start = (a + spans[i - 1][1]) / 2 if i > 0 and spans[i - 1][1] > a and spans[i - 1][0] >= region[0] else a
        end = (b + spans[i + 1][0]) / 2 if i + 1 < len(spans) and spans[i + 1][0] < b else b
        pieces.append(Segment(max(start, region[0]), min(end, region[1]), f"speaker{label}"))
    merged: list[Segment] = []
    for piece in pieces:
        last = merged[-1] if merged else None
        if last and last.speaker == piece.speaker and piece.start - last.end < 1e-6:
            merged[-1] = Segment(last.start, piece.end, last.speaker)
        else:
            merged.append(piece)
    return merged
