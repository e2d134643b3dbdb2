"""The prompt template reproduces the original fine-tuning grids (golden/data, no normalisation)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moss.text import PromptBuilder
from tests.conftest import requires_golden


@requires_golden
def test_reproduces_original_grids(golden):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(golden / "tokenizer")
    grids = load_file(golden / "data" / "preprocess_raw" / "grids.safetensors")
    items = [json.loads(line) for line in (golden / "data" / "train.jsonl").read_text().splitlines()]
    codes = [grids[f"fake_codec_call{k}_codes"].T.numpy() for k in range(3)]
    build = PromptBuilder(tokenizer, speech_offset=151665)
    a = build(items[0]["full_transcript"], codes[0])
    b = build(items[1]["text"], codes[2], ref_text=items[1]["reference_text"], ref_codes=codes[1])
    for i, (ids, labels) in enumerate((a, b)):
        assert torch.equal(torch.from_numpy(ids), grids[f"sample{i}_input_ids"])
        assert torch.equal(torch.from_numpy(labels), grids[f"sample{i}_labels"])


def test_tiny_tokenizer_has_the_real_layout(tiny_tokenizer):
    ids = {
        t: tiny_tokenizer.convert_tokens_to_ids(t)
        for t in ("<|endoftext|>", "<|begin_of_style|>", "<|end_of_speech|>", "<speaker2>")
    }
    assert ids == {"<|endoftext|>": 368, "<|begin_of_style|>": 1408, "<|end_of_speech|>": 1413, "<speaker2>": 1415}
    assert len(tiny_tokenizer) == 1416 and tiny_tokenizer.pad_token_id == 368
    text = "<speaker1>hello there<speaker2>fine"
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text
    assert max(tiny_tokenizer.encode("any text, even 你好")) < 368  # text never lands on special ids


def test_codec_with_fewer_codebooks_is_padded(tiny_tokenizer):
    build = PromptBuilder(tiny_tokenizer, speech_offset=384)
    ids, labels = build("[S1]hello", np.array([[5, 6], [7, 8]]))
    audio = ids[-3:-1]
    assert audio[:, 0].tolist() == [389, 391] and audio[:, 1].tolist() == [6, 8] and (audio[:, 2:] == 1024).all()
    assert labels[-1].tolist() == [1413] + [-100] * 7


def test_tokenizer_without_control_tokens_is_rejected():
    from transformers import AutoTokenizer  # noqa: F401

    class Plain:
        unk_token_id = 0

        def convert_tokens_to_ids(self, token):
            return 0

    with pytest.raises(ValueError, match="lacks the MOSS-TTSD control tokens"):
        PromptBuilder(Plain(), speech_offset=384)
