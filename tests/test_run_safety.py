"""A run's work is never lost: group stop signals, broken checkpoints, a full disk, two runs of one name, and
mistakes that are one message."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from moss.errors import ConfigError
from moss.outputs import lock_folder
from moss.training.run_checkpoint import checkpoint_problem
from tests.conftest import REPO, compose_train
from tests.test_cli import run
from tests.test_scaleout import recorder, records
from tests.test_security import tiny_run_checkpoint
from train import resolve_resume, train

FAST = ["data.num_workers=0", "trainer.max_steps=4"]


def test_resume_auto_passes_over_checkpoints_that_do_not_load(tmp_path, caplog):
    _, good = tiny_run_checkpoint(tmp_path)
    folder = good.parent
    step = folder / "step_0000004.ckpt"
    step.write_bytes(good.read_bytes()[:1000])  # cut short
    time.sleep(0.01)
    (folder / "last.ckpt").rename(folder / "step_0000002.ckpt")
    (folder / "last.ckpt").write_bytes(b"")  # zero bytes, the newest
    cfg = OmegaConf.create({"resume": "auto"})
    assert resolve_resume(cfg, tmp_path) == str(folder / "step_0000002.ckpt")
    assert "passing over" in caplog.text and "an empty file" in caplog.text and "step_0000004.ckpt" in caplog.text
    (folder / "step_0000002.ckpt").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="none of the 3 checkpoints .* loads"):
        resolve_resume(cfg, tmp_path)


def test_resume_auto_takes_the_furthest_step_not_the_newest_file(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name, step in [("step_0000004.ckpt", 4), ("last.ckpt", 6), ("step_0000006.ckpt", 6), ("best.ckpt", 6)]:
        torch.save({"state_dict": {}, "global_step": step}, folder / name)
        time.sleep(0.01)
    cfg = OmegaConf.create({"resume": "auto"})
    assert resolve_resume(cfg, tmp_path) == str(folder / "last.ckpt")  # best.ckpt is newer, at the same step
    torch.save({"state_dict": {}, "global_step": 2}, folder / "best.ckpt")  # validation wrote it last
    (folder / "last.ckpt").unlink()
    assert resolve_resume(cfg, tmp_path) == str(folder / "step_0000006.ckpt")


def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint_whole(small_disk):
    """Lightning wrote checkpoints to the system temp folder and copied them over the old file: on a full disk the
    copy cut the old `last.ckpt` short. Now the old file stays whole and the failure is one line with the sizes."""
    from moss.outputs import refused_write
    from moss.training.run_checkpoint import AtomicCheckpointIO

    disk = small_disk(3)
    io, path = AtomicCheckpointIO(), disk / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 2}, path)
    with pytest.raises(OSError) as failed:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1 << 20)}, "global_step": 4}, path)  # 4 MiB
    assert checkpoint_problem(path) is None
    assert torch.load(path, weights_only=True)["global_step"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left
    line = refused_write(failed.value)
    assert f"cannot write {path}: no space left on the device" in line and "it needs 4.0 MiB" in line
    assert "MiB free in" in line


@pytest.mark.slow
def test_a_training_run_on_a_full_disk_stops_with_one_line_and_every_checkpoint_loads(tmp_path, small_disk):
    disk = small_disk(30)  # room for three checkpoints of the tiny model (7.5 MiB each) and the logs
    overrides = [
        *FAST,
        "trainer.max_steps=8",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "callbacks.model_checkpoint.save_top_k=-1",
        f"paths.root={disk}",
        f"paths.data_dir={tmp_path / 'data'}",
        "export.enabled=false",
    ]
    proc = run([str(REPO / "train.py"), *overrides], tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: cannot write ") and "no space left on the device" in error, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    checkpoints = sorted((disk / "tiny" / "checkpoints").glob("*.ckpt"))
    assert checkpoints and all(checkpoint_problem(p) is None for p in checkpoints), checkpoints
    assert not list((disk / "tiny" / "checkpoints").glob(".*moss-tmp*"))


def test_two_runs_of_one_name_never_share_the_folder(tmp_path):
    cfg = compose_train(tmp_path, ["debug=fast_dev_run", *FAST])
    other = lock_folder(cfg.paths.output_dir, "training run")  # the other run, started a moment earlier
    with pytest.raises(ConfigError, match="being written by another training run"):
        train(cfg)
    other.release()
    assert not (tmp_path / "out" / "checkpoints").exists()
    train(cfg)  # once it has ended, the name is free (its outputs would then be refused as usual)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(compose_train(tmp_path, ["debug=fast_dev_run", *FAST]))


@pytest.mark.parametrize("name", ["..", ".", "", "/abs", "a/b", " padded", "x\\y"])
def test_run_names_that_are_not_one_folder_are_refused(tmp_path, name):
    from moss.config_checks import name_problem

    assert name_problem(name) is not None
    assert name_problem("my-run_2") is None


@pytest.mark.slow  # a handful of processes, about a minute
def test_tools_give_one_line_for_broken_inputs_and_outputs(tmp_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "folder.ckpt").mkdir()
    broken = tmp_path / "broken-model"
    broken.mkdir()
    from moss.model import MossTTSD, MossTTSDConfig

    MossTTSD.from_config(MossTTSDConfig.tiny(), seed=0).save_pretrained(broken)
    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model.bin").write_bytes(b"PK\x03\x04 this is not a torch file")
    (tmp_path / "x.pkl").write_bytes(b"\x80\x04N.")
    np.save(tmp_path / "x_metas.npy", np.array([b"not numbers"]))
    (tmp_path / "y.pkl").write_bytes(b"\x80\x04N.")
    (tmp_path / "y_metas.npy").write_bytes(b"\x93NUMPY garbage that is no header")
    cases = [
        (["export.py", f"checkpoint={broken}", f"output_dir={tmp_path / 'a-file'}"], "is a file, not a folder"),
        (["export.py", f"checkpoint={broken}", f"output_dir={tmp_path / 'e'}"], "is not a readable weights file"),
        (
            ["infer.py", f"checkpoint={broken}", f"output_dir={tmp_path / 'a-file'}", "text=[S1]Hi", "codec=tiny"],
            "is a file, not a folder",
        ),
        (
            ["infer.py", f"checkpoint={tmp_path / 'folder.ckpt'}", "output_dir=out", "text=[S1]Hi", "codec=tiny"],
            "is a folder, but a .ckpt names",
        ),
        (
            ["infer.py", f"checkpoint={tmp_path / 'a-file'}", "output_dir=out", "text=[S1]Hi", "codec=tiny"],
            "is a file; give the model folder",
        ),
        (
            ["-m", "data_pipelines.import_legacy", f"input={tmp_path / 'x.pkl'}", f"output_dir={tmp_path / 'l'}"],
            "expected an integer [rows, records] array",
        ),
        (
            ["-m", "data_pipelines.import_legacy", f"input={tmp_path / 'y.pkl'}", f"output_dir={tmp_path / 'l'}"],
            "not a numeric .npy array",
        ),
        (["train.py", "name=..", "debug=fast_dev_run"], "must be one plain folder name"),
    ]
    for args, message in cases:
        script = [str(REPO / args[0]), *args[1:]] if args[0].endswith(".py") else args
        done = run(script, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert "Traceback" not in done.stderr and message in done.stderr, (args, done.stderr[-2000:])
        assert done.stderr.count("error:") == 1


def group_stop(proc, grace_s: float = 90) -> int:
    """What a scheduler does: SIGTERM to the whole process group, SIGKILL after the grace period."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError("the run did not stop within the grace period") from None


COMMON = [
    "trainer.log_every_n_steps=1",
    "trainer.val_check_interval=1000",
    "callbacks.model_checkpoint.every_n_train_steps=1000",
    "data.shuffle_buffer=16",
    "export.enabled=false",
]


@pytest.mark.slow  # several training processes (about 2 minutes)
@pytest.mark.parametrize("ranks", [1, 2])
def test_a_group_sigterm_saves_and_resume_auto_continues_exactly(tmp_path, ranks):
    layout = ["data.num_workers=2"] if ranks == 1 else ["trainer.devices=2", "strategy=ddp", "data.num_workers=1"]
    layout += [f"paths.root={tmp_path}", "callbacks.preemption.check_every_n_steps=1"]

    def start(name, *extra):
        return subprocess.Popen(
            [sys.executable, "train.py", *COMMON, *layout, f"name={name}", *extra],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, as under a scheduler
        )

    proc = start("stopped", "trainer.max_steps=400", recorder(tmp_path / "a.jsonl"))
    first = tmp_path / ("a.jsonl" if ranks == 1 else "a.jsonl.rank0")
    started = time.monotonic()
    while not (first.is_file() and len(first.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() - started < 240
        time.sleep(0.05)
    assert group_stop(proc) == 0, proc.stderr.read().decode()[-3000:]
    err = proc.stderr.read().decode()
    assert "DataLoader worker" not in err and "Traceback" not in err, err[-3000:]
    state = torch.load(tmp_path / "stopped" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    step = state["global_step"]
    assert 3 <= step < 400
    # Same schedule (max_steps 400) in all three runs; the last two stop three steps after the stop.
    stop = f"+callbacks.stop={{_target_: tests.conftest.StopAtStep, step: {step + 3}}}"
    resumed = start("stopped", "resume=auto", "trainer.max_steps=400", stop, recorder(tmp_path / "b.jsonl"))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-3000:]
    straight = start("straight", "trainer.max_steps=400", stop, recorder(tmp_path / "c.jsonl"))
    assert straight.wait(timeout=300) == 0, straight.stderr.read().decode()[-3000:]
    suffixes = [""] if ranks == 1 else [".rank0", ".rank1"]
    for suffix in suffixes:
        after, reference = records(tmp_path / f"b.jsonl{suffix}"), records(tmp_path / f"c.jsonl{suffix}")
        assert sorted(after) == [step + 1, step + 2, step + 3]
        for s, record in after.items():
            assert record["keys"] == reference[s]["keys"]
            assert record["loss"] == pytest.approx(reference[s]["loss"], rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("step", [0, 2], ids=["while-setting-up", "while-training"])
def test_an_interrupted_in_process_run_leaves_ctrl_c_working(tmp_path, step, ctrl_c_interrupts):
    """Lightning ignores SIGINT once a KeyboardInterrupt stops a run, and undoes that only when the Ctrl-C came
    after it had installed its own handlers: one during setup (preprocessing, the data card) left a test suite
    or notebook that ran training in process deaf to Ctrl-C."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    ctrl_c = f"+callbacks.ctrl_c={{_target_: tests.conftest.InterruptAtStep, step: {step}}}"
    cfg = compose_train(tmp_path, [*FAST, ctrl_c])
    with pytest.raises(SystemExit):
        train(cfg)
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)


def test_exports_carry_the_training_config_also_when_exported_again_into_themselves(tmp_path):
    from moss.training.export import export_checkpoint

    result = train(compose_train(tmp_path, FAST))
    run = result["output_dir"]
    assert (run / "export" / "training_config.yaml").is_file()
    export_checkpoint(run / "checkpoints" / "last.ckpt", tmp_path / "exported")
    assert (tmp_path / "exported" / "training_config.yaml").read_text() == (run / ".hydra" / "config.yaml").read_text()
    kept = (run / "export" / "training_config.yaml").read_text()
    export_checkpoint(run / "export", run / "export", layout="moss_ttsd", overwrite=True)
    assert (run / "export" / "training_config.yaml").read_text() == kept
    assert '"model_type": "moss_ttsd"' in (run / "export" / "config.json").read_text()
