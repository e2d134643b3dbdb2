"""The commands as a user meets them: one message and exit 2 for a mistake, nothing written by a refused command,
Ctrl-C that saves, a reused run name that is refused, validation with more ranks than validation shards."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import hydra
import pytest
import torch

from moss.cli import command, quote_values, slot_additions_as_choices
from moss.config_checks import validate
from moss.errors import ConfigError
from tests.conftest import REPO, compose_train
from train import train

FAST = ["data.num_workers=0", "export.enabled=false"]


def run(args: list[str], cwd: Path, timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    """A command as a user types it, from `cwd` (the repository's scripts by absolute path)."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **kwargs
    )


def snapshot(*folders: Path) -> dict[str, int]:
    """Every file and folder under `folders` with its modification time."""
    return {str(p): p.stat().st_mtime_ns for folder in folders for p in folder.rglob("*")}


@pytest.mark.slow
def test_a_config_mistake_is_one_message_with_every_fix_exit_2_and_writes_nothing(tmp_path):
    before = snapshot(tmp_path)
    done = run(
        [
            str(REPO / "train.py"),
            "experiment=lora_v05",
            "model.path=/no/such/model",
            "data.train_shards=/no/such/*.tar",
            "trainer.devices=8",
            "+trainer.max_step=5",
            f"paths.root={tmp_path / 'runs'}",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.startswith("error: invalid training config")
    for fix in (
        "model.path=/no/such/model has no config.json",
        "no shards match data.train_shards='/no/such/*.tar'",
        "did you mean trainer.max_steps?",
        "add trainer.accelerator=cpu" if not torch.cuda.is_available() else "trainer.devices=8 but this machine",
    ):
        assert fix in done.stderr, done.stderr
    assert snapshot(tmp_path) == before  # no run directory, no .hydra/, no log file


def test_unknown_settings_name_the_closest_real_key(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.max_step is not a setting of lightning.Trainer; did you mean"):
        validate(compose_train(tmp_path, ["+trainer.max_step=5"]))
    with pytest.raises(ConfigError, match=r"data.num_worker is not a setting .*did you mean data.num_workers\?"):
        validate(compose_train(tmp_path, ["+data.num_worker=2"]))
    with pytest.raises(ConfigError, match=r"callbacks.progress.interval is not .*callbacks.progress.interval_s\?"):
        validate(compose_train(tmp_path, ["+callbacks.progress.interval=2"]))


@pytest.mark.slow
def test_a_reused_run_name_is_refused_and_the_earlier_run_kept(tmp_path):
    train(compose_train(tmp_path, ["debug=fast_dev_run", *FAST]))
    out = tmp_path / "out"
    before = snapshot(out)
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoints/, logs/\); continue it with resume=auto"):
        train(compose_train(tmp_path, ["debug=fast_dev_run", *FAST]))
    assert snapshot(out) == before
    resumed = train(compose_train(tmp_path, ["debug=fast_dev_run", *FAST, "resume=auto", "trainer.max_steps=6"]))
    assert resumed["trainer"].global_step == 6


@pytest.mark.parametrize(
    "value, hydra",
    [
        ("[S1]Hello, welcome back.[S2]Thanks!", "'[S1]Hello, welcome back.[S2]Thanks!'"),
        ("it's a \\ path\\", "'it\\'s a \\ path\\\\'"),
        ("'already quoted'", "'already quoted'"),
    ],
)
def test_free_text_overrides_are_quoted_for_hydra(value, hydra):
    assert quote_values(["infer.py", f"text={value}", "seed=1"], ("text",)) == ["infer.py", f"text={hydra}", "seed=1"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["infer.py"], "checkpoint is required; set checkpoint="),
        (["infer.py", "checkpoint=/nope", "output_dir=out", "text=[S1]Hi."], "checkpoint=/nope does not exist"),
        (["-m", "data_pipelines.preprocess", "inputs=[/nope.jsonl]", "output_dir=shards"], "/nope.jsonl is not a file"),
        (["-m", "data_pipelines.import_legacy", "input=/nope.pkl", "output_dir=shards"], "input=/nope.pkl is not a"),
        (["-m", "data_pipelines.inspect_shards", "dir=/nope"], "no manifest*.json in /nope"),
        (["export.py", "checkpoint=/nope", "output_dir=exported"], "checkpoint=/nope is neither"),
        (["evaluate.py", "checkpoint=/nope", "input=/nope.jsonl", "output_dir=eval"], "checkpoint=/nope does not"),
        (["evaluate.py", "checkpoint=/nope", "text=x", "output_dir=eval", "asr_model=a b"], "asr_model=a b is neither"),
        (["app.py", "checkpoint=/nope", "codec=tiny"], "checkpoint=/nope does not exist"),
        (["app.py", "checkpoint=/nope", "port=70000"], "port=70000 must be a port number"),
    ],
)
def test_every_tool_reports_a_usage_error_in_one_message_and_writes_nothing(tmp_path, args, message):
    script = [str(REPO / args[0]), *args[1:]] if args[0].endswith(".py") else args
    done = run(script, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr and message in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_ctrl_c_saves_at_a_step_boundary_and_resume_auto_continues(tmp_path):
    command = [
        str(REPO / "train.py"),
        f"paths.root={tmp_path / 'runs'}",
        "trainer.max_steps=5000",
        "callbacks.progress.interval_s=0",  # a progress line every step: the log shows training has started
        "data.num_workers=2",  # the workers get the terminal's Ctrl-C too
    ]
    process = subprocess.Popen(
        [sys.executable, *command],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    for line in process.stdout:
        if "step 20/5000" in line:
            break
    os.killpg(process.pid, signal.SIGINT)  # the whole process group, as a terminal does
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Ctrl-C: saving a checkpoint" in err and "Traceback" not in err
    stopped = next(line for line in out.splitlines() if line.startswith("stopped by SIGINT at step"))
    step = int(stopped.split("at step ")[1].split()[0])
    run_dir = tmp_path / "runs" / "tiny"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step
    assert not (run_dir / "export").exists()  # a stopped run is exported when it finishes

    done = run([*command[:2], f"trainer.max_steps={step + 3}", "data.num_workers=2", "resume=auto"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"resume=auto: continuing from {run_dir / 'checkpoints' / 'last.ckpt'}" in done.stdout
    assert f"resumed at step {step} of {step + 3}" in done.stdout
    assert (run_dir / "export" / "model.safetensors").is_file()


@pytest.mark.slow
def test_validation_with_more_ranks_than_validation_shards_is_the_single_process_loss(tmp_path):
    """3 ranks, 2 validation shards: one rank has none. Its placeholders add nothing; the loss is exact."""
    overrides = ["strategy=ddp", "trainer.devices=3", "trainer.max_steps=2", "trainer.val_check_interval=2"]
    started = time.monotonic()
    done = run([str(REPO / "train.py"), f"paths.root={tmp_path / 'runs'}", *overrides], cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - started < 300
    run_dir = tmp_path / "runs" / "tiny"
    rows = [r for r in csv.DictReader(open(run_dir / "logs" / "metrics.csv")) if r.get("val/loss")]
    logged = float(rows[-1]["val/loss"])

    import lightning as L
    from hydra.utils import instantiate

    cfg = compose_train(tmp_path, [f"paths.root={tmp_path / 'runs'}", "data.num_workers=0"])
    module = instantiate(cfg.model)
    data = instantiate(cfg.data, _partial_=True)(tokenizer=instantiate(cfg.tokenizer), model_config=module.config)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    [result] = trainer.validate(
        module, datamodule=data, ckpt_path=run_dir / "checkpoints" / "last.ckpt", weights_only=True
    )
    assert result["val/loss"] == pytest.approx(logged, rel=1e-5)


@hydra.main(version_base="1.3", config_path=str(REPO / "conf"), config_name="train")
@command
def train_composed(cfg) -> None:
    """train.py's entry point up to its task: Hydra composes conf/train.yaml, the task only says it started."""
    print("composed")


def command_line(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """A train.py command line through `cli.run` in this process: exit status, stdout, stderr."""
    import moss.cli

    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    monkeypatch.setattr(moss.cli, "_task_started", False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    try:
        moss.cli.run(train_composed, REPO / "conf", "train")
        code = 0
    except SystemExit as stop:
        code = stop.code
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_hydra_composes_once_and_its_refusals_are_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """No pre-composition: Hydra's own refusals (unknown key, unknown option, syntax) are worded by `cli.run`."""
    root = [f"paths.root={tmp_path / 'runs'}"]
    (tmp_path / "a-file").write_text("x")  # a folder setting that names a file: Hydra cannot make the run folder
    cases = [
        (
            ["trainer.max_step=5", "data.num_worker=1"],
            [
                "error: unknown settings:",
                "  - trainer.max_step is not a setting of this command; did you mean trainer.max_steps=...?",
                "  - data.num_worker is not a setting of this command; did you mean data.num_workers=...?",
            ],
        ),
        (
            ["experiment=lora_v5"],
            [
                "error: experiment=lora_v5 is not an option of conf/experiment/; did you mean experiment=lora_v05? "
                "(the options: full_v05, lora_v05, lora_v07, tiny_lora)"
            ],
        ),
        (["trainer.max_steps=["], None),
    ]
    for args, lines in cases:
        code, _, err = command_line([*args, *root], monkeypatch, capsys)
        assert code == 2 and "Traceback" not in err, err
        if lines is None:
            assert err.startswith("error: trainer.max_steps=[: ") and err.count("\n") == 1
        else:
            assert err.splitlines() == lines
    assert not (tmp_path / "runs").exists()
    code, _, err = command_line([f"paths.root={tmp_path / 'a-file'}"], monkeypatch, capsys)
    assert code == 2 and err.splitlines() == [
        f"error: paths.root={tmp_path / 'a-file'} is a file, not a folder; give a folder path "
        "(it is created if missing)"
    ], err
    # valid overrides, `+experiment=` (lightning-hydra-template's spelling) and deletions compose as Hydra composes
    ok = ["+experiment=tiny_lora", "debug=fast_dev_run", "model.optimizer.lr=3e-3", "~callbacks.progress", "++seed=3"]
    code, out, err = command_line([*ok, *root, "--cfg", "job"], monkeypatch, capsys)
    assert code == 0, err
    assert "lr: 0.003" in out and "seed: 3" in out and "progress:" not in out
    code, out, err = command_line([*ok, *root], monkeypatch, capsys)  # and the task runs, with Hydra's own env
    assert code == 0 and out.strip().endswith("composed") and os.environ.get("HYDRA_FULL_ERROR") is None, err


def test_a_plus_on_a_group_with_a_slot_is_the_same_choice():
    # lightning-hydra-template's `+experiment=x` is taken as `experiment=x` by every command (Hydra refuses it).
    argv = slot_additions_as_choices(REPO / "conf", "train", ["train.py", "+experiment=tiny_lora", "++seed=3"])
    assert argv == ["train.py", "experiment=tiny_lora", "++seed=3"]
    argv = slot_additions_as_choices(
        REPO / "conf", "infer", ["infer.py", "+release=v07", "+codec=tiny", "checkpoint=x"]
    )
    assert argv == ["infer.py", "release=v07", "codec=tiny", "checkpoint=x"]


@pytest.mark.parametrize("mode, expected", [("bar", "4/4"), ("log", "step 4/4 (100%)")])
def test_progress_counts_optimiser_steps_of_the_whole_run(tmp_path, capsys, caplog, mode, expected):
    import logging

    caplog.set_level(logging.INFO, logger="moss.training.progress")
    overrides = ["debug=fast_dev_run", *FAST, f"callbacks.progress.bar={mode}", "callbacks.progress.interval_s=0"]
    train(compose_train(tmp_path, overrides))
    err = capsys.readouterr().err
    shown = err if mode == "bar" else caplog.text
    assert expected in shown, shown[-2000:]
    assert "Epoch" not in err  # Lightning's epoch bar is off


def test_the_progress_line_says_which_step_its_loss_is_from(tmp_path, caplog):
    """Metrics are logged every log_every_n_steps; the lines between showed the old loss as if it were current."""
    import logging
    import re

    caplog.set_level(logging.INFO, logger="moss.training.progress")
    overrides = [*FAST, "trainer.max_steps=5", "trainer.log_every_n_steps=3", "callbacks.progress.bar=log"]
    train(compose_train(tmp_path, [*overrides, "callbacks.progress.interval_s=0", "export.enabled=false"]))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    losses = {
        int(re.match(r"step (\d+)/", line)[1]): re.search(r"loss [\d.]+( \(step \d+\))?", line)[0] for line in lines
    }
    # logged at the first step, every third and the last (moss.training.objective.is_log_step)
    assert [losses[step].partition(" (")[2] for step in range(1, 6)] == ["", "step 1)", "", "step 3)", ""]
