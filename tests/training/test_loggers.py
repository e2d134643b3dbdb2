"""Every logger config instantiates; wandb stays offline without an account."""

import pytest
from hydra.utils import instantiate

from moss.training.loggers import wandb_account_configured
from tests.conftest import compose_train


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb"])
def test_logger_configs_instantiate(tmp_path, logger, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no wandb account
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = compose_train(tmp_path, [f"logger={logger}"])
    (built,) = [instantiate(c) for c in cfg.logger.values()]
    built.log_metrics({"train/loss": 1.0}, step=0)
    if logger == "wandb":
        assert not wandb_account_configured() and built._offline
        built.experiment.finish()


def test_wandb_account_detection(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert not wandb_account_configured()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_account_configured()
