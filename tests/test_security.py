"""No input file or run folder runs code: crafted YAML, checkpoints, pickles and shards are refused or ignored."""

import io
import json
import os
import pickle

import numpy as np
import pytest
import torch

from moss.errors import ConfigError
from moss.model import MossTTSD, MossTTSDConfig
from moss.training.run_checkpoint import model_from_checkpoint as load_model  # a run's .ckpt

TINY_BASE = {"kind": "random", "seed": 0, "config": MossTTSDConfig.tiny().to_dict("moss_ttsd")}


class Payload:
    """Unpickling this touches a marker file (the way a malicious pickle runs code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def tiny_run_checkpoint(run, **extra):
    """A run folder with a Lightning-style checkpoint of a tiny model, as a training run writes it."""
    model = MossTTSD.from_config(MossTTSDConfig.tiny(), seed=0)
    with torch.no_grad():
        model.model.language_model.norm.weight.add_(0.5)  # trained weights differ from the seeded init
    (run / "checkpoints").mkdir(parents=True)
    state = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"peft": None},
        "moss_base": TINY_BASE,
        **extra,
    }
    torch.save(state, run / "checkpoints" / "last.ckpt")
    return model, run / "checkpoints" / "last.ckpt"


def test_a_run_folder_yaml_with_targets_is_never_instantiated(tmp_path):
    marker = tmp_path / "pwned"
    model, ckpt = tiny_run_checkpoint(tmp_path / "run")
    (tmp_path / "run" / ".hydra").mkdir()
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text(
        "model:\n"
        "  _target_: shutil.copyfile\n"
        f"  src: {__file__}\n"
        f"  dst: {marker}\n"
        "  net:\n"
        "    _target_: numpy.load\n"
        f"    file: {tmp_path / 'evil.npy'}\n"
        "    allow_pickle: true\n"
        "tokenizer:\n"
        "  _target_: os.system\n"
        f"  command: touch {marker}\n"
    )
    loaded, tokenizer = load_model(ckpt)
    assert not marker.exists()
    ids = torch.randint(0, 300, (1, 5, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits)
    assert tokenizer.pad_token_id == 368


def test_a_checkpoint_holding_a_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    _, ckpt = tiny_run_checkpoint(tmp_path / "run", callbacks={"x": Payload(marker)})
    with pytest.raises(ConfigError, match="not a readable run checkpoint .*UnpicklingError"):
        load_model(ckpt)  # refused by weights_only=True, as one message
    assert not marker.exists()


@pytest.mark.parametrize(
    "base, peft",
    [
        ({"kind": "custom"}, None),
        ({"_target_": "os.system", "command": "true"}, None),
        (TINY_BASE, {"_target_": "os.system"}),
        (TINY_BASE, {"r": {"_target_": "x"}}),
    ],
)
def test_a_checkpoint_describing_anything_but_a_plain_model_is_refused(tmp_path, base, peft):
    _, ckpt = tiny_run_checkpoint(tmp_path / "run", moss_base=base, hyper_parameters={"peft": peft})
    with pytest.raises(ValueError, match="base model|LoRA setting"):
        load_model(ckpt)


def test_codec_checkpoint_and_shard_arrays_never_unpickle(tmp_path):
    from moss.codec.checkpoint import read_codec_state
    from moss.data.schema import SampleError, ShardSample

    marker = tmp_path / "pwned"
    torch.save({"generator": {"w": torch.zeros(1)}, "x": Payload(marker)}, tmp_path / "codec.ckpt")
    with pytest.raises(ValueError, match="not unpickled for safety"):
        read_codec_state(tmp_path / "codec.ckpt")
    buf = io.BytesIO()
    np.save(buf, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    raw = {"__key__": "k", "codes.npy": buf.getvalue(), "json": json.dumps({"text": "[S1]x"}).encode()}
    with pytest.raises(SampleError, match="must hold integers"):
        ShardSample.from_wds(raw)
    assert not marker.exists()


def test_legacy_pickles_with_code_are_refused(tmp_path):
    from data_pipelines.import_legacy import import_legacy

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    good = pickle.dumps({"input_ids": [[1] * 8] * 2, "labels": [[1] * 8] * 2})
    bad = pickle.dumps({"input_ids": [[1] * 8], "labels": [[1] * 8], "x": Payload(marker)})
    bomb = pickle.dumps({"input_ids": [[1] * 8], "labels": [[1] * 8], "system": os.system})
    evil.write_bytes(good + bad + bomb)
    np.save(tmp_path / "evil_metas.npy", np.array([[0, len(good), len(good) + len(bad)], [2, 1, 1], [0, 0, 0]]))
    result = import_legacy(evil, tmp_path / "out")
    assert result["imported"] == 1 and not marker.exists()
    assert all("refusing to load" in s["reason"] for s in result["skipped"])
