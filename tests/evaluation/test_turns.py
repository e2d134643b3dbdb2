"""Turn boundaries: from aligned ASR word times where there are some, else in proportion to the script."""

from __future__ import annotations

import pytest

from moss.evaluation.turns import Turn, Word, script_turns, turn_spans


def test_script_turns_split_at_tags_merge_a_speaker_and_drop_empty_turns():
    assert script_turns("[S1]a[S2]b c[S2] d [S1] [S1]e") == [Turn(1, "a"), Turn(2, "b c d"), Turn(1, "e")]
    assert script_turns("intro[S1]a") == [Turn(0, "intro"), Turn(1, "a")]


def test_without_word_times_turns_are_cut_in_proportion_to_their_units():
    turns = script_turns("[S1]one two[S2]three four five six[S1]seven eight")  # 2, 4 and 2 units
    spans = turn_spans(turns, duration=8.0)
    assert [(s.start, s.end, s.method) for s in spans] == [
        (0.0, 2.0, "proportional"),
        (2.0, 6.0, "proportional"),
        (6.0, 8.0, "proportional"),
    ]


def test_recognised_words_place_each_cut_midway_between_the_turns():
    turns = script_turns("[S1]hello there[S2]hi how are you")
    words = [Word("Hello", 0.2, 0.6), Word("there,", 0.7, 1.1), Word("hi", 1.9, 2.1), Word("how", 2.2, 2.4)]
    words += [Word("are", 2.5, 2.6), Word("you", 2.7, 3.0)]
    first, second = turn_spans(turns, duration=3.5, words=words)
    assert (first.start, first.end, first.method) == (0.0, pytest.approx(1.5), "asr")  # (1.1 + 1.9) / 2
    assert (second.start, second.end, second.method) == (pytest.approx(1.5), 3.5, "asr")


def test_misheard_words_still_place_the_cuts_and_an_unheard_turn_gets_no_time():
    turns = script_turns("[S1]alpha beta[S2]gamma delta[S1]epsilon zeta")
    heard = [Word("alpha", 0.0, 0.5), Word("beta", 0.5, 1.0), Word("epsilon", 4.0, 4.5), Word("zeta", 4.5, 5.0)]
    misheard = heard[:2] + [Word("xx", 1.2, 1.4), Word("yy", 1.5, 1.9)] + heard[2:]  # aligned as substitutions
    spans = turn_spans(turns, duration=6.0, words=misheard)
    assert [round(s.end, 3) for s in spans] == [1.1, 2.95, 6.0]  # (1.0 + 1.2) / 2, (1.9 + 4.0) / 2
    spans = turn_spans(turns, duration=6.0, words=heard)  # the middle turn was not said at all
    assert [(round(s.start, 3), round(s.end, 3)) for s in spans] == [(0.0, 2.5), (2.5, 2.5), (2.5, 6.0)]


def test_a_cut_without_recognised_units_on_one_side_is_proportional():
    lone = turn_spans(script_turns("[S1]alpha beta[S2]gamma delta"), 4.0, [Word("gamma", 3.0, 3.5)])
    assert [(s.end, s.method) for s in lone] == [(2.0, "proportional"), (4.0, "proportional")]
    three = turn_spans(script_turns("[S1]a b[S2]c d[S1]e f"), 6.0, [Word("a", 0.0, 0.5), Word("c", 2.5, 3.0)])
    assert [s.method for s in three] == ["asr", "mixed", "proportional"]  # the second cut has nothing after it


def test_a_recognised_chunk_of_several_characters_shares_its_time():
    turns = script_turns("[S1]你好[S2]再见")
    spans = turn_spans(turns, duration=4.0, words=[Word("你好", 0.0, 1.0), Word("再见", 2.0, 3.0)])
    assert spans[0].end == pytest.approx(1.5) and spans[0].method == "asr"
