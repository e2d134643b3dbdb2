"""Stopping and resuming continues with exactly the batches and losses of an uninterrupted run (invariant 6)."""

import json
import multiprocessing

import pytest

from tests.conftest import compose_train
from train import train


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("accumulate", [1, 2])
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
