"""data.epochs: the planned steps match a real pass over the data, and a run of N epochs makes N passes."""

import csv
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moss.data.dataset import ShardStream, expand_shards
from moss.data.epochs import plan_epochs, sample_frames
from moss.data.examples import ExampleBuilder
from moss.data.synthetic import generate_samples
from moss.data.writer import write_shards
from moss.errors import ConfigError
from moss.text import PromptBuilder
from tests.conftest import compose_train
from train import train

PACKING = {"budget": 1024, "window": 64, "min_fill": 0.99, "packs_per_batch": 1}


@pytest.fixture
def corpus(tmp_path, tiny_tokenizer):
    write_shards(generate_samples(256, seed=5), tmp_path / "s", prefix="e", max_samples=32)
    builder = ExampleBuilder(PromptBuilder(tiny_tokenizer, speech_offset=384), text_pad_id=368, max_rows=1024)
    return expand_shards(str(tmp_path / "s")), builder


def one_pass(urls, builder, packing):
    """Micro-batches of one real pass (the stream's own packer or padding)."""
    packer = {k: v for k, v in packing.items() if k != "packs_per_batch"} if packing else None
    return len(list(ShardStream(urls, builder, repeat=False, shuffle=True, seed=1, packer=packer, batch_size=4)))


@pytest.mark.parametrize("packing", [PACKING, None])
def test_planned_micro_batches_match_a_real_pass(corpus, packing):
    urls, builder = corpus
    plan = plan_epochs(urls, 3, builder, packing, batch_size=4, world_size=2, accumulate=2)
    real = one_pass(urls, builder, packing)
    assert plan.samples == 256 and plan.micro_batches_per_epoch == pytest.approx(real, rel=0.05)
    assert plan.steps_per_epoch == round(plan.micro_batches_per_epoch / 4)
    assert plan.max_steps == -(-3 * plan.micro_batches_per_epoch // 4)  # ceil(3 epochs / 4 micro-batches per step)


def test_over_long_samples_are_not_counted(corpus):
    urls, builder = corpus
    frames = sample_frames(urls)
    budget = {**PACKING, "budget": sorted(frames)[len(frames) // 2] + 40}  # about half the samples too long
    plan = plan_epochs(urls, 1, builder, budget, batch_size=1, world_size=1, accumulate=1)
    assert 0.2 * len(frames) < plan.samples < 0.8 * len(frames)


def test_shards_without_a_manifest_are_refused(corpus):
    urls, builder = corpus
    (Path(urls[0]).parent / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="data.epochs needs the manifest.*set trainer.max_steps"):
        plan_epochs(urls, 1, builder, PACKING, batch_size=1, world_size=1, accumulate=1)


@pytest.mark.slow
def test_a_run_of_two_epochs_validates_once_per_epoch_and_reads_the_data_twice(tmp_path, capsys):
    result = train(compose_train(tmp_path, ["data.epochs=2", "data.num_workers=0", "data.shuffle_buffer=8"]))
    plan, trainer = result["plan"], result["trainer"]
    assert trainer.global_step == trainer.max_steps == plan.max_steps and plan.samples == 1024
    rows = list(csv.DictReader(open(result["output_dir"] / "logs" / "metrics.csv")))
    assert len([r for r in rows if r.get("val/loss")]) == 2  # once per epoch
    assert 1.9 <= result["summary"]["samples"] / plan.samples <= 2.1
    epochs_logged = [float(r["data/epoch"]) for r in rows if r.get("data/epoch")]
    assert epochs_logged == sorted(epochs_logged) and 1.8 <= epochs_logged[-1] <= 2.1
    assert "trained (" in capsys.readouterr().out
    recorded = OmegaConf.load(result["output_dir"] / ".hydra" / "config.yaml")  # the config that ran, not as composed
    assert recorded.trainer.max_steps == plan.max_steps and recorded.trainer.val_check_interval == plan.steps_per_epoch
    assert recorded.callbacks.model_checkpoint.every_n_train_steps == plan.steps_per_epoch != 100
