"""Tiny random metric models (an ASR model and a speaker embedder) built from transformers configs.

Their outputs mean nothing; they exercise the real loading, batching and scoring code on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SMALL = dict(
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    conv_dim=(16,) * 7,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
)


def _feature_extractor():
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True, return_attention_mask=True)


@pytest.fixture(scope="session")
def tiny_asr(tmp_path_factory) -> Path:
    """A character CTC model (wav2vec2 layout) with its processor: transformers' ASR pipeline loads it."""
    from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2ForCTC, Wav2Vec2Processor

    folder = tmp_path_factory.mktemp("judges") / "asr"
    folder.mkdir()
    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz'")}}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), word_delimiter_token="|")
    Wav2Vec2Processor(feature_extractor=_feature_extractor(), tokenizer=tokenizer).save_pretrained(folder)
    torch.manual_seed(0)
    Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=len(vocab), pad_token_id=0, **SMALL)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_speaker_model(tmp_path_factory) -> Path:
    """An x-vector model (WavLM layout) with its feature extractor."""
    from transformers import WavLMConfig, WavLMForXVector

    folder = tmp_path_factory.mktemp("judges") / "speaker"
    torch.manual_seed(0)
    WavLMForXVector(WavLMConfig(tdnn_dim=(16,) * 5, xvector_output_dim=8, num_buckets=32, **SMALL)).save_pretrained(
        folder
    )
    _feature_extractor().save_pretrained(folder)
    return folder
