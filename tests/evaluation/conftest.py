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


def build_tiny_ctc(folder: Path) -> Path:
    """A character CTC model (wav2vec2 layout) with its processor: transformers' ASR pipeline loads it."""
    from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2ForCTC, Wav2Vec2Processor

    folder.mkdir(parents=True)
    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz'")}}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), word_delimiter_token="|")
    Wav2Vec2Processor(feature_extractor=_feature_extractor(), tokenizer=tokenizer).save_pretrained(folder)
    torch.manual_seed(0)
    Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=len(vocab), pad_token_id=0, **SMALL)).save_pretrained(folder)
    return folder


def build_tiny_speaker_model(folder: Path) -> Path:
    """An x-vector model (WavLM layout) with its feature extractor."""
    from transformers import WavLMConfig, WavLMForXVector

    torch.manual_seed(0)
    WavLMForXVector(WavLMConfig(tdnn_dim=(16,) * 5, xvector_output_dim=8, num_buckets=32, **SMALL)).save_pretrained(
        folder
    )
    _feature_extractor().save_pretrained(folder)
    return folder


def build_tiny_whisper(folder: Path) -> Path:
    """A Whisper (byte-level vocabulary, the special and timestamp tokens, alignment heads) with its processor."""
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(bytes_to_unicode().values())}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    end = "<|endoftext|>"
    tokenizer = WhisperTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token=end, bos_token=end, eos_token=end
    )
    specials = ["<|startoftranscript|>", "<|en|>", "<|zh|>", "<|translate|>", "<|transcribe|>", "<|notimestamps|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(1501)])
    tokenizer.pad_token = end
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer).save_pretrained(
        folder
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in [end, *specials]}
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_target_positions=448,  # as the real models: transformers 5.17 asks for 256 new tokens in long-form
        pad_token_id=ids[end],
        bos_token_id=ids[end],
        eos_token_id=ids[end],
        decoder_start_token_id=ids["<|startoftranscript|>"],
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    settings = dict(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        no_timestamps_token_id=ids["<|notimestamps|>"],
        max_length=20,
        is_multilingual=True,
        lang_to_id={"<|en|>": ids["<|en|>"], "<|zh|>": ids["<|zh|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        alignment_heads=[[0, 0], [0, 1]],  # what word timestamps are read from
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    generation = model.generation_config
    for key, value in settings.items():  # setattr: GenerationConfig.update skips keys it does not know
        setattr(generation, key, value)
    generation._from_model_config = False  # else it is rebuilt from the model config on load, without the above
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_asr(tmp_path_factory) -> Path:
    return build_tiny_ctc(tmp_path_factory.mktemp("judges") / "asr")


@pytest.fixture(scope="session")
def tiny_speaker_model(tmp_path_factory) -> Path:
    return build_tiny_speaker_model(tmp_path_factory.mktemp("judges") / "speaker")


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory) -> Path:
    return build_tiny_whisper(tmp_path_factory.mktemp("judges") / "whisper")
