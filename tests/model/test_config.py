"""MossTTSDConfig reads both published config.json forms and rejects other models with the fix."""

import json

import pytest
import torch

from moss.model import ConfigError, MossTTSD, MossTTSDConfig
from tests.conftest import requires_golden

V05_PARAMS_WITH_TIED_HEADS = 2_049_551_360  # 28 layers + two 152697-row tables + 7 audio tables + final norm


@requires_golden
def test_reads_original_form(golden):
    cfg = MossTTSDConfig.from_pretrained(golden / "backbone" / "model")
    assert cfg.channels == 8 and cfg.speech_vocab_size == 1025 and cfg.speech_pad_token == 1024
    assert cfg.speech_token_range == (384, 1408) and cfg.speech_offset == 384
    assert cfg.speech_eos_token == 1413  # tiny: the eos id; real: the hard-coded 152694
    assert cfg.qwen3_config().rope_parameters["rope_theta"] == 1e6


def test_port_form_round_trip(tmp_path):
    cfg = MossTTSDConfig.v05()
    cfg.save_pretrained(tmp_path, layout="moss_ttsd")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "moss_ttsd" and data["speech_eos_token"] == 152694
    again = MossTTSDConfig.from_pretrained(tmp_path)
    assert again == cfg and again.speech_eos_token == 152694


def test_original_form_omits_the_hard_coded_eos(tmp_path):
    MossTTSDConfig.v05().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "qwen3" and data["architectures"] == ["AsteroidTTSInstruct"]
    assert "speech_eos_token" not in data and data["speech_token_range"] == [151665, 152689]
    assert MossTTSDConfig.from_pretrained(tmp_path).speech_eos_token == 152694


def test_real_v05_architecture_builds_with_the_published_parameter_count():
    with torch.device("meta"):
        model = MossTTSD(MossTTSDConfig.v05())
    assert sum(p.numel() for p in model.parameters()) == V05_PARAMS_WITH_TIED_HEADS
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["model.embedding_list.0.weight"] == (152697, 2048)
    assert shapes["model.embedding_list.7.weight"] == (1025, 2048)
    assert shapes["model.language_model.layers.27.self_attn.k_proj.weight"] == (1024, 2048)
    assert shapes["model.language_model.layers.0.mlp.down_proj.weight"] == (2048, 6144)
    assert model.lm_heads[0].weight is model.model.embedding_list[0].weight


@pytest.mark.parametrize(
    "data, match",
    [
        ({"model_type": "llama", "vocab_size": 10}, "not a MOSS-TTSD config"),
        (
            {
                "model_type": "qwen3",
                "vocab_size": 151936,
                "hidden_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 1,
            },
            "plain language model",
        ),
        ({"model_type": "qwen3", "channels": 8, "hidden_size": 8}, "vocab_size is required"),
        (
            {
                "model_type": "qwen3",
                "channels": 8,
                "vocab_size": 100,
                "hidden_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 1,
            },
            "exceeds vocab_size",
        ),
    ],
)
def test_other_models_are_rejected_with_the_reason(tmp_path, data, match):
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=match):
        MossTTSDConfig.from_pretrained(tmp_path)


def test_missing_config_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path must be a folder holding config.json"):
        MossTTSDConfig.from_pretrained(tmp_path)
