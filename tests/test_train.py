"""End to end: the tiny default trains (loss falls), checkpoints, exports, resumes; every experiment composes."""

import csv
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from moss.config_checks import ConfigError, validate
from moss.model import MossTTSD
from moss.model.lora import unwrap
from moss.training.plan import plan_run
from tests.conftest import REPO, compose_train, random_batch
from train import train

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
CPU = ["trainer.accelerator=cpu", "trainer.precision=32-true"]  # the GPU experiments, checked on this CPU


def logged(output_dir: Path, key: str) -> list[float]:
    rows = csv.DictReader(open(output_dir / "logs" / "metrics.csv"))
    return [float(r[key]) for r in rows if r.get(key)]


def test_tiny_default_trains_checkpoints_and_exports(tmp_path, capsys):
    cfg = compose_train(
        tmp_path,
        [
            "trainer.max_steps=40",
            "trainer.val_check_interval=20",
            "callbacks.model_checkpoint.every_n_train_steps=20",
            "data.num_workers=0",
            "trainer.log_every_n_steps=1",
        ],
    )
    result = train(cfg)
    out = result["output_dir"]
    card = json.loads((out / "data_card.json").read_text())  # written at the start, from the built-in corpus
    assert card["splits"]["train"]["samples"] == 1024 and card["splits"]["val"]["samples"] == 64
    losses = logged(out, "train/loss")
    assert losses[0] > 6.5 and losses[-1] < losses[0] - 1.5, losses  # from ~log(1025) = 6.9, visibly down
    assert len(logged(out, "val/loss")) == 2 and logged(out, "train/grad_norm")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "best.ckpt",
        "last.ckpt",
        "step_0000020.ckpt",
        "step_0000040.ckpt",
    ]
    assert {"config.json", "model.safetensors", "tokenizer.json", "training_config.yaml"} <= {
        p.name for p in (out / "export").iterdir()
    }
    assert result["exported"]["adapter"] is None  # full fine-tuning: no adapter
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((out / "export" / "model.safetensors").stat().st_mode) == 0o666 & ~mask  # not 0600
    # export.from=best (the default): the export holds the weights of best.ckpt, the lowest val/loss.
    best = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)
    best_step = best["global_step"]
    val = dict(zip((20, 40), logged(out, "val/loss"), strict=True))
    assert best_step == min(val, key=val.get)
    exported = MossTTSD.from_pretrained(out / "export").eval()
    for key, value in exported.state_dict().items():
        if f"model.{key}" in best["state_dict"]:
            torch.testing.assert_close(value, best["state_dict"][f"model.{key}"], atol=0, rtol=0)
    trained = unwrap(result["module"].model).eval()
    ids, _ = random_batch(exported.config)
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits[0], trained(ids).logits[0], atol=0, rtol=0)
    printed = capsys.readouterr().out
    assert f"export:        {out / 'export'}" in printed and "real frames/s" in printed
    assert f"weights:       best.ckpt: val/loss {val[best_step]:.4f} at step {best_step}" in printed


def test_tiny_lora_saves_an_adapter_and_resumes(tmp_path):
    overrides = ["experiment=tiny_lora", "debug=fast_dev_run", "data.num_workers=0"]
    first = train(compose_train(tmp_path, overrides))
    out = first["output_dir"]
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "export" / "model.safetensors").is_file()
    trainable = {n for n, p in first["module"].model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["adapter_only"] and {k.removeprefix("model.") for k in ckpt["state_dict"]} == trainable
    # The export of the first run (adapter-only checkpoints, export.from=best) is its best checkpoint, rebuilt.
    from moss.model.checkpoint import load_model
    from moss.training.run_checkpoint import model_from_checkpoint

    best, _ = model_from_checkpoint(out / "checkpoints" / "best.ckpt")
    exported, _ = load_model(out / "export")
    ids = torch.randint(0, 300, (1, 6, 8))
    with torch.no_grad():
        torch.testing.assert_close(best(ids).logits, exported(ids).logits)
    second = train(compose_train(tmp_path, [*overrides, "resume=auto", "trainer.max_steps=6", "export.from=last"]))
    assert second["trainer"].global_step == 6 and first["trainer"].global_step == 4
    assert (out / "checkpoints" / "step_0000006.ckpt").is_file()
    # The adapter-only checkpoint rebuilds (recorded seeded base + LoRA settings) into the exported model.
    from_ckpt, _ = model_from_checkpoint(out / "checkpoints" / "step_0000006.ckpt")  # the export is of step 6 too
    exported, _ = load_model(out / "export")
    with torch.no_grad():
        torch.testing.assert_close(from_ckpt(ids).logits, exported(ids).logits)


@pytest.mark.parametrize(
    "experiment", [e if e == "lora_v05" else pytest.param(e, marks=pytest.mark.slow) for e in EXPERIMENTS]
)
def test_every_experiment_composes_and_builds(tmp_path, experiment, real_layout_checkpoint, tiny_shards):
    cfg = compose_train(
        tmp_path,
        [
            f"experiment={experiment}",
            f"model.path={real_layout_checkpoint}",
            f"data.train_shards={tiny_shards}",
            *CPU,
        ]
        if experiment != "tiny_lora"
        else [f"experiment={experiment}"],
    )
    validate(cfg)
    module = instantiate(cfg.model)
    tokenizer = instantiate(cfg.tokenizer)
    data = instantiate(cfg.data, _partial_=True)(tokenizer=tokenizer, model_config=module.config)
    module.configure_model()
    if experiment != "tiny_lora":
        data.setup("fit")
        batch = next(iter(data.stream(data.train_urls[:1], train=False)))
        with torch.no_grad():
            out = module(batch)
        assert torch.isfinite(out.loss)
    assert cfg.trainer.max_steps >= 1 and module.hparams.gradient_clip_val == 1.0


def test_lora_v05_is_the_original_recipe(tmp_path, real_layout_checkpoint):
    cfg = compose_train(
        tmp_path, ["experiment=lora_v05", f"model.path={real_layout_checkpoint}", "data.train_shards=/data/*.tar"]
    )
    assert cfg.model.peft.r == 16 and cfg.model.peft.lora_alpha == 32 and cfg.model.peft.use_rslora
    assert cfg.model.optimizer.lr == 1e-4 and cfg.model.scheduler.warmup_ratio == 0.1
    module = instantiate(cfg.model)  # the model config from model.path; weights load later, in configure_model
    assert module.hparams.channel_weights == [8, 2, 1, 1, 1, 1, 1, 1] and module.config.channels == 8
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.strategy.static_graph
    # Checkpointing off: 16k-row packs fit an 80 GB H100 without it (65 GB), 1.37x faster; v0.7's 24k keep it.
    assert cfg.model.net.dtype == "bfloat16" and cfg.model.gradient_checkpointing is False
    v07 = compose_train(tmp_path, ["experiment=lora_v07", f"model.path={real_layout_checkpoint}"])
    assert v07.model.gradient_checkpointing is True


def test_validate_reports_every_problem_with_its_fix(tmp_path):
    cfg = compose_train(
        tmp_path,
        ["experiment=lora_v05", "trainer.max_steps=0", "model.net.attn_implementation=flash3", "resume=/nope.ckpt"],
    )
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    for fix in (
        "set model.path=",
        "set data.train_shards=",
        "trainer.max_steps=0 is refused: input should be greater than or equal to 1",
        "model.net.attn_implementation='flash3' is refused: input should be 'sdpa', 'eager',",
        "resume=/nope.ckpt is not a checkpoint",
    ):
        assert fix in message


def test_channel_weights_must_match_the_model(tmp_path):
    """Checked by the plan against the model config it builds (once), before anything trains."""
    with pytest.raises(ConfigError, match=r"model.channel_weights has 3 values, the model 8 channels.*\[8.0, 2.0"):
        plan_run(compose_train(tmp_path, ["model.channel_weights=[1,2,3]"]))
    plan_run(compose_train(tmp_path, ["model.channel_weights=[1,1,1,1,1,1,1,1]", "model.ce_chunk_rows=256"]))


def test_the_step_settings_lightning_would_own_are_refused_with_their_new_home(tmp_path):
    """The module runs the optimiser step: Lightning's accumulation and clipping keys would be ignored or fail late."""
    overrides = ["+trainer.accumulate_grad_batches=4", "+trainer.gradient_clip_val=0.5", "trainer.precision=16-mixed"]
    with pytest.raises(ConfigError) as err:
        validate(compose_train(tmp_path, overrides))
    for fix in ("set data.accumulate_grad_batches", "set model.gradient_clip_val", "16-mixed needs a loss scaler"):
        assert fix in str(err.value)
    validate(compose_train(tmp_path, ["data.accumulate_grad_batches=4", "model.gradient_clip_val=null"]))


def test_varlen_attention_requires_packing(tmp_path):
    with pytest.raises(ConfigError, match="varlen_sdpa needs packed batches"):
        validate(compose_train(tmp_path, ["data.packing=null"]))
    validate(compose_train(tmp_path, ["data.packing=null", "model.net.attn_implementation=sdpa"]))


def test_padded_mode_trains(tmp_path):
    """The original's padded batches: rows really padded and masked, and the loss finite and falling."""
    padded = ["data.packing=null", "model.net.attn_implementation=sdpa", "data.num_workers=0"]
    steps = ["trainer.max_steps=30", "trainer.val_check_interval=30", "trainer.log_every_n_steps=1"]
    result = train(compose_train(tmp_path, padded + steps))
    losses = logged(result["output_dir"], "train/loss")
    assert len(losses) == 30 and all(np.isfinite(losses)) and np.mean(losses[-5:]) < losses[0] - 0.5, losses
    batch = next(iter(result["trainer"].datamodule.train_dataloader())).micro[0]
    assert batch.cu_seqlens is None and (batch.attention_mask == 0).any()  # padding rows, masked out


def test_every_entry_point_names_a_config_that_composes():
    """Each Hydra command (found by its decorator, not listed by hand) points at a config Hydra can compose."""
    import re

    from tests.conftest import compose_config

    scripts = sorted([*REPO.glob("*.py"), *(REPO / "data_pipelines").glob("*.py")])
    found = {}
    for script in scripts:
        match = re.search(r'@hydra\.main\(.*config_path="([^"]+)", config_name="([^"]+)"\)', script.read_text())
        if match:
            assert (script.parent / match[1]).resolve() == REPO / "conf", script
            found[script.relative_to(REPO).as_posix()] = match[2]
    expected = {"train.py", "infer.py", "export.py", "data_pipelines/preprocess.py", "data_pipelines/demo_corpus.py"}
    assert expected <= set(found), found
    for script, name in found.items():
        cfg = compose_config(name, [])
        assert len(cfg) > 0, script  # composed from conf/<name>.yaml and its defaults


@pytest.mark.slow  # a training run (9 s); the reader's skips are in tests/data/test_bad_samples.py
def test_corrupt_shard_is_skipped_and_reported_while_training_continues(tmp_path):
    from moss.data.synthetic import write_synthetic_corpus

    data = tmp_path / "runs" / "data" / "tiny" / "train"
    write_synthetic_corpus(data, 96, seed=0, samples_per_shard=32)
    good = (data / "synthetic-000000.tar").read_bytes()
    (data / "synthetic-000000.tar").write_bytes(good[: len(good) // 3])  # truncated mid-sample
    (data / "zz-garbage.tar").write_bytes(b"not a tar file at all" * 100)
    cfg = compose_train(
        tmp_path,
        [
            "debug=fast_dev_run",
            "trainer.max_steps=40",
            "data.num_workers=0",
            "data.shuffle_buffer=4",
            "data.synthetic.train_samples=96",
        ],
    )
    result = train(cfg)
    assert result["trainer"].global_step == 40
    reports = list((result["output_dir"] / "data_report").glob("skipped-*.jsonl"))
    reasons = {json.loads(line)["reason"] for r in reports for line in r.read_text().splitlines()}
    assert "unreadable shard" in reasons
    assert result["summary"]["skipped"].get("unreadable shard", 0) >= 1


def test_too_few_shards_for_the_readers_fails_at_start_up(tmp_path, tiny_shards, real_layout_checkpoint):
    cfg = compose_train(
        tmp_path,
        [
            "experiment=lora_v05",
            f"model.path={real_layout_checkpoint}",
            f"data.train_shards={tiny_shards}",
            "data.num_workers=8",
        ],
    )
    with pytest.raises(ConfigError, match="has 6 shards but 1 ranks x 8 workers = 8 readers.*lower data.num_workers"):
        plan_run(cfg)  # before anything is built: the plan applies the readers rule
    with pytest.raises(ConfigError, match="has 6 shards but 8 ranks x 1 workers"):
        plan_run(compose_train(tmp_path, [f"data.train_shards={tiny_shards}", "trainer.devices=8"]), fit_workers=True)
    fitted = plan_run(cfg, fit_workers=True).cfg  # a set made from raw.* is fitted: 6 shards, 1 rank
    assert fitted.data.num_workers == 6


def test_a_user_shard_folder_is_read_never_written(tmp_path, tiny_shards):
    """With the default data config, a data.train_shards set elsewhere must not get the built-in corpus."""
    before = {p.name: p.stat().st_mtime_ns for p in tiny_shards.iterdir()}
    cfg = compose_train(tmp_path, ["debug=fast_dev_run", "data.num_workers=0", f"data.train_shards={tiny_shards}"])
    train(cfg)
    assert {p.name: p.stat().st_mtime_ns for p in tiny_shards.iterdir()} == before
    assert not (tmp_path / "runs" / "data" / "tiny" / "train").exists()  # not generated: not used
    missing = tmp_path / "nope" / "*.tar"
    with pytest.raises(ConfigError, match="no shards match data.train_shards"):
        train(compose_train(tmp_path, ["debug=fast_dev_run", "data.num_workers=0", f"data.train_shards={missing}"]))
    assert not (tmp_path / "nope").exists()


def test_early_stopping_ends_the_run_and_it_still_exports(tmp_path, capsys):
    # min_delta 100: the second validation cannot improve enough, so patience 1 stops the run there.
    overrides = ["debug=fast_dev_run", "trainer.max_steps=10", "data.num_workers=0"]
    early = ["callbacks.early_stopping.patience=1", "callbacks.early_stopping.min_delta=100"]
    result = train(compose_train(tmp_path, [*overrides, *early]))
    assert result["trainer"].global_step == 4 and not result["stopped"]
    assert (
        "early stopping ended the run at step 4 of 10: 1 validations without a val/loss lower"
        in capsys.readouterr().out
    )
    assert (result["output_dir"] / "export" / "model.safetensors").is_file()
    assert result["exported"]["weights"].startswith("best.ckpt")
    with pytest.raises(ConfigError, match="export.from='newest' is refused: input should be 'best' or 'last'"):
        validate(compose_train(tmp_path / "b", ["export.from=newest"]))


@pytest.mark.slow  # inductor compiles the tiny layers on the CPU (about 30 s)
def test_compiled_layers_train_to_the_same_losses(tmp_path):
    steps = ["trainer.max_steps=12", "trainer.val_check_interval=6", "data.num_workers=0"]
    steps.append("trainer.log_every_n_steps=1")
    runs = {}
    for compiled in (False, True):
        cfg = compose_train(tmp_path / str(compiled), [*steps, f"model.speedups.compile={compiled}"])
        result = train(cfg)
        layers = unwrap(result["trainer"].lightning_module.model).decoder_layers()
        assert all((layer._compiled_call_impl is not None) == compiled for layer in layers)
        out = result["output_dir"]
        runs[compiled] = (logged(out, "train/loss"), logged(out, "val/loss"))
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-4)
    np.testing.assert_allclose(runs[True][1], runs[False][1], rtol=1e-4)
    assert len(runs[True][0]) == 12 and len(runs[True][1]) == 2


def test_one_planned_config_is_checked_recorded_and_run_and_each_object_is_built_once(tmp_path, monkeypatch):
    """The plan derives, builds and checks; `.hydra/config.yaml` records that object and the run uses it."""
    from collections import Counter

    from omegaconf import OmegaConf

    import moss.training.plan as plan_module
    from moss.data.datamodule import MossDataModule
    from moss.model import MossTTSDConfig
    from moss.text import tiny_tokenizer

    built, checked = Counter(), []
    tiny, build_tokenizer, init = MossTTSDConfig.tiny, tiny_tokenizer.build_tiny_tokenizer, MossDataModule.__init__
    monkeypatch.setattr(
        MossTTSDConfig, "tiny", classmethod(lambda cls, *a, **k: built.update(["config"]) or tiny(*a, **k))
    )
    monkeypatch.setattr(
        tiny_tokenizer, "build_tiny_tokenizer", lambda *a, **k: built.update(["tok"]) or build_tokenizer(*a, **k)
    )
    monkeypatch.setattr(MossDataModule, "__init__", lambda self, *a, **k: built.update(["data"]) or init(self, *a, **k))
    schema = plan_module.schema_problems
    monkeypatch.setattr(plan_module, "schema_problems", lambda cfg: checked.append(cfg) or schema(cfg))

    overrides = [
        "data.epochs=1",
        "data.num_workers=0",
        "export.enabled=false",
        "data_card=null",
        "sanity_check.samples=0",
    ]
    result = train(compose_train(tmp_path, overrides))

    assert built == {"config": 1, "tok": 1, "data": 1}, built
    assert len(checked) == 1 and checked[0] is result["cfg"] and OmegaConf.is_readonly(result["cfg"])
    recorded = OmegaConf.load(result["output_dir"] / ".hydra" / "config.yaml")
    assert OmegaConf.to_container(recorded) == OmegaConf.to_container(result["cfg"])
    assert (
        recorded.trainer.max_steps == result["trainer"].max_steps == result["plan"].max_steps
    )  # derived, recorded, run
