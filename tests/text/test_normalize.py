"""normalize_text reproduces the original v0.5-final and v0.7 rules on the golden cases, and the prompt
builder with normalisation reproduces the original's normalised training grids."""

import json

import pytest
import torch
from safetensors.torch import load_file

from moss.text import PromptBuilder, map_speaker_tags, normalize_text
from moss.text.normalize import normalizer
from tests.conftest import requires_golden

pytestmark = requires_golden


@pytest.fixture(scope="module")
def cases(golden):
    return json.loads((golden / "data" / "normalize_text.json").read_text())["cases"]


@pytest.mark.parametrize("version, key", [("v0.5", "v05final_normalize_text"), ("v0.7", "v07_normalize_text")])
def test_golden_cases(cases, version, key):
    for case in cases:
        assert normalize_text(case["input"], version) == case[key], case["input"]


def test_final_text_with_speaker_tokens(cases):
    for case in cases:
        assert map_speaker_tags(normalize_text(case["input"], "v0.7")) == case["v07_final_text"]


@pytest.mark.parametrize(
    "variant, version", [("preprocess_normalized", "v0.7"), ("preprocess_normalized_v05final", "v0.5")]
)
def test_normalised_training_grids(golden, variant, version):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(golden / "tokenizer")
    grids = load_file(golden / "data" / variant / "grids.safetensors")
    items = [json.loads(line) for line in (golden / "data" / "train.jsonl").read_text().splitlines()]
    codes = [grids[f"fake_codec_call{k}_codes"].T.numpy() for k in range(3)]
    build = PromptBuilder(tokenizer, speech_offset=151665, normalize=normalizer(version))
    built = [
        build(items[0]["full_transcript"], codes[0]),
        build(items[1]["text"], codes[2], ref_text=items[1]["reference_text"], ref_codes=codes[1]),
    ]
    for i, (ids, labels) in enumerate(built):
        assert torch.equal(torch.from_numpy(ids), grids[f"sample{i}_input_ids"])
        assert torch.equal(torch.from_numpy(labels), grids[f"sample{i}_labels"])


def test_unknown_version():
    with pytest.raises(ValueError, match="unknown normalisation version 'v9'"):
        normalize_text("x", "v9")


@pytest.mark.parametrize(
    "text, v05, v07",
    [
        ("[S1]ha  ha, fine", "[S1](laughs), fine", "[S1][laugh], fine"),  # any run of spaces, as the original `\s*`
        ("[S1]Ha   HA ha hahaha ok", "[S1](laughs) ok", "[S1][laugh] ok"),
        ("[S1]hahah no", "[S1]hahah no", "[S1]hahah no"),  # not a whole word: kept
    ],
)
def test_english_laughter_takes_any_spacing(text, v05, v07):
    assert normalize_text(text, "v0.5") == v05 and normalize_text(text, "v0.7") == v07
