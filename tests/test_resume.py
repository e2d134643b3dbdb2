"""Stopping and resuming continues with exactly the batches and losses of an uninterrupted run (invariant 6)."""

import json
import multiprocessing
import shutil

import pytest
import torch

from tests.conftest import compose_train
from train import train


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("accumulate", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, accumulate):
    common = [
        "trainer.max_steps=8",
        f"data.accumulate_grad_batches={accumulate}",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=1000",
        "data.num_workers=2",
        "data.shuffle_buffer=16",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "export.enabled=false",
    ]

    def run(name, extra):
        log = tmp_path / f"{name}.jsonl"
        overrides = [
            *common,
            f"paths.output_dir={tmp_path / name}",
            *extra,
            f"+callbacks.recorder={{_target_: tests.conftest.BatchRecorder, path: '{log}'}}",
        ]
        train(compose_train(tmp_path, overrides))
        assert not multiprocessing.active_children(), "loader workers outlived the run"
        return log

    straight = records(run("straight", []))
    stop = "+callbacks.stop={_target_: tests.conftest.StopAtStep, step: 4}"
    first = records(run("resumed", [stop]))
    assert max(r["step"] for r in first) == 4
    second = records(run("resumed", ["resume=auto"]))[len(first) :]
    assert [r["keys"] for r in first + second] == [r["keys"] for r in straight]
    for a, b in zip(first + second, straight, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-6)


def metrics_rows(path):
    import csv

    with open(path, newline="") as file:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(file)]


@pytest.mark.parametrize(
    "signalled", [4, pytest.param(5, marks=pytest.mark.slow)]
)  # saved at step 5 (no validation due), at step 6 (one due)
@pytest.mark.usefixtures("ctrl_c_interrupts")
def test_a_preempted_and_resumed_run_logs_the_same_curve_as_an_uninterrupted_one(tmp_path, signalled):
    """metrics.csv is appended across a resume (Lightning's CSV logger deleted it), at the same step numbers (they
    came out one lower), with no validation between the preemption save and the stop (Lightning ran one)."""
    import signal

    common = [
        "trainer.max_steps=8",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=3",
        "data.num_workers=0",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "export.enabled=false",
        "sanity_check.samples=0",
        "data_card=null",
    ]
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}

    def run(name, *extra):
        return train(compose_train(tmp_path, [*common, f"paths.output_dir={tmp_path / name}", *extra]))

    run("straight")
    stop = f"+callbacks.stop={{_target_: tests.conftest.SignalAtStep, step: {signalled}}}"
    assert run("resumed", stop)["stopped"] == "SIGTERM"
    run("resumed", "resume=auto")
    straight, resumed = (metrics_rows(tmp_path / n / "logs" / "metrics.csv") for n in ("straight", "resumed"))
    assert [sorted(r) for r in resumed] == [sorted(r) for r in straight]
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    for a, b in zip(resumed, straight, strict=True):
        assert {k: float(v) for k, v in a.items()} == pytest.approx({k: float(v) for k, v in b.items()}, rel=1e-5)
    # every handler a run installs is put back: Ctrl-C interrupts the caller again
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)


COMMON = ["data.num_workers=0", "sanity_check.samples=0", "data_card=null", "trainer.val_check_interval=2"]


def test_a_moved_run_folder_resumes_to_the_end_with_its_best_checkpoint(tmp_path):
    """Lightning dropped the best score of a checkpoint saved in another folder: the first validation after the
    resume became "best" whatever its score, and export.from=best read the old folder."""
    # mode=max on a falling loss: the first validation stays the best, so a new "best" after resuming is wrong
    settings = [*COMMON, "trainer.max_steps=6", "callbacks.best_checkpoint.mode=max", "callbacks.early_stopping=null"]
    old, new = tmp_path / "old", tmp_path / "new"
    stop = "+callbacks.stop={_target_: tests.conftest.SignalAtStep, step: 3}"
    data = f"paths.data_dir={tmp_path / 'data'}"
    train(compose_train(tmp_path, [*settings, data, f"paths.output_dir={old / 'run'}", stop]))
    shutil.move(old, new)
    result = train(compose_train(tmp_path, [*settings, data, f"paths.output_dir={new / 'run'}", "resume=auto"]))
    assert result["trainer"].global_step == 6
    assert (
        result["exported"]["weights"].startswith("best.ckpt: val/loss") and "at step 2" in result["exported"]["weights"]
    )
    assert (new / "run" / "export" / "config.json").is_file()
    best = result["trainer"].checkpoint_callbacks[-1]
    assert best.best_model_path == str(new / "run" / "checkpoints" / "best.ckpt")
    assert torch.load(best.best_model_path, weights_only=True)["global_step"] == 2


def test_vanished_shards_at_resume_are_one_message_naming_them(tmp_path, tiny_shards):
    from moss.errors import ConfigError

    names = sorted(p.name for p in tiny_shards.glob("*.tar"))
    run = [
        *COMMON,
        f"paths.data_dir={tmp_path / 'data'}",
        f"data.train_shards={tiny_shards}",
        "data.val_shards=null",
        "trainer.max_steps=4",
        f"paths.output_dir={tmp_path / 'run'}",
    ]
    train(compose_train(tmp_path, [*run, "+callbacks.stop={_target_: tests.conftest.SignalAtStep, step: 2}"]))
    (tiny_shards / names[1]).unlink()
    with pytest.raises(ConfigError, match=rf"data changed since the checkpoint: 1 shard\(s\) vanished: {names[1]}"):
        train(compose_train(tmp_path, [*run, "resume=auto"]))
