"""Under SLURM, Lightning's own requeue handler (which saves mid-step, inside the signal handler) stays off while
the preemption callback, which saves at a step boundary, is configured; Lightning's SLURM environment stays."""

import signal

import lightning as L
from lightning.pytorch.plugins.environments import SLURMEnvironment

from moss.training.preemption import PreemptionCheckpoint, cluster_plugins

FAKE_SLURM = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "42", "SLURM_NODELIST": "node1"}


def test_outside_slurm_lightning_chooses_the_environment(tmp_path, monkeypatch):
    for name in FAKE_SLURM:
        monkeypatch.delenv(name, raising=False)
    assert cluster_plugins(PreemptionCheckpoint(str(tmp_path))) == []


def test_under_slurm_the_callback_saves_and_lightning_does_not(tmp_path, monkeypatch):
    for name, value in FAKE_SLURM.items():
        monkeypatch.setenv(name, value)
    assert cluster_plugins(None) == []  # no preemption callback: Lightning's default auto-requeue is left alone
    plugins = cluster_plugins(PreemptionCheckpoint(str(tmp_path)))
    assert [type(p) for p in plugins] == [SLURMEnvironment] and plugins[0].auto_requeue is False

    before = signal.getsignal(signal.SIGUSR1)
    trainer = L.Trainer(accelerator="cpu", devices=1, plugins=plugins, logger=False, enable_checkpointing=False)
    assert trainer._accelerator_connector.cluster_environment is plugins[0]
    trainer._signal_connector.register_signal_handlers()  # what fit() does first
    try:
        assert signal.getsignal(signal.SIGUSR1) is before  # no mid-step save handler installed
    finally:
        trainer._signal_connector.teardown()

    # the contrast: Lightning's default under SLURM installs its saving handler
    default = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    assert default._accelerator_connector.cluster_environment.auto_requeue is True
    default._signal_connector.register_signal_handlers()
    try:
        assert signal.getsignal(signal.SIGUSR1) is not before
    finally:
        default._signal_connector.teardown()
