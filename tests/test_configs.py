"""Every option of every config group composes with every experiment, passes the checks and instantiates.

Cheap parts are built for real: the LightningModule (its network stays a factory), the data module, the
callbacks, the loggers and the Trainer with its strategy. GPU experiments are built for the CPU here.
"""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from moss.config_checks import validate
from moss.errors import ConfigError
from moss.training.callbacks import build_callbacks
from tests.conftest import REPO, compose_train

CONF = REPO / "conf"
SKIPPED_GROUPS = {"hydra", "experiment", "codec", "release"}  # Hydra's own; the axis below; infer/preprocess only
GROUPS = {
    group.name: sorted(p.stem for p in group.glob("*.yaml"))
    for group in sorted(CONF.iterdir())
    if group.is_dir() and group.name not in SKIPPED_GROUPS
}
EXPERIMENTS = [None, *sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))]
# The default suite composes the defaults; each experiment (5-8 s each) runs with the slow tests (CI runs them).
WITH_SLOW_EXPERIMENTS = [e if e is None else pytest.param(e, marks=pytest.mark.slow) for e in EXPERIMENTS]
CPU = ["trainer.accelerator=cpu", "trainer.precision=32-true"]
# Combinations that make no sense; the checks must refuse them with a message naming the setting.
REFUSED = {
    ("tiny_lora", "model", "moss_ttsd"): "model.config.initializer_range is not a setting",  # use lora_v05
}


def default_groups(config: str) -> set[str]:
    """The config groups an entry config's defaults list composes (`- group: option`, overrides included)."""
    defaults = OmegaConf.to_container(OmegaConf.load(CONF / f"{config}.yaml")).get("defaults", [])
    names = {
        next(iter(entry)).removeprefix("override ").removeprefix("optional ")
        for entry in defaults
        if isinstance(entry, dict)
    }
    return {name.split("@")[0].strip("/") for name in names}


def test_every_group_is_covered():
    """Every option tested below is one train.py composes, and every group folder is used by some command."""
    # codec: train composes it for raw.* preprocessing only (codec=tiny runs end to end in test_raw_workflow.py).
    trained = default_groups("train") - {"hydra", "experiment", "local", "codec"}
    assert trained == set(GROUPS), (trained, set(GROUPS))  # each of train's groups, every option of it, below
    others = set().union(*(default_groups(p.stem) for p in CONF.glob("*.yaml") if p.stem != "train"))
    folders = {p.name for p in CONF.iterdir() if p.is_dir()}
    assert folders <= trained | others | {"hydra", "experiment"}, folders - trained - others  # nothing unused
    assert all(GROUPS.values())


@pytest.mark.parametrize("experiment", WITH_SLOW_EXPERIMENTS)
def test_every_option_composes_validates_and_instantiates(
    experiment, tmp_path, tiny_shards, tiny_tokenizer, real_layout_checkpoint
):
    settings = {
        "model.path": str(real_layout_checkpoint),  # a real-layout checkpoint for model=moss_ttsd
        "data.train_shards": str(tiny_shards),
        "data.val_shards": str(tiny_shards),  # the quality gate runs at validations
        "callbacks.audio_samples.codec_config": "codec.yaml",  # built lazily: only the setting is needed
        "callbacks.audio_samples.codec_checkpoint": "codec.ckpt",
        "callbacks.quality_gate.codec_config": "codec.yaml",  # the gate loads its codec and models lazily too
        "callbacks.quality_gate.codec_checkpoint": "codec.ckpt",
        "callbacks.quality_gate.scripts": str(tmp_path / "heldout.jsonl"),  # read when built: a bad line fails early
        "callbacks.quality_gate.asr_model": "openai/whisper-large-v3",
    }
    (tmp_path / "heldout.jsonl").write_text('{"text": "[S1]Hello.[S2]Hi."}\n')
    for group, options in GROUPS.items():
        for option in options:
            overrides = [f"experiment={experiment}"] if experiment else []
            overrides += [f"{group}={option}", *CPU]
            cfg = compose_train(tmp_path, overrides)
            for key, value in settings.items():  # only where the composed config has the setting
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(cfg, parent)
                if node is not None and leaf in node.keys():
                    node[leaf] = value
            where = f"experiment={experiment} {group}={option}"
            if (experiment, group, option) in REFUSED:
                with pytest.raises(ConfigError, match=REFUSED[experiment, group, option]):
                    validate(cfg)
                continue
            try:
                validate(cfg)
                module = instantiate(cfg.model)
                data = instantiate(cfg.data, _partial_=True)(tokenizer=tiny_tokenizer, model_config=module.config)
                callbacks = list(build_callbacks(cfg.get("callbacks")).values())
                loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
                trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
            except Exception as err:  # noqa: BLE001 - name the combination that failed
                raise AssertionError(f"{where}: {type(err).__name__}: {err}") from err
            assert trainer.max_steps == cfg.trainer.max_steps and data.builder is not None, where


def test_debug_wins_over_an_experiment(tmp_path):
    cfg = compose_train(tmp_path, ["experiment=lora_v05", "debug=fast_dev_run"])
    assert cfg.trainer.max_steps == 4 and cfg.callbacks.model_checkpoint.every_n_train_steps == 2
