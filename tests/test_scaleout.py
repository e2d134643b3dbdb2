"""Scale-out on CPU: 2-rank DDP runs killed and resumed, preemption, multirun x DDP, uneven shards."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from tests.conftest import REPO


def cli(args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        **kwargs,
    )


def wait_for(proc, path, timeout=240):
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() - start < timeout, f"{path} did not appear"
        time.sleep(0.02)


def records(path):
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def recorder(path):
    return f"+callbacks.recorder={{_target_: tests.conftest.BatchRecorder, path: '{path}'}}"


COMMON = [
    "trainer.max_steps=8",
    "trainer.log_every_n_steps=1",
    "trainer.val_check_interval=1000",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "data.shuffle_buffer=16",
    "export.enabled=false",
]


@pytest.mark.slow  # three 2-process training runs (about 60 s); CI runs it
def test_two_rank_run_killed_and_resumed_continues_like_an_uninterrupted_one(tmp_path):
    ddp = ["trainer.devices=2", "strategy=ddp", "data.num_workers=1", f"paths.root={tmp_path}"]
    straight = cli([*COMMON, *ddp, "name=straight", recorder(tmp_path / "straight.jsonl")])
    assert straight.wait() == 0, straight.stderr.read().decode()[-3000:]
    killed = cli([*COMMON, *ddp, "name=killed", recorder(tmp_path / "killed.jsonl")])
    wait_for(killed, tmp_path / "killed" / "checkpoints" / "step_0000004.ckpt")
    os.killpg(killed.pid, signal.SIGKILL)  # every rank and loader worker, no chance to clean up
    killed.wait()
    resumed = cli([*COMMON, *ddp, "name=killed", "resume=auto", recorder(tmp_path / "resumed.jsonl")])
    assert resumed.wait() == 0, resumed.stderr.read().decode()[-3000:]
    for rank in (0, 1):
        reference = records(tmp_path / f"straight.jsonl.rank{rank}")
        after = records(tmp_path / f"resumed.jsonl.rank{rank}")
        assert min(after) >= 5 and max(after) == 8
        for step, record in after.items():
            assert record["keys"] == reference[step]["keys"]
            assert record["loss"] == pytest.approx(reference[step]["loss"], rel=1e-6, abs=1e-6)


@pytest.mark.slow  # several processes (CI runs slow tests too)
def test_sigterm_saves_at_a_step_boundary_and_resume_finishes(tmp_path):
    run = ["data.num_workers=0", f"paths.root={tmp_path}", "name=preempted"]
    proc = cli([*COMMON, *run, "trainer.max_steps=400", recorder(tmp_path / "a.jsonl")])
    wait_for(proc, tmp_path / "preempted" / "checkpoints" / "step_0000002.ckpt")
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait() == 0
    import torch

    state = torch.load(tmp_path / "preempted" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    stopped = state["global_step"]
    assert 2 <= stopped < 400 and max(records(tmp_path / "a.jsonl")) == stopped
    resumed = cli(
        [
            *COMMON,
            *run,
            "trainer.max_steps=400",
            "resume=auto",
            "trainer.max_steps=" + str(stopped + 3),
            recorder(tmp_path / "b.jsonl"),
        ]
    )
    assert resumed.wait() == 0, resumed.stderr.read().decode()[-3000:]
    assert sorted(records(tmp_path / "b.jsonl")) == [stopped + 1, stopped + 2, stopped + 3]


@pytest.mark.slow  # three multi-process training runs (about 90 s); CI runs it
def test_a_run_resumed_on_one_rank_then_three_trains_on_each_sample_of_its_passes_once(tmp_path):
    """2 ranks -> 1 -> 3 (gloo, one loader worker each): the samples of every pass the first two layouts began are
    trained on exactly once, as in an uninterrupted run; the model, optimiser and step carry over."""
    from moss.data.synthetic import generate_samples
    from moss.data.writer import write_shards

    write_shards(generate_samples(48, seed=4), tmp_path / "set", prefix="set", max_samples=4)  # 12 shards
    common = [*COMMON, "callbacks.model_checkpoint.every_n_train_steps=1", "data.num_workers=1", "strategy=ddp"]
    common += ["data.shuffle_buffer=4", "data.packing.window=4", "data.packing.budget=512"]  # little held back
    common += [
        f"paths.root={tmp_path}",
        "name=elastic",
        f"data.train_shards={tmp_path / 'set'}",
        "data.val_shards=null",
    ]
    for devices, stop, extra in [("2", 3, []), ("1", 6, ["resume=auto"]), ("3", 20, ["resume=auto"])]:
        log = tmp_path / f"ranks{devices}.jsonl"
        stopper = f"+callbacks.stop={{_target_: tests.conftest.StopAtStep, step: {stop}}}"
        run = cli([*common, f"trainer.devices={devices}", *extra, stopper, recorder(log), "trainer.max_steps=20"])
        assert run.wait(timeout=300) == 0, run.stderr.read().decode()[-3000:]
    records = [json.loads(line) for path in tmp_path.glob("ranks*.jsonl*") for line in path.read_text().splitlines()]
    assert sorted(r["step"] for r in records) == sorted([1, 2, 3] * 2 + [4, 5, 6] + list(range(7, 21)) * 3)
    seen = Counter(pair for r in records for pair in zip(r["passes"], r["keys"], strict=True))
    assert max(seen.values()) == 1  # no sample twice in any pass
    first = [key for pass_, key in seen if pass_ == 0]
    assert len(first) == 48  # the first pass, read by all three layouts: every sample, once


@pytest.mark.slow  # a 2-job sweep of 2-process runs (about 30 s); CI runs it
def test_multirun_with_ddp_writes_one_directory_per_job(tmp_path):
    proc = cli(
        [
            "-m",
            "seed=1,2",
            "trainer.devices=2",
            "strategy=ddp",
            "debug=fast_dev_run",
            f"paths.root={tmp_path}",
            "name=sweep",
            "data.num_workers=0",
        ]
    )
    assert proc.wait() == 0, proc.stderr.read().decode()[-3000:]
    sweep = tmp_path / "sweep-multirun"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "sweep-multirun"]  # no stray run directories
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "step_0000004.ckpt").is_file()
        assert (sweep / job / "train_rank1.log").is_file()  # rank 1 ran this job, inside its directory


@pytest.mark.slow  # several processes (CI runs slow tests too)
def test_uneven_shards_across_ranks_do_not_hang(tmp_path):
    from moss.data.synthetic import write_synthetic_corpus

    data = tmp_path / "data" / "tiny" / "train"
    write_synthetic_corpus(data, 96, seed=0, samples_per_shard=32)  # 3 shards: rank 0 reads 2, rank 1 reads 1
    proc = cli(
        [
            "trainer.devices=2",
            "strategy=ddp",
            "data.num_workers=0",
            f"paths.root={tmp_path}",
            "name=uneven",
            "data.synthetic.train_samples=96",
            "trainer.max_steps=30",
            "trainer.val_check_interval=1000",
            "export.enabled=false",
        ]
    )
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]
    assert (tmp_path / "uneven" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow  # several processes (CI runs slow tests too)
def test_fsdp_lora_on_cpu_adapter_round_trip_and_sharded_resume(tmp_path):
    import torch
    from peft import PeftModel

    from moss.model import MossTTSD, MossTTSDConfig

    run = [
        "strategy=fsdp",
        "trainer.devices=2",
        "experiment=tiny_lora",
        "debug=fast_dev_run",
        "data.num_workers=0",
        f"paths.root={tmp_path}",
        f"+callbacks.logits={{_target_: tests.conftest.LogitsAtEnd, path: '{tmp_path}/l.pt'}}",
    ]
    proc = cli(run)
    assert proc.wait() == 0, proc.stderr.read().decode()[-3000:]
    out = tmp_path / "tiny_lora"
    assert (out / "checkpoints" / "step_0000004.ckpt").is_dir()  # sharded (torch.distributed.checkpoint)
    trained = torch.load(tmp_path / "l.pt", weights_only=True)
    base = MossTTSD.from_config(MossTTSDConfig.tiny(initializer_range=0.1), seed=1234).eval()  # tiny_lora.yaml
    with torch.no_grad():
        plain = base(trained["ids"], output_logits=True).logits
        adapted = (
            PeftModel.from_pretrained(base, str(out / "adapter")).eval()(trained["ids"], output_logits=True).logits
        )
        merged = MossTTSD.from_pretrained(out / "export").eval()(trained["ids"], output_logits=True).logits
    assert not torch.allclose(plain[0], trained["ch0"], atol=1e-4)  # training moved the adapters
    for logits in (adapted, merged):
        torch.testing.assert_close(logits[0], trained["ch0"], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(logits[1], trained["ch1"], atol=2e-5, rtol=1e-5)
    resumed = cli([*run[:-1], "resume=auto", "trainer.max_steps=6", "export.enabled=false"])
    assert resumed.wait() == 0, resumed.stderr.read().decode()[-3000:]
    assert (out / "checkpoints" / "step_0000006.ckpt").is_dir()
    # on one rank: the sharded checkpoint is re-sharded, the data shared out (README, "Resuming on other hardware")
    alone = cli([*run[:-1], "trainer.devices=1", "resume=auto", "trainer.max_steps=8", "export.enabled=false"])
    assert alone.wait() == 0, alone.stderr.read().decode()[-3000:]
    assert (out / "checkpoints" / "step_0000008.ckpt").exists()
    assert "2 ranks x 0 loader workers, this run has 1 x 0" in (out / "train.log").read_text()


@pytest.mark.slow  # two FSDP processes (about 40 s); CI runs it
def test_fsdp_export_from_best_exports_the_best_sharded_checkpoint(tmp_path):
    """Under FSDP the best checkpoint is a distributed folder; export.from=best silently exported the last weights."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from moss.model import MossTTSD, MossTTSDConfig

    run = [
        "strategy=fsdp",
        "trainer.devices=2",
        "data.num_workers=0",
        "trainer.max_steps=6",
        "trainer.val_check_interval=2",
        "callbacks.best_checkpoint.mode=max",  # on a falling loss the first validation stays the best: step 2
        "callbacks.early_stopping=null",
        "sanity_check.samples=0",
        f"paths.root={tmp_path}",
    ]
    proc = cli(run)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]
    out = tmp_path / "tiny"
    assert (out / "checkpoints" / "best.ckpt").is_dir()
    ids = torch.randint(0, 64, (1, 24, 8))

    def logits_of(folder):
        dcp_to_torch_save(folder, tmp_path / f"{folder.name}.pt")
        saved = torch.load(tmp_path / f"{folder.name}.pt", weights_only=True)["state_dict"]
        model = MossTTSD.from_config(MossTTSDConfig.tiny(), seed=0)
        model.load_state_dict({k.removeprefix("model."): v for k, v in saved.items()})
        return model.eval()(ids, output_logits=True).logits[0]

    with torch.no_grad():
        exported = MossTTSD.from_pretrained(out / "export").eval()(ids, output_logits=True).logits[0]
        best, last = logits_of(out / "checkpoints" / "best.ckpt"), logits_of(out / "checkpoints" / "last.ckpt")
    assert torch.load(out / "checkpoints" / "best.ckpt" / "meta.pt", weights_only=True)["global_step"] == 2
    assert not torch.allclose(best, last, atol=1e-4)
    torch.testing.assert_close(exported, best, atol=2e-5, rtol=1e-5)
