"""Preemption and Ctrl-C: save a checkpoint at the next optimiser-step boundary and stop cleanly.

SIGTERM comes from schedulers and `kill`, SIGUSR1 from SLURM's `--signal=USR1@120`, SIGINT from Ctrl-C (a
second Ctrl-C aborts at once, without saving); `resume=auto` then continues the run exactly.

The handler only sets a flag (nothing unsafe happens inside a signal handler). A single process reads it at
every step boundary; several ranks agree on it with one tiny all-reduce every `check_every_n_steps` optimiser
steps (reading the result back is a device sync, too costly for every step), so every rank saves and stops
at the same step even when only one of them was signalled. Under SLURM with `requeue: true` the job is
requeued after the save.

Lightning's own SLURM auto-requeue (`SLURMEnvironment(auto_requeue=True)`, its default under SLURM) is turned off
while this callback runs (`cluster_plugins`): Lightning 2.6 saves its checkpoint *inside* the signal handler
(`_SignalConnector._slurm_sigusr_handler_fn`), wherever the step happens to be: between two micro-batches or
half-way through `optimizer.step()`, which no resume can continue exactly, and under DDP a collective save that the
ranks enter at different points. Lightning's SLURM environment itself (ranks, addresses) is kept.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment

from moss.settings import Count

log = logging.getLogger(__name__)


class PreemptionCheckpoint(L.Callback):
    """Save `<dirpath>/last.ckpt` and stop when one of `signals` arrives.

    Args:
        dirpath: where `last.ckpt` goes.
        signals: signal names that preempt.
        requeue: under SLURM, requeue the job after saving on SIGUSR1.
        check_every_n_steps: with several ranks, how often (in optimiser steps) they agree on the flag; keep
            `check_every_n_steps * step time` well inside the scheduler's grace period.
    """

    def __init__(
        self,
        dirpath: str,
        signals: tuple[Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP"], ...] = (
            "SIGTERM",
            "SIGUSR1",
            "SIGINT",
        ),
        requeue: bool = True,
        check_every_n_steps: Count = 5,
    ):
        self.dirpath, self.signals, self.requeue = Path(dirpath), tuple(signals), requeue
        self.check_every_n_steps = int(check_every_n_steps)
        self.received: str | None = None
        self._interrupts = 0
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT":
            self._interrupts += 1
            if self._interrupts > 1:  # the second Ctrl-C: abort now
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            # os.write: the one way to print that is safe inside a signal handler.
            os.write(2, b"\nCtrl-C: saving a checkpoint at the next step, then stopping (Ctrl-C again aborts)\n")
        self.received = self.received or name

    def on_train_start(self, trainer, pl_module) -> None:
        # Installed after Lightning's own handlers (registered when fit starts), so this one decides.
        for name in self.signals:
            self._previous[name] = signal.signal(getattr(signal, name), self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Each training batch is a whole optimiser step: the resumed run starts the next one.
        if trainer.world_size == 1:
            if not self.received:
                return
        else:
            if trainer.global_step % self.check_every_n_steps:
                return
            flag = torch.tensor(1.0 if self.received else 0.0).to(pl_module.device, non_blocking=True)
            if float(trainer.strategy.reduce(flag, reduce_op="max")) == 0.0:
                return
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # everything a resume needs (optimiser, loops, data)
        trainer.should_stop = True
        if not _validation_due(trainer):
            # Lightning validates when a run is told to stop: off the schedule, inside the scheduler's grace
            # period, and writing a best.ckpt an uninterrupted run never had. A validation due at this step runs.
            trainer.limit_val_batches = 0
        if trainer.is_global_zero:
            log.warning(
                "preempted (%s): saved %s at step %d; rerun with resume=auto",
                self.received or "peer",
                path,
                trainer.global_step,
            )
            job = os.environ.get("SLURM_JOB_ID")
            if self.requeue and job and self.received == "SIGUSR1":
                subprocess.run(["scontrol", "requeue", job], check=False)

    def on_train_end(self, trainer, pl_module) -> None:
        for name, previous in self._previous.items():
            signal.signal(getattr(signal, name), previous)
        self._previous = {}


def _validation_due(trainer) -> bool:
    """Whether the schedule (`val_check_interval` in steps) validates at the end of the current step."""
    every = trainer.val_check_batch
    if trainer.check_val_every_n_epoch is not None or not isinstance(every, int) or every <= 0:
        return False
    return (trainer.fit_loop.epoch_loop.total_batch_idx + 1) % every == 0


def cluster_plugins(preemption: PreemptionCheckpoint | None) -> list:
    """Trainer plugins: under SLURM, when `preemption` saves at step boundaries, SLURM without auto-requeue."""
    if preemption is None or not SLURMEnvironment.detect():
        return []
    return [SLURMEnvironment(auto_requeue=False)]
