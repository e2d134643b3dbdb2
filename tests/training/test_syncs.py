"""A training step reads nothing back from the device: no host syncs in the model, loss, module or callbacks.

On a GPU every `.item()`, `.tolist()`, `bool(tensor)`, `nonzero()` or `.cpu()` of a device tensor stalls the
host until the GPU has caught up, and every Python number given to `self.log` is copied to the device
synchronously. Here, on CPU, those calls are counted wherever our training code (`moss/`, outside the CPU-only
data pipeline) makes them, directly or through torch, during real Lightning steps of the tiny default; the
batch fields the model deliberately keeps on the host (`cu_seqlens`, `label_counts`) do not count. The
budget: nothing on ordinary steps, at most 2 on the steps whose metrics are logged. (tests/gpu/ counts real
CUDA syncs.)
"""

import os
import sys
from collections import Counter
from pathlib import Path

import lightning as L
import torch

from moss.data.batch import StepBatch
from moss.training.lit_module import MossTTSDLitModule
from tests.conftest import compose_train
from train import train

MOSS = str(Path(__file__).resolve().parents[2] / "moss")
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


def _counted_caller() -> str | None:
    """The first frame outside torch, if it is our training code (not the CPU-only data pipeline)."""
    frame = sys._getframe(2)
    while frame is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
        frame = frame.f_back
    if frame is None:
        return None
    name = frame.f_code.co_filename
    # progress.py formats host metrics only (it skips device tensors by construction): not a sync.
    if name.startswith(MOSS) and f"{MOSS}/data/" not in name and not name.endswith("progress.py"):
        return f"{Path(name).name}:{frame.f_lineno}"
    return None


class ReadCounter(L.Callback):
    """Counts host reads (and Python numbers logged) per optimiser step while training steps run."""

    def __init__(self, monkeypatch):
        self.active, self.step = False, None
        self.reads: dict[int, Counter] = {}
        self.host_ptrs: set[int] = set()
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), name))
        monkeypatch.setattr(torch, "nonzero", self._wrap(torch.nonzero, "nonzero"))
        log, transfer = MossTTSDLitModule.log, StepBatch.to
        counter = self

        def logged(module, name, value, *args, **kwargs):
            if counter.active and not torch.is_tensor(value):
                counter._count(f"self.log({name!r}, <Python number>)")
            return log(module, name, value, *args, **kwargs)

        def moved(step, *args, **kwargs):
            out = transfer(step, *args, **kwargs)
            host = [t for micro in out.micro for t in (micro.cu_seqlens, micro.label_counts) if t is not None]
            counter.host_ptrs = {t.untyped_storage().data_ptr() for t in host}
            return out

        monkeypatch.setattr(MossTTSDLitModule, "log", logged)
        monkeypatch.setattr(StepBatch, "to", moved)

    def _wrap(self, original, name):
        counter = self

        def wrapper(tensor, *args, **kwargs):
            if counter.active and tensor.untyped_storage().data_ptr() not in counter.host_ptrs:
                caller = _counted_caller()
                if caller is not None:
                    counter._count(f"{name} at {caller}")
            return original(tensor, *args, **kwargs)

        return wrapper

    def _count(self, what: str) -> None:
        self.reads.setdefault(self.step, Counter())[what] += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step, self.active = trainer.global_step, True

    def on_validation_start(self, trainer, pl_module):
        self.active = False

    def on_validation_end(self, trainer, pl_module):
        self.active = True

    def on_train_end(self, trainer, pl_module):
        self.active = False


def test_training_steps_read_nothing_back_except_once_per_logged_step(tmp_path, monkeypatch):
    counter = ReadCounter(monkeypatch)
    cfg = compose_train(
        tmp_path,
        [
            "trainer.max_steps=12",
            "trainer.log_every_n_steps=5",
            "trainer.val_check_interval=6",
            "data.accumulate_grad_batches=2",
            "data.num_workers=0",
            "callbacks.model_checkpoint.every_n_train_steps=6",
            "callbacks.throughput.window=3",
        ],
    )
    monkeypatch.setattr(L.Trainer, "__init__", _with_callback(L.Trainer.__init__, counter))
    train(cfg)
    logged_steps = {0, 4, 9, 11}  # the first, every 5th (Lightning writes its loggers then) and the last
    for step in range(12):
        reads = counter.reads.get(step, Counter())
        budget = 2 if step in logged_steps else 0
        assert sum(reads.values()) <= budget, f"step {step}: {dict(reads)}"
    assert any(counter.reads.get(step) for step in logged_steps), "the counter saw nothing: is it wired in?"


def _with_callback(init, callback):
    def wrapped(self, *args, callbacks=None, **kwargs):
        return init(self, *args, callbacks=[*(callbacks or []), callback], **kwargs)

    return wrapped
