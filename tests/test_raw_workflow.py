"""One command from raw JSONL + audio to a fine-tuned model: preprocess into the run, plan epochs, train,
export the best checkpoint; a rerun reuses or redoes the shards as their sources say."""

import json

import pytest

from data_pipelines.demo_corpus import write_demo_corpus
from data_pipelines.preprocess import preprocess, preprocess_config
from moss.errors import ConfigError
from tests.conftest import compose_train
from train import train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_demo_corpus(tmp_path_factory.mktemp("demo"), dialogues=24, val=4)


def raw_run(tmp_path, corpus, *extra):
    overrides = [
        f"raw.train=[{corpus['train']}]",
        f"raw.val=[{corpus['val']}]",
        "codec=tiny",
        "data.epochs=3",
        "data.num_workers=0",
        "raw.settings={progress: false}",
        *extra,
    ]
    return train(compose_train(tmp_path, overrides))


def test_one_command_from_raw_jsonl_to_an_exported_model(tmp_path, corpus, capsys):
    result = raw_run(tmp_path, corpus)
    out, plan = result["output_dir"], result["plan"]
    manifest = json.loads(next((out / "shards" / "train").glob("manifest*.json")).read_text())
    assert manifest["samples"] == 24 == plan.samples and (out / "shards" / "val" / "plan.json").is_file()
    assert result["trainer"].global_step == plan.max_steps and 2.9 <= result["summary"]["samples"] / 24 <= 3.1
    assert (out / "checkpoints" / "best.ckpt").is_file() and result["exported"]["weights"].startswith("best.ckpt")
    assert (out / "export" / "generation_config.json").is_file()
    printed = capsys.readouterr().out
    assert "encoded 24 samples" in printed and "encoded 4 samples" in printed
    # Resuming the finished run reuses its shards (nothing is written again).
    shards = {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*.tar")}
    again = raw_run(tmp_path, corpus, "resume=auto", f"trainer.max_steps={plan.max_steps}")
    assert again["trainer"].global_step == plan.max_steps
    assert {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*.tar")} == shards


def test_changed_inputs_redo_the_shards_of_a_new_run_and_stop_a_resumed_one(tmp_path, corpus):
    changed = tmp_path / "train.jsonl"
    changed.write_text("".join(corpus["train"].read_text().splitlines(keepends=True)[:12]))
    moved = dict(corpus, train=changed)
    (tmp_path / "audio").symlink_to(corpus["train"].parent / "audio")  # its relative audio paths resolve here
    out = tmp_path / "out" / "shards" / "train"  # the run directory of compose_train
    # A shard folder left by an earlier attempt over the full file (no checkpoints yet): redone, not mixed.
    tiny = {"tiny": True, "seed": 0, "name": "tiny-random"}
    preprocess(preprocess_config([corpus["train"]], out, tiny, progress=False))
    assert json.loads(next(out.glob("manifest*.json")).read_text())["samples"] == 24
    result = raw_run(tmp_path, moved, "trainer.max_steps=2", "data.epochs=null")
    manifest = json.loads(next(out.glob("manifest*.json")).read_text())
    assert manifest["samples"] == 12 and result["trainer"].global_step == 2
    changed.write_text(corpus["train"].read_text())
    with pytest.raises(ConfigError, match="made from other sources .*cannot be continued"):
        raw_run(tmp_path, moved, "resume=auto", "trainer.max_steps=4", "data.epochs=null")


def test_preprocessing_refuses_to_mix_shards_of_changed_sources(tmp_path, corpus):
    tiny = {"tiny": True, "seed": 0, "name": "tiny-random"}
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text(corpus["train"].read_text())
    (tmp_path / "audio").symlink_to(corpus["train"].parent / "audio")
    preprocess(preprocess_config([jsonl], tmp_path / "s", tiny, progress=False, limit=4))
    preprocess(preprocess_config([jsonl], tmp_path / "s", tiny, progress=False, limit=4))  # same sources: resumes
    with pytest.raises(ConfigError, match=r"written from other sources \(limits\)"):
        preprocess(preprocess_config([jsonl], tmp_path / "s", tiny, progress=False, limit=4, limits={"min_seconds": 1}))
    jsonl.write_text(corpus["train"].read_text() + corpus["val"].read_text())
    with pytest.raises(ConfigError, match=r"written from other sources \(train.jsonl changed\).*delete"):
        preprocess(preprocess_config([jsonl], tmp_path / "s", tiny, progress=False, limit=4))


def test_a_few_raw_records_get_enough_shards_for_the_loader_workers(tmp_path, corpus):
    few = tmp_path / "few.jsonl"
    few.write_text("".join(corpus["train"].read_text().splitlines(keepends=True)[:3]))
    (tmp_path / "audio").symlink_to(corpus["train"].parent / "audio")
    result = train(
        compose_train(
            tmp_path,
            [
                f"raw.train=[{few}]",
                "codec=tiny",
                "data.num_workers=4",
                "trainer.max_steps=2",
                "raw.settings={progress: false}",
            ],
        )
    )
    assert len(list((result["output_dir"] / "shards" / "train").glob("*.tar"))) == 3  # one record per shard
    assert result["trainer"].global_step == 2 and result["trainer"].datamodule.num_workers == 3
