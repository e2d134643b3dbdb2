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
    built.log_metrics({"train/loss": 1.25}, step=0)
    if logger == "wandb":
        assert not wandb_account_configured() and built._offline
        built.experiment.finish()
    else:
        built.finalize("success")
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    pattern = {"csv": "metrics.csv", "tensorboard": "events.out.tfevents.*", "wandb": "*.wandb"}[logger]
    logs = [p for p in written if p.match(pattern)]
    assert logs, f"{logger} wrote no {pattern} under {tmp_path}: {written}"
    if logger == "csv":
        assert "1.25" in logs[0].read_text()


def test_wandb_account_detection(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert not wandb_account_configured()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_account_configured()
