"""Checkpoint I/O: our saved folders reload to the same logits in every layout; bad folders fail clearly."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from moss.model import MossTTSD, MossTTSDConfig
from moss.model.folder import weight_files
from tests.conftest import random_batch, requires_golden


def logits_of(model, ids):
    with torch.no_grad():
        return model.eval()(ids, output_logits=True).logits


@pytest.mark.parametrize("layout", ["original", "moss_ttsd"])
def test_save_load_round_trip(tiny_model, tmp_path, layout):
    tiny_model.save_pretrained(tmp_path, layout=layout)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert not any(k.startswith("lm_heads") for k in keys)  # tied heads are not stored, like the original
    assert "model.language_model.embed_tokens.weight" in keys  # kept for the original loader
    again = MossTTSD.from_pretrained(tmp_path)
    ids, _ = random_batch(tiny_model.config)
    for a, b in zip(logits_of(tiny_model, ids), logits_of(again, ids), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_sharded_and_bin_checkpoints_load(tiny_model, tmp_path):
    ids, _ = random_batch(tiny_model.config)
    reference = logits_of(tiny_model, ids)
    sharded = tmp_path / "sharded"
    tiny_model.save_pretrained(sharded, max_shard_size=200_000)
    assert len(weight_files(sharded)) > 1 and (sharded / "model.safetensors.index.json").is_file()
    binary = tmp_path / "bin"
    tiny_model.config.save_pretrained(binary)
    torch.save(tiny_model.state_dict(), binary / "pytorch_model.bin")  # includes tied lm_heads copies
    for folder in (sharded, binary):
        for a, b in zip(reference, logits_of(MossTTSD.from_pretrained(folder), ids), strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    mask = os.umask(0)
    os.umask(mask)
    assert {stat.S_IMODE(f.stat().st_mode) for f in weight_files(sharded)} == {0o666 & ~mask}
    tiny_model.save_pretrained(sharded)  # a second export into the folder replaces the shards and the index
    assert sorted(p.name for p in sharded.iterdir()) == ["config.json", "model.safetensors"]


@requires_golden
def test_resaving_the_original_checkpoint_keeps_its_key_set(golden, tmp_path):
    model = MossTTSD.from_pretrained(golden / "backbone" / "model")
    model.save_pretrained(tmp_path)
    original = json.loads((golden / "backbone" / "summary.json").read_text())["saved_keys"]
    assert sorted(load_file(tmp_path / "model.safetensors")) == sorted(original)


def test_bf16_load(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    model = MossTTSD.from_pretrained(tmp_path, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    saved = dict(tiny_model.named_parameters())
    for name, param in model.named_parameters():  # the values are the saved ones, rounded once to bf16
        assert torch.equal(param, saved[name].detach().to(torch.bfloat16)), name


def test_missing_weights_are_named(tiny_model, tmp_path):
    tiny_model.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights in .*expected one of"):
        MossTTSD.from_pretrained(tmp_path)


def test_missing_shard_is_named(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path, max_shard_size=200_000)
    next(tmp_path.glob("model-00001-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="shards that are missing"):
        MossTTSD.from_pretrained(tmp_path)


def test_foreign_or_mismatched_weights_fail(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.extra.weight"] = torch.zeros(2)
    del state["model.language_model.norm.weight"]
    from safetensors.torch import save_file

    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=r"missing \['model.language_model.norm.weight'\].*unexpected \['model.extra"):
        MossTTSD.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not have the shapes config.json gives"):
        MossTTSD.from_pretrained(tmp_path)


def test_wrong_channel_count_and_unknown_attention(tiny_model, tmp_path):
    with pytest.raises(ValueError, match=r"expected input_ids \[B, T, 8\].*got \(2, 5, 9\)"):
        tiny_model(torch.zeros(2, 5, 9, dtype=torch.long))
    tiny_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unknown attention implementation 'flash3'.*model.attn_implementation"):
        MossTTSD.from_pretrained(tmp_path, attn_implementation="flash3")


def test_export_writes_the_original_generation_config_and_infer_reads_it(tiny_model, tmp_path):
    """The export's generation_config.json has the original's per-channel form; loading it gives back the same
    sampling; a base's own file is carried over; transformers' GenerationConfig reads it as the original does."""
    from transformers import GenerationConfig as HFGenerationConfig

    from moss.generation import DEFAULT_SAMPLING, ChannelSampling, GenerationConfig, generation_for
    from moss.training.export import export_hf

    per_channel = [{"do_sample": c > 0, "temperature": 0.7 + c / 10, "top_k": 20 + c} for c in range(8)]
    export_hf(tiny_model, tmp_path / "a", sampling=per_channel)
    written = json.loads((tmp_path / "a" / "generation_config.json").read_text())
    assert written["do_samples"] == [False] + [True] * 7 and written["max_new_tokens"] == 12000
    assert written["layers"][3] == {"temperature": pytest.approx(1.0), "top_k": 23}
    assert written["eos_token_id"] == tiny_model.config.backbone["eos_token_id"]
    hf = HFGenerationConfig.from_pretrained(tmp_path / "a")  # how the original loader reads it
    assert hf.do_samples == written["do_samples"] and hf.layers == written["layers"]
    loaded = MossTTSD.from_pretrained(tmp_path / "a")
    expected = GenerationConfig([ChannelSampling(**c) for c in per_channel], 12000, None)
    assert generation_for(loaded.generation_config) == expected

    export_hf(loaded, tmp_path / "b")  # no sampling given: the base's file is kept
    assert json.loads((tmp_path / "b" / "generation_config.json").read_text()) == written
    tiny_model.generation_config = None
    export_hf(tiny_model, tmp_path / "c")  # a model without one: OpenMOSS' client defaults
    defaults = generation_for(MossTTSD.from_pretrained(tmp_path / "c").generation_config)
    assert defaults.channels == [ChannelSampling(**DEFAULT_SAMPLING)] * 8
    assert generation_for(loaded.generation_config, {"do_sample": False}, 50).channels == [ChannelSampling()] * 8


def test_model_path_may_be_a_hub_id(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    import huggingface_hub

    from moss.errors import ConfigError
    from moss.model.checkpoint import load_model, resolve_model_path

    tiny_model.save_pretrained(tmp_path / "snapshot")
    tiny_tokenizer.save_pretrained(tmp_path / "snapshot")
    asked = []

    def fake_download(repo_id, allow_patterns):
        asked.append((repo_id, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    model, _ = load_model("someone/MOSS-TTSD-tiny")
    assert asked[0][0] == "someone/MOSS-TTSD-tiny" and "*.safetensors" in asked[0][1]
    assert model.config.hidden_size == tiny_model.config.hidden_size
    # Local paths, existing or not, are never sent to the Hub.
    assert resolve_model_path(tmp_path / "snapshot") == str(tmp_path / "snapshot")
    assert resolve_model_path("runs/tiny/export") == "runs/tiny/export" and len(asked) == 1
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="not a local folder, and fetching it from the Hugging Face Hub failed"):
        resolve_model_path("nobody-here/no-such-model-3f9c")


def test_exports_load_with_transformers_auto_classes(tiny_model, tmp_path):
    """The port layout (model_type moss_ttsd) is registered with AutoConfig/AutoModel: plain transformers loads it."""
    from transformers import AutoConfig, AutoModel

    tiny_model.save_pretrained(tmp_path, layout="moss_ttsd")
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MossTTSDConfig)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, MossTTSD) and loaded.lm_heads[5].weight is loaded.model.embedding_list[5].weight
    ids = torch.randint(0, 300, (2, 7, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, output_logits=True).logits, tiny_model(ids, output_logits=True).logits)


def test_a_checkpoint_without_the_unused_token_table_loads_it_as_zeros(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.language_model.embed_tokens.weight"]  # as the original's checkpoints may lack it
    from safetensors.torch import save_file

    save_file(state, tmp_path / "model.safetensors")
    loaded = MossTTSD.from_pretrained(tmp_path)
    assert not loaded.decoder.embed_tokens.weight.any()


def test_an_empty_model_given_a_state_computes_what_its_source_does():
    """`MossTTSD.empty` (FSDP export's unsharded copy) allocates without a random init; its computed buffers (the
    rotary frequencies) are real and its heads tied, so a loaded state is the whole model."""
    source = MossTTSD.from_config(MossTTSDConfig.tiny(), seed=0).eval()
    copy = MossTTSD.empty(source.config).eval()
    copy.load_state_dict(source.state_dict())
    rotary = (m.model.language_model.rotary_emb.inv_freq for m in (source, copy))
    torch.testing.assert_close(*rotary, rtol=0, atol=0)
    assert sum(p.numel() for p in copy.parameters()) == sum(p.numel() for p in source.parameters())  # tied
    ids = torch.randint(0, 300, (2, 12, 8))
    with torch.no_grad():
        torch.testing.assert_close(copy(input_ids=ids).logits, source(input_ids=ids).logits, rtol=0, atol=0)
