"""The quality gate in a real (tiny, CPU) training run, and the config checks around its monitors."""

from __future__ import annotations

import csv
import json

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from moss.config_checks import validate
from moss.errors import ConfigError
from tests.conftest import compose_train


class GateValues(L.Callback):
    """Test helper (the DDP test's subprocess): each rank writes the gate metrics it logged at the last validation."""

    def __init__(self, path: str):
        self.path = path

    def on_validation_end(self, trainer, pl_module):
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        values = {k: v for k, v in values.items() if not k.startswith("val/loss")}
        with open(f"{self.path}/gate_values.rank{trainer.global_rank}.json", "w") as f:
            json.dump(values, f)


@pytest.fixture
def gate_settings(tmp_path, tiny_asr, tiny_speaker_model) -> list[str]:
    from moss.codec import XYTokenizer, XYTokenizerConfig

    config = XYTokenizerConfig.tiny()
    (tmp_path / "codec.yaml").write_text(yaml.safe_dump({"generator_params": config.params}))
    torch.save(XYTokenizer.from_config(config, seed=0).state_dict(), tmp_path / "codec.ckpt")
    rng = np.random.default_rng(0)
    for n in (1, 2):
        sf.write(tmp_path / f"s{n}.wav", 0.1 * rng.standard_normal(16000).astype(np.float32), 16000)
    script = {
        "text": "[S1]good morning[S2]morning to you",
        "prompt_audio_speaker1": "s1.wav",
        "prompt_audio_speaker2": "s2.wav",
        "expected_seconds": 1.5,
    }
    (tmp_path / "heldout.jsonl").write_text(json.dumps(script) + "\n")
    gate = "callbacks.quality_gate"
    return [
        "callbacks=quality_gate",
        f"{gate}.scripts={tmp_path / 'heldout.jsonl'}",
        f"{gate}.codec_config={tmp_path / 'codec.yaml'}",
        f"{gate}.codec_checkpoint={tmp_path / 'codec.ckpt'}",
        f"{gate}.asr_model={tiny_asr}",
        f"{gate}.speaker_model={tiny_speaker_model}",
        f"{gate}.max_seconds=2",
    ]


@pytest.mark.slow  # a training run with the gate (5 s)
def test_gate_metrics_are_logged_at_each_validation_and_can_choose_the_best_checkpoint(tmp_path, gate_settings):
    from train import train

    cfg = compose_train(
        tmp_path,
        [
            *gate_settings,
            "debug=fast_dev_run",  # 4 steps, validation at steps 2 and 4
            "data.num_workers=0",
            "callbacks.best_checkpoint.monitor=val/cer",
            "callbacks.early_stopping.monitor=val/switch_acc",
            "callbacks.early_stopping.mode=max",
            "callbacks.early_stopping.patience=5",
        ],
    )
    validate(cfg)
    result = train(cfg)
    out = result["output_dir"]
    reports = sorted(p.name for p in (out / "quality").iterdir())
    assert reports == ["step_0000002.json", "step_0000004.json"]
    last = json.loads((out / "quality" / "step_0000004.json").read_text())
    logged = result["trainer"].callback_metrics
    for name in ("cer", "wer", "sim_s1", "sim_s2", "switch_acc", "duration_ratio", "hit_limit_rate"):
        expected = last["aggregate"][name]
        worst = {"sim_s1": -1.0, "sim_s2": -1.0, "switch_acc": 0.0}.get(name)
        assert float(logged[f"val/{name}"]) == pytest.approx(expected if expected is not None else worst), name
    rows = list(csv.DictReader(open(next(out.rglob("metrics.csv")))))
    assert [int(r["step"]) for r in rows if r.get("val/cer")] == [1, 3]  # Lightning logs validation at step - 1
    assert (out / "checkpoints" / "best.ckpt").is_file()
    assert torch.load(out / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")  # readable
    # At export: the weights the run started from against the export, on the same scripts and seed.
    report = json.loads((out / "export" / "eval_report.json").read_text())
    assert set(report["checkpoints"]) == {"base", "tuned"} and [h["step"] for h in report["history"]] == [2, 4]
    for metric, values in report["comparison"].items():
        assert values["verdict"] in ("better", "worse", "same"), metric
    page = (out / "export" / "eval_report.html").read_text()
    for label in ("base", "tuned"):
        assert f"src='eval_audio/{label}_0000.wav'" in page or "generated no audio" in page
        assert report["checkpoints"][label]["items"][0]["script"] == "[S1]good morning[S2]morning to you"
    assert page.count("<polyline") >= 2  # the gate's metrics over the two validations
    assert "eval_report.html" in result["exported"]["report"].name


def test_a_gate_metric_monitor_needs_the_gate_at_every_validation(tmp_path, gate_settings):
    with pytest.raises(ConfigError, match=r"monitor=val/cer is logged by the quality gate, which is off"):
        validate(compose_train(tmp_path, ["callbacks.best_checkpoint.monitor=val/cer"]))
    every_other = [*gate_settings, "callbacks.quality_gate.every_n_validations=2"]
    with pytest.raises(ConfigError, match=r"early_stopping.monitor=val/sim_s1 must be measured at every validation"):
        validate(compose_train(tmp_path, [*every_other, "callbacks.early_stopping.monitor=val/sim_s1"]))
    with pytest.raises(ConfigError, match=r"quality_gate runs at each validation, and this run has no validation"):
        validate(compose_train(tmp_path, [*gate_settings, "data.val_shards=null"]))
    validate(compose_train(tmp_path, [*gate_settings, "callbacks.best_checkpoint.monitor=val/switch_acc"]))


def test_a_model_that_ends_a_script_at_once_scores_worst_instead_of_stopping_the_run(tmp_path, gate_settings):
    from types import SimpleNamespace

    from hydra.utils import instantiate

    from moss.evaluation.speech_models import Transcript

    gate = instantiate(compose_train(tmp_path, gate_settings).callbacks.quality_gate)
    gate._codec = SimpleNamespace(output_sample_rate=24000)
    gate._judges = (lambda clips, rate: [Transcript("x", []) for _ in clips], None)

    def ends_at_once(items, write):  # what an early model does: the end token first, no audio
        for item in items:
            write(item, torch.zeros(0))

    report, waves = gate._measure(ends_at_once)
    assert [len(w) for w in waves.values()] == [0]
    assert report["aggregate"]["cer"] == 1.0 and report["items"][0]["transcript"] == ""


@pytest.mark.slow  # a 2-process DDP run with the gate at two validations (about 40 s)
def test_under_ddp_rank_0_measures_and_both_ranks_log_the_same_values(tmp_path, gate_settings):
    import subprocess
    import sys

    from tests.conftest import REPO

    ddp = ["trainer.devices=2", "strategy=ddp", "data.num_workers=1", f"paths.root={tmp_path}", "name=gated"]
    spy = "+callbacks.spy={_target_: tests.evaluation.test_quality_gate.GateValues, path: '" + str(tmp_path) + "'}"
    done = subprocess.run(
        [
            sys.executable,
            "train.py",
            *gate_settings,
            *ddp,
            spy,
            "debug=fast_dev_run",
            "callbacks.best_checkpoint.monitor=val/cer",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"gate_values.rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and "val/cer" in ranks[0]  # the monitor every rank's ModelCheckpoint compares
    assert sorted(p.name for p in (tmp_path / "gated" / "quality").iterdir()) == [
        "step_0000002.json",
        "step_0000004.json",
    ]
    assert (tmp_path / "gated" / "export" / "eval_report.html").is_file()


def test_the_every_n_schedule_survives_a_resume(tmp_path, gate_settings):
    from hydra.utils import instantiate

    cfg = compose_train(tmp_path, [*gate_settings, "callbacks.quality_gate.every_n_validations=3"])
    gate, resumed = instantiate(cfg.callbacks.quality_gate), instantiate(cfg.callbacks.quality_gate)
    gate.validations = 4
    resumed.load_state_dict(torch.load(_saved(tmp_path, gate.state_dict()), weights_only=True))
    assert resumed.validations == 4  # the 7th validation is measured after the resume too, not the 3rd


def _saved(folder, state):
    torch.save(state, folder / "gate.pt")  # as Lightning keeps a callback's state in the .ckpt
    return folder / "gate.pt"
