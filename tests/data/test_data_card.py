"""The data card against shard sets whose contents are constructed, so every figure is known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moss.data.data_card import data_card, write_data_card
from moss.data.examples import ExampleBuilder
from moss.data.schema import ShardSample
from moss.data.writer import write_shards
from moss.text import PromptBuilder


def sample(key: str, text: str, frames: int, seed: int) -> ShardSample:
    codes = np.random.default_rng(seed).integers(0, 1024, (frames, 8)).astype(np.int16)
    return ShardSample(key=key, codes=codes, text=text, source="constructed")


@pytest.fixture
def builder(tiny_tokenizer):
    return ExampleBuilder(PromptBuilder(tiny_tokenizer, speech_offset=384), text_pad_id=368, max_rows=4096)


def test_totals_speakers_turns_rates_and_the_overlap_of_validation(tmp_path, builder):
    train = [
        sample("t0", "[S1]one two three[S2]four", 40, 0),  # 3.2 s: S1 2.4 s, S2 0.8 s; 4 units / 3.2 s
        sample("t1", "[S2]five six[S1]seven eight", 125, 1),  # 10 s: 5 s each; 4 units / 10 s
    ]
    val = [sample("v0", "[S1]one two three[S2]four", 40, 0), sample("v1", "[S2]five six[S1]seven eight", 50, 9)]
    write_shards(train, tmp_path / "train", prefix="train", max_samples=1)
    write_shards(val, tmp_path / "val", prefix="val", max_samples=1)
    card = data_card({"train": str(tmp_path / "train"), "val": str(tmp_path / "val")}, builder, max_samples=10)
    split = card["splits"]["train"]
    assert (split["shards"], split["samples"], split["hours"]) == (2, 2, round(165 / 12.5 / 3600, 4))
    read = split["read"]
    assert read["hours_per_speaker"] == {"S1": round(7.4 / 3600, 4), "S2": round(5.8 / 3600, 4)}
    turns = {"0-1": 1, "1-2": 0, "2-5": 1, "5-10": 2, "10-20": 0, "20-30": 0, "30-60": 0, "60+": 0}  # 0.8, 2.4, 5, 5
    assert read["turn_seconds"] == turns
    assert read["units_per_second"]["1-2"] == 1 and sum(read["units_per_second"].values()) == 2  # 4/3.2, 0.4
    assert read["median_units_per_second"] == pytest.approx((4 / 3.2 + 0.4) / 2)
    assert card["val_overlaps_train"] == {"audio": 1, "transcript": 2}  # v0 is t0; v1 only says what t1 says
    assert any("validation overlaps training" in w for w in card["warnings"])
    path = write_data_card(card, tmp_path / "run" / "data_card.json")
    assert json.loads(path.read_text()) == card


def test_a_split_mostly_left_out_is_warned_about_and_totals_need_no_reading(tmp_path, tiny_tokenizer):
    samples = [sample(f"s{i}", "[S1]a b", 300 if i < 3 else 20, i) for i in range(4)]
    write_shards(samples, tmp_path / "train", prefix="train", max_samples=2)
    strict = ExampleBuilder(PromptBuilder(tiny_tokenizer, speech_offset=384), text_pad_id=368, max_rows=200)
    card = data_card({"train": str(tmp_path / "train"), "val": None}, strict, max_samples=10)
    read = card["splits"]["train"]["read"]
    assert read["left_out"] == {"over the row limit": 3} and read["left_out_share"] == 0.75
    assert [w.split(":")[0] for w in card["warnings"]] == ["train"] and "val_overlaps_train" not in card
    totals = data_card({"train": str(tmp_path / "train")}, strict, max_samples=0)["splits"]["train"]
    assert totals["samples"] == 4 and totals["read"]["samples"] == 0
