"""Model folders with broken files: each mistake is one ConfigError naming the file and what is wrong, found
before anything large is built (a config.json claiming far more layers than its weights hold never builds them)."""

from __future__ import annotations

import json
import time

import pytest

from moss.errors import ConfigError
from moss.model import MossTTSD, MossTTSDConfig
from moss.model.checkpoint import load_model
from moss.model.lora import apply_lora
from moss.training.export import save_adapter


@pytest.fixture
def folder(tmp_path, tiny_tokenizer):
    path = tmp_path / "model"
    MossTTSD.from_config(MossTTSDConfig.tiny(), seed=0).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def edit_json(file, **changes):
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


CONFIG_MISTAKES = [
    ({"hidden_size": "64"}, "hidden_size='64' is refused: input should be a valid integer"),
    ({"num_hidden_layers": 100_000}, "num_hidden_layers=100000 is refused: input should be less than or equal to 1024"),
    ({"num_hidden_layers": 0}, "num_hidden_layers=0 is refused"),
    ({"channels": True}, "channels=True is refused"),
    ({"vocab_size": -5}, "vocab_size=-5 is refused"),
    ({"rms_norm_eps": "NaN"}, "rms_norm_eps='NaN' is refused"),
    ({"speech_token_range": [384]}, "speech_token_range=[384] is refused"),
    ({"num_key_value_heads": 3}, "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ({"pad_token_id": 99_999}, "pad_token_id=99999 is outside vocab_size=1416"),
]


@pytest.mark.parametrize(("changes", "message"), CONFIG_MISTAKES)
def test_config_json_fields_out_of_bounds(folder, changes, message):
    edit_json(folder / "config.json", **changes)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_model(folder)


def test_sizes_that_do_not_match_the_weights_are_refused_before_the_model_is_built(folder):
    edit_json(folder / "config.json", num_hidden_layers=900)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="num_hidden_layers=900, but the weights hold 2 layers"):
        load_model(folder)
    assert time.perf_counter() - start < 5  # refused from the file headers, not after building 900 layers
    edit_json(folder / "config.json", num_hidden_layers=2, intermediate_size=256)
    with pytest.raises(ConfigError, match=r"do not have the shapes config.json gives .*mlp.down_proj.weight"):
        load_model(folder)


@pytest.mark.parametrize(
    ("file", "text", "message"),
    [
        ("config.json", "{not json", "config.json is not a readable JSON file"),
        ("config.json", "[1, 2]", "config.json must hold a JSON object"),
        ("tokenizer.json", "{broken", "the tokenizer in .* does not load"),
        ("generation_config.json", "{broken", "generation_config.json is not a readable JSON file"),
        ("generation_config.json", '{"temperature": -1}', r"temperature=-1 is refused"),
        ("generation_config.json", '{"do_samples": [true], "layers": [{}, {}]}', "do_samples has 1 entries, layers 2"),
    ],
)
def test_broken_files_of_a_model_folder(folder, file, text, message):
    (folder / file).write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_model(folder)


def test_a_broken_weights_index(folder):
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    save_file(state, folder / "part-1.safetensors")
    index = folder / "model.safetensors.index.json"
    for text, message in [
        ("{broken", "index.json is not a readable JSON file"),
        ('{"weight_map": []}', "has no weight_map"),
        (json.dumps({"weight_map": dict.fromkeys(state, "../part-1.safetensors")}), "is not a file name in the folder"),
    ]:
        index.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_model(folder)
    good = {"metadata": {"total_size": 0}, "weight_map": dict.fromkeys(state, "part-1.safetensors")}
    index.write_text(json.dumps(good))
    assert load_model(folder)[0] is not None  # the well-formed index loads


def test_a_broken_adapter_config(folder, tmp_path):
    adapter = tmp_path / "adapter"
    save_adapter(apply_lora(MossTTSD.from_pretrained(folder), r=4), adapter)
    edit_json(adapter / "adapter_config.json", base_model_name_or_path=str(folder))
    assert load_model(adapter)[0] is not None
    for changes, message in [({"r": -4}, "r=-4 is refused"), ({"peft_type": "IA3"}, "peft_type='IA3' is refused")]:
        original = (adapter / "adapter_config.json").read_text()
        edit_json(adapter / "adapter_config.json", **changes)
        with pytest.raises(ConfigError, match=message):
            load_model(adapter)
        (adapter / "adapter_config.json").write_text(original)
    (adapter / "adapter_config.json").write_text("{")
    with pytest.raises(ConfigError, match="adapter_config.json is not a readable JSON file"):
        load_model(adapter)
