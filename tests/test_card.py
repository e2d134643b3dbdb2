"""The product card's invocations, literally: `+experiment=x` on 2 CPU ranks, a `-m` sweep, `infer.py checkpoint=`."""

import json

import pytest
from omegaconf import OmegaConf

from moss.cli import slot_additions_as_choices
from tests.conftest import REPO, compose_config
from tests.test_cli import run


@pytest.mark.parametrize("experiment", ["tiny_lora", "lora_v05", "full_v05"])
@pytest.mark.parametrize("debug", [[], ["debug=fast_dev_run"], ["+debug=fast_dev_run"]])
def test_plus_experiment_composes_the_same_config_as_experiment(experiment, debug):
    argv = ["train.py", f"+experiment={experiment}", "trainer.devices=8", *debug]
    plus = compose_config("train", slot_additions_as_choices(REPO / "conf", "train", argv)[1:])
    plain = compose_config("train", [f"experiment={experiment}", "trainer.devices=8", *[d.lstrip("+") for d in debug]])
    assert OmegaConf.to_yaml(plus) == OmegaConf.to_yaml(plain)
    if debug:  # debug= still wins over the experiment (whose max_steps it replaces)
        assert plus.trainer.max_steps == 4


def test_additions_that_are_not_slots_are_left_alone():
    argv = ["train.py", "+trainer.max_time=00:01:00:00", "++seed=3", "+experiment=tiny_lora"]
    assert slot_additions_as_choices(REPO / "conf", "train", argv) == [
        "train.py",
        "+trainer.max_time=00:01:00:00",
        "++seed=3",
        "experiment=tiny_lora",
    ]


@pytest.mark.slow  # a 2-rank run, a 2-job sweep and three inference runs (about 90 s)
def test_the_cards_three_invocations_as_written(tmp_path):
    from moss.model import MossTTSD, MossTTSDConfig
    from moss.text.tiny_tokenizer import build_tiny_tokenizer

    base = tmp_path / "base"  # a base model folder, as model.path names one in real jobs (the adapter records it)
    MossTTSD.from_config(MossTTSDConfig.tiny(), seed=0).save_pretrained(base)
    build_tiny_tokenizer().save_pretrained(base)
    root = f"paths.root={tmp_path / 'runs'}"
    card = ["+experiment=tiny_lora", "trainer.devices=2", f"model.path={base}", "trainer.max_steps=4", root]
    done = run([str(REPO / "train.py"), *card], cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny_lora"
    assert (run_dir / "train_rank1.log").is_file()  # two ranks trained
    recorded = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert recorded.name == "tiny_lora" and recorded.model.peft is not None  # the LoRA experiment ran

    sweep = run(
        [str(REPO / "train.py"), "-m", "seed=1,2", "debug=fast_dev_run", root, "name=sweep"], cwd=tmp_path, timeout=300
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    for job in ("0", "1"):
        folder = tmp_path / "runs" / "sweep-multirun" / job
        assert (folder / "export" / "model.safetensors").is_file() and (folder / "logs").is_dir()
        assert OmegaConf.load(folder / ".hydra" / "config.yaml").seed == int(job) + 1

    for checkpoint in (run_dir / "checkpoints" / "last.ckpt", run_dir / "export", run_dir / "adapter"):
        out = tmp_path / "out" / checkpoint.name
        done = run(
            [
                str(REPO / "infer.py"),
                f"checkpoint={checkpoint}",
                "codec=tiny",
                f"output_dir={out}",
                "text=[S1]Hello there.[S2]Hi!",
                "max_seconds=1",
            ],
            cwd=tmp_path,
            timeout=300,
        )
        assert done.returncode == 0, (checkpoint, done.stderr[-3000:])
        (line,) = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
        assert line["index"] == 0 and ("path" in line or line["error"].startswith("generated no audio"))
