"""score_dialogues with stand-in judges whose answers are constructed, so every number can be worked out."""

from __future__ import annotations

import numpy as np
import pytest

from moss.evaluation.scoring import Dialogue, score_dialogues
from moss.evaluation.speech_models import Transcript
from moss.evaluation.turns import Word

RATE = 100  # samples per second: a turn's samples are easy to count


class HeardAs:
    """An ASR stand-in: each clip is heard as the given transcript."""

    def __init__(self, *transcripts: Transcript):
        self.transcripts = list(transcripts)

    def __call__(self, waves, sample_rate):
        assert sample_rate == RATE and len(waves) == len(self.transcripts)
        return self.transcripts


class VoiceByLevel:
    """A speaker-model stand-in: a clip's embedding is [mean, 1 - mean] of its samples (prompts: 1.0 or 0.0)."""

    def __call__(self, waves, sample_rate):
        return np.array([[float(np.mean(w)), 1.0 - float(np.mean(w))] for w in waves])


def test_scores_per_turn_and_in_aggregate():
    # Speaker 1's voice is level 1.0, speaker 2's level 0.0; the second turn comes out in speaker 1's voice.
    wave = np.concatenate([np.full(200, 1.0), np.full(200, 0.9), np.full(200, 1.0)])
    words = [Word("one", 0.0, 1.9), Word("two", 2.1, 3.9), Word("three", 4.1, 6.0)]
    asr = HeardAs(Transcript("one two tree", words), Transcript("", []))
    voices = {1: np.full(100, 1.0), 2: np.full(100, 0.0)}
    dialogues = [
        Dialogue(0, "[S1]one[S2]two[S1]three", wave, voices, expected_seconds=5.0),
        Dialogue(1, "[S1]four five", np.zeros(2000), {}),  # 20 s: at the limit
        Dialogue(2, "[S2]six", None, error="prompt audio missing"),
    ]
    out = score_dialogues(dialogues, RATE, limit_seconds=20.0, asr=asr, voices=VoiceByLevel(), voice_rate=RATE)
    first, second, failed = out["items"]
    assert [t["cut"] for t in first["turns"]] == ["asr"] * 3
    assert [(t["start_s"], t["end_s"]) for t in first["turns"]] == [(0.0, 2.0), (2.0, 4.0), (4.0, 6.0)]
    assert first["duration_ratio"] == pytest.approx(6.0 / 5.0) and first["hit_limit"] is False
    assert second["hit_limit"] is True and second["transcript"] == ""
    assert failed == {"index": 2, "script": "[S2]six", "error": "prompt audio missing"}
    # cos([0.9, 0.1], [1, 0]) for the misvoiced turn, against its own speaker (2: [0, 1]).
    misvoiced = first["turns"][1]
    assert misvoiced["sim_own"] == pytest.approx(0.1 / np.hypot(0.9, 0.1), abs=1e-4)
    assert misvoiced["sim_other"] == pytest.approx(0.9 / np.hypot(0.9, 0.1), abs=1e-4)
    assert [t["switch_ok"] for t in first["turns"]] == [True, False, True]
    agg = out["aggregate"]
    assert agg["wer"] == pytest.approx((1 + 2) / (3 + 2))  # "tree" for "three"; nothing heard of "four five"
    assert agg["switch_acc"] == pytest.approx(2 / 3) and agg["sim_s1"] == pytest.approx(1.0)
    assert agg["sim_s2"] == pytest.approx(misvoiced["sim_own"]) and agg["turns_scored"] == 3
    assert (agg["items"], agg["generated"], agg["hit_limit_rate"]) == (3, 2, 0.5)


def test_without_metric_models_only_lengths_are_scored_and_turns_are_proportional():
    out = score_dialogues([Dialogue(0, "[S1]a b[S2]c d", np.zeros(400))], RATE, limit_seconds=None)
    [item] = out["items"]
    assert "cer" not in item and "hit_limit" not in item
    assert [(t["end_s"], t["cut"]) for t in item["turns"]] == [(2.0, "proportional"), (4.0, "proportional")]
    assert set(out["aggregate"]) == {"items", "generated", "seconds", "duration_ratio", "hit_limit_rate"}


def test_a_turn_too_short_to_embed_gets_no_similarity():
    wave = np.concatenate([np.full(20, 1.0), np.full(300, 0.0)])  # 0.2 s and 3 s
    words = [Word("a", 0.0, 0.2), Word("b", 0.2, 3.2)]
    out = score_dialogues(
        [Dialogue(0, "[S1]a[S2]b", wave, {1: np.ones(100), 2: np.zeros(100)})],
        RATE,
        asr=HeardAs(Transcript("a b", words)),
        voices=VoiceByLevel(),
        voice_rate=RATE,
    )
    short, long = out["items"][0]["turns"]
    assert "sim_own" not in short and long["switch_ok"] is True


def test_a_script_the_model_ended_at_once_is_scored_as_saying_nothing():
    asr = HeardAs(Transcript("one two", []))  # only the audible clip reaches the ASR model
    silent, spoken = Dialogue(0, "[S1]a b c", np.zeros(0)), Dialogue(1, "[S1]one two", np.zeros(100))
    out = score_dialogues([silent, spoken], RATE, limit_seconds=5.0, asr=asr, voices=VoiceByLevel(), voice_rate=RATE)
    first, second = out["items"]
    assert first["transcript"] == "" and first["wer"] == 1.0 and first["duration_s"] == 0.0
    assert second["wer"] == 0.0
    assert out["aggregate"]["wer"] == pytest.approx(3 / 5) and out["aggregate"]["generated"] == 2
