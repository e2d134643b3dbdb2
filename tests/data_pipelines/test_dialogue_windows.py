"""Diarisation + ASR words -> tagged windows, against constructed timelines whose answer is known."""

from __future__ import annotations

import pytest

from data_pipelines.dialogue_windows import Segment, WindowSettings, Word, assemble

LOOSE = WindowSettings(min_seconds=0.0, min_asr_confidence=0.0, min_diarisation_confidence=0.0)


def words(text: str, start: float, step: float = 0.5, probability: float = 0.9) -> list[Word]:
    """Words of `text`, one every `step` seconds from `start`, each lasting 0.4 s."""
    return [Word(w, start + i * step, start + i * step + 0.4, probability) for i, w in enumerate(text.split())]


def test_two_speakers_are_tagged_in_order_of_appearance():
    segments = [Segment(0.0, 2.0, "spk_B"), Segment(2.2, 4.0, "spk_A"), Segment(4.2, 5.0, "spk_B")]
    heard = words("hello there friend", 0.1) + words("hi how are you", 2.3, step=0.4) + words("fine", 4.3)
    [window], dropped = assemble(heard, segments, LOOSE)
    assert window.transcript == "[S1]hello there friend[S2]hi how are you[S1]fine"
    assert window.speakers == ("spk_B", "spk_A") and dropped == []
    assert (window.start, window.end) == (0.1, pytest.approx(4.7))
    assert window.asr_confidence == pytest.approx(0.9) and window.diarisation_confidence == pytest.approx(1.0)


def test_a_word_goes_to_the_segment_it_overlaps_most_and_an_uncovered_word_is_reported():
    segments = [Segment(0.0, 1.0, "a"), Segment(1.0, 3.0, "b")]
    heard = [Word("one", 0.2, 0.6), Word("two", 0.9, 1.5), Word("three", 1.6, 2.0), Word("lost", 9.0, 9.4)]
    [window], dropped = assemble(heard, segments, LOOSE)
    assert window.transcript == "[S1]one[S2]two three"  # "two": 0.1 s in a, 0.5 s in b
    assert dropped == [type(dropped[0])(9.0, 9.4, "a word no speaker segment covers")]
    near = assemble([Word("edge", 3.1, 3.3)], segments, LOOSE)[0]  # 0.2 s past b's end: within max_gap_s
    assert near[0].transcript == "[S1]edge" and near[0].diarisation_confidence == 0.0


def test_windows_stay_under_the_limit_cut_between_turns_and_a_long_monologue_at_its_longest_pause():
    segments = [Segment(0, 100, "a"), Segment(100, 200, "b")]
    settings = WindowSettings(max_seconds=30, min_seconds=0, min_asr_confidence=0, min_diarisation_confidence=0)
    first = words(" ".join(f"w{i}" for i in range(20)), 0.0)  # 0-10 s
    second = words(" ".join(f"x{i}" for i in range(20)), 11.5)  # 11.5-21.4 s: a 1.6 s pause, the same turn
    long_b = words(" ".join(f"y{i}" for i in range(50)), 100.0) + words(" ".join(f"z{i}" for i in range(50)), 126.5)
    windows, _ = assemble(first + second + long_b, segments, settings)
    assert all(w.end - w.start <= 30 for w in windows)
    assert windows[0].transcript.startswith("[S1]w0") and "x19" in windows[0].transcript
    cut = [w for w in windows if "y49" in w.transcript][0]
    assert "z0" not in cut.transcript  # cut where b paused (1.9 s between y49 and z0), not mid-phrase


def test_a_third_speaker_starts_a_new_window():
    segments = [Segment(0, 2, "a"), Segment(2, 4, "b"), Segment(4, 6, "c"), Segment(6, 8, "a")]
    heard = words("one two", 0.2) + words("three four", 2.2) + words("five six", 4.2) + words("seven", 6.2)
    windows, _ = assemble(heard, segments, LOOSE)
    assert [w.transcript for w in windows] == ["[S1]one two[S2]three four", "[S1]five six[S2]seven"]
    assert [w.speakers for w in windows] == [("a", "b"), ("c", "a")]


def test_short_and_unsure_windows_are_dropped_with_their_reason():
    segments = [Segment(0, 10, "a"), Segment(20, 30, "b"), Segment(40, 50, "a")]
    settings = WindowSettings(min_seconds=2.0, min_asr_confidence=0.6, max_pause_s=2.0)
    heard = words("just this", 0.0)  # 0.9 s
    heard += words("mumbled words here and there", 20.0, probability=0.3)
    heard += words("clear speech here and now", 40.0, probability=0.95)
    windows, dropped = assemble(heard, segments, settings)
    assert [w.transcript for w in windows] == ["[S1]clear speech here and now"]
    assert [d.reason for d in dropped] == ["shorter than 2 s", "ASR confidence 0.30"]


def test_chinese_words_join_without_spaces_and_whisper_chunks_keep_theirs():
    segments = [Segment(0, 1.2, "a"), Segment(1.2, 3, "b")]
    heard = [Word("你好", 0.0, 0.5), Word("世界", 0.6, 1.0), Word(" Hello", 1.5, 1.9), Word(" there.", 2.0, 2.4)]
    [window], _ = assemble(heard, segments, LOOSE)
    assert window.transcript == "[S1]你好世界[S2]Hello there."
