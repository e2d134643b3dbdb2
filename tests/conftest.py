"""Shared fixtures: golden vectors, tiny model/tokenizer/shards, composed configs; hygiene."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from moss.data.synthetic import generate_samples
from moss.data.writer import write_shards
from moss.model import MossTTSD, MossTTSDConfig

REPO = Path(__file__).resolve().parents[1]
# Reference vectors computed by the original Apache-2.0 code (see their README), vendored so that every clone
# runs the parity tests; a missing folder fails them loudly instead of skipping them.
GOLDEN = Path(os.environ.get("MOSS_GOLDEN_DIR", REPO / "tests" / "fixtures" / "golden"))
requires_golden = pytest.mark.usefixtures("golden")


@pytest.fixture(autouse=True)
def _hygiene():
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="session")
def golden() -> Path:
    if not (GOLDEN / "README.md").is_file():
        pytest.fail(f"golden vectors not found at {GOLDEN} (tests/fixtures/golden, or MOSS_GOLDEN_DIR)")
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from moss.text.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture
def tiny_config() -> MossTTSDConfig:
    return MossTTSDConfig.tiny(hidden_size=32, intermediate_size=64, head_dim=8)


@pytest.fixture
def tiny_model(tiny_config) -> MossTTSD:
    return MossTTSD.from_config(tiny_config, seed=0).eval()


@pytest.fixture
def tiny_shards(tmp_path) -> Path:
    """A shard set of 48 synthetic samples in 6 shards, written through the production writer."""
    out = tmp_path / "shards"
    write_shards(generate_samples(48, seed=3), out, prefix="tiny", max_samples=8)
    return out


def random_batch(config: MossTTSDConfig, batch: int = 2, length: int = 12, seed: int = 0):
    """Random valid input_ids/labels `[B, T, C]` for a config (labels with some -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randint(0, v, (batch, length), generator=g) for v in config.channel_vocab_sizes], dim=-1)
    labels = ids.clone()
    labels[torch.rand(labels.shape, generator=g) < 0.3] = -100
    return ids, labels


def compose_config(name: str, overrides: list[str] = ()):
    """A real conf/<name>.yaml composed as its command would (defaults lists included), without a Hydra run."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def compose_train(tmp_path: Path, overrides: list[str] = ()):
    """The real conf/train.yaml composed with test paths (no Hydra runtime needed)."""
    return compose_config(
        "train", [f"paths.root={tmp_path / 'runs'}", f"paths.output_dir={tmp_path / 'out'}", *overrides]
    )


@pytest.fixture
def real_layout_checkpoint(tmp_path, tiny_tokenizer) -> Path:
    """A tiny random model saved in the original layout, with its tokenizer: stands in for model.path."""
    folder = tmp_path / "tiny-checkpoint"
    MossTTSD.from_config(MossTTSDConfig.tiny(), seed=0).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


class BatchRecorder(__import__("lightning").Callback):
    """Test helper: appends (step, keys, loss) of every optimiser step to a JSONL file.

    `loss` is the logged `train/loss` of the step (log every step to see each one); keys are its samples' keys,
    micro-batch after micro-batch, and passes the pass each was read in.
    """

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import json

        path = self.path if trainer.world_size == 1 else f"{self.path}.rank{trainer.global_rank}"
        with open(path, "a") as f:
            keys = [key for stats in batch.stats for key in stats.keys]
            passes = [p for stats in batch.stats for p in stats.passes]
            loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
            f.write(json.dumps({"step": trainer.global_step, "keys": keys, "passes": passes, "loss": loss}))
            f.write("\n")


class StopAtStep(__import__("lightning").Callback):
    """Test helper: stops training after `step` optimiser steps, as a preempted job would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class LogitsAtEnd(__import__("lightning").Callback):
    """Test helper: after training, every rank runs the (possibly sharded) model on a fixed batch; rank 0 saves
    the channel-0 and channel-1 logits to `path`."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        ids, _ = random_batch(pl_module.config, batch=1, length=24, seed=7)
        pl_module.model.eval()
        with torch.no_grad():
            logits = pl_module.model(ids.to(pl_module.device), output_logits=True).logits
        if trainer.is_global_zero:
            torch.save({"ids": ids, "ch0": logits[0].cpu(), "ch1": logits[1].cpu()}, self.path)


@pytest.fixture
def tiny_inference(tmp_path, tiny_tokenizer):
    """A tiny model folder and codec on disk, and an infer config over them (no golden files needed)."""
    import yaml

    from moss.codec import XYTokenizer, XYTokenizerConfig
    from moss.model import MossTTSD, MossTTSDConfig

    MossTTSD.from_config(MossTTSDConfig.tiny(), seed=0).save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    config = XYTokenizerConfig.tiny()
    (tmp_path / "codec.yaml").write_text(yaml.safe_dump({"generator_params": config.params}))
    torch.save(XYTokenizer.from_config(config, seed=0).state_dict(), tmp_path / "codec.ckpt")
    cfg = compose_config("infer", ["checkpoint=x", "output_dir=x"])
    cfg.checkpoint, cfg.codec.config, cfg.codec.checkpoint = str(tmp_path / "model"), "", ""
    cfg.codec.config, cfg.codec.checkpoint = str(tmp_path / "codec.yaml"), str(tmp_path / "codec.ckpt")
    cfg.output_dir, cfg.progress, cfg.max_seconds, cfg.batch_size = str(tmp_path / "out"), False, 0.8, 8
    cfg.sampling = {"do_sample": False}
    return cfg


class SignalAtStep(__import__("lightning").Callback):
    """Test helper: sends this process `signal` after `step` optimiser steps, as a scheduler's preemption would."""

    def __init__(self, step: int, signal: str = "SIGTERM"):
        self.step, self.signal = step, signal

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import os
        import signal

        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal))


@pytest.fixture
def ctrl_c_interrupts():
    """SIGINT raising KeyboardInterrupt, as in a terminal's Python (a shell's background job starts with it
    ignored), for a test that checks a run leaves it so; restored afterwards."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(size)`: a folder on a tmpfs of that size, to fill up (mounting needs root; skipped without)."""
    import subprocess

    mounted = []

    def mount(size: int | str, read_only: bool = False) -> Path:  # MiB, or tmpfs's own "40k"
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        options = f"size={size if isinstance(size, str) else f'{size}m'}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


class FailAtStep(__import__("lightning").Callback):
    """Test helper: raises after `step` optimiser steps, as a bug or a lost device would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise RuntimeError(f"failed at step {trainer.global_step}")


class InterruptAtStep(__import__("lightning").Callback):
    """Test helper: a second Ctrl-C at `step` (the KeyboardInterrupt the preemption handler raises for it); step 0:
    a Ctrl-C while the run sets up (preprocessing, the data card), before Lightning installs its handlers."""

    def __init__(self, step: int):
        self.step = step

    def setup(self, trainer, pl_module, stage):
        if self.step == 0:
            raise KeyboardInterrupt

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise KeyboardInterrupt


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) for the session: see tests/s3.py."""
    from tests.s3 import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The S3 server, with this process's (and its children's) AWS settings pointing at it."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server
