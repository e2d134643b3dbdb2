"""The metric arithmetic against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moss.evaluation.metrics import Errors, cosine, errors, mean, scoring_units, switch_correct


def test_units_ignore_tags_punctuation_and_case_and_split_cjk_into_characters():
    assert scoring_units("[S1]Hello, World! (laughs)[S2]我们 go  home。") == [
        "hello",
        "world",
        "我",
        "们",
        "go",
        "home",
    ]
    assert errors("[S1]Hello, World!", "hello world").unit_edits == 0
    assert scoring_units("[S1]one[S2]two<|end|>three") == ["one", "two", "three"]  # a tag separates words


def test_word_and_character_error_rates_on_known_strings():
    # the cat sat on the mat -> the cat sit on mat: 1 substitution + 1 deletion of 6 words;
    # thecatsatonthemat -> thecatsitonmat: 1 substitution + 3 deletions of 17 characters.
    counted = errors("The cat sat on the mat.", "the cat sit on mat")
    assert (counted.unit_edits, counted.units, counted.char_edits, counted.chars) == (2, 6, 4, 17)
    assert counted.wer == pytest.approx(2 / 6) and counted.cer == pytest.approx(4 / 17)
    chinese = errors("[S1]你好，世界。", "你好世间")  # one character of four
    assert chinese.wer == pytest.approx(0.25) and chinese.cer == pytest.approx(0.25)
    inserted = errors("a b", "a x b y")
    assert inserted.wer == pytest.approx(1.0) and inserted.cer == pytest.approx(1.0)


def test_nothing_heard_is_every_unit_deleted_and_an_empty_reference_has_no_rate():
    assert errors("a b c", "").wer == 1.0
    assert errors("", "a").wer is None


def test_corpus_rates_sum_the_edits_not_the_rates():
    total = errors("a b c d", "a b c x") + errors("e f", "")  # 1 of 4, 2 of 2
    assert total.wer == pytest.approx(3 / 6)  # the mean of the two rates would be 0.625
    assert Errors(0, 0, 0, 0).wer is None


def test_cosine_and_switch_on_constructed_vectors():
    assert cosine([1, 0], [0, 1]) == 0.0
    assert cosine([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert cosine([1, 1], [1, 0]) == pytest.approx(1 / math.sqrt(2))
    assert cosine([1, 1], [-1, -1]) == pytest.approx(-1.0)
    assert cosine(np.zeros(3), [1, 2, 3]) == 0.0
    s1, s2 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    assert switch_correct(np.array([0.9, 0.2]), own=s1, other=s2)
    assert not switch_correct(np.array([0.9, 0.2]), own=s2, other=s1)
    assert mean([1.0, None, 3.0]) == 2.0 and mean([None]) is None
