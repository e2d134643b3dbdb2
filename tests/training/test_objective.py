"""One optimiser step has the same gradient however its samples are laid out: padded or packed, one
micro-batch or gradient accumulation, one process or two DDP processes (DESIGN invariants 2 and 3)."""

import functools
import os

import lightning as L
import pytest
import torch

from moss.data.collate import PaddingCollator
from moss.data.examples import ExampleBuilder
from moss.data.loader import StepLoader
from moss.data.packing import collate_packs
from moss.data.synthetic import generate_samples
from moss.distributed import rank_and_world
from moss.model import MossTTSD, MossTTSDConfig
from moss.model.loss import channel_cross_entropy, normalized_weights
from moss.text import PromptBuilder
from moss.text.tiny_tokenizer import build_tiny_tokenizer
from moss.training import MossTTSDLitModule

CONFIG = dict(hidden_size=32, intermediate_size=64, head_dim=8)


class ListLoader:
    """Fixed micro-batches per rank, with the state interface StepLoader expects."""

    def __init__(self, per_rank):
        self.per_rank = per_rank

    def __iter__(self):
        rank, _ = rank_and_world()
        return iter(self.per_rank[rank])

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class GradCapture(L.Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters() if p.grad is not None}
        torch.save(grads, os.path.join(self.out_dir, f"grads-rank{trainer.global_rank}.pt"))


def examples():
    builder = ExampleBuilder(PromptBuilder(build_tiny_tokenizer(), speech_offset=384), text_pad_id=368)
    return [builder(s) for s in generate_samples(4, seed=21)]


def step_gradients(
    tmp_path, per_rank, accumulate=1, devices=1, attn="sdpa", checkpointing=False, clip=None, metrics=None
):
    module = MossTTSDLitModule(
        config=MossTTSDConfig.tiny(**CONFIG),
        net=functools.partial(MossTTSD.from_config, seed=0, attn_implementation=attn),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        channel_weights=[8, 2, 1, 1, 1, 1, 1, 1],
        gradient_checkpointing=checkpointing,
        gradient_clip_val=clip,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[GradCapture(str(tmp_path))],
        use_distributed_sampler=False,
    )
    loader = StepLoader(ListLoader(per_rank), accumulate=accumulate, steps=1)
    trainer.fit(module, train_dataloaders=loader)
    if metrics is not None:
        metrics.update(trainer.callback_metrics)
    return torch.load(tmp_path / "grads-rank0.pt", weights_only=True)


def reference_gradients(exs):
    """Float64 recomputation of the step objective sum_c w_c * CE_sum_c / N_c, each sample run alone."""
    model = MossTTSD.from_config(MossTTSDConfig.tiny(**CONFIG), seed=0).double()
    model.freeze_unused_token_table()
    sums, counts = 0, 0
    for e in exs:
        out = model(torch.from_numpy(e.input_ids).long()[None], labels=torch.from_numpy(e.labels).long()[None])
        sums, counts = sums + out.channel_loss_sums.double(), counts + out.channel_label_counts
    (normalized_weights([8, 2, 1, 1, 1, 1, 1, 1]).double() * sums / counts).sum().backward()
    return {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(grads, reference):
    assert grads.keys() == reference.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def exs():
    return examples()


@pytest.fixture(scope="module")
def reference(exs):
    return reference_gradients(exs)


def pack(*groups, exs):
    budget = max(sum(exs[i].rows for i in g) for g in groups) + 3
    return collate_packs([[exs[i] for i in g] for g in groups], budget, text_pad_id=368)


def test_padded_batch(tmp_path, exs, reference):
    batch = PaddingCollator(368)(exs)
    assert_same(step_gradients(tmp_path, [[batch]]), reference)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "varlen_sdpa"])
def test_packed_batch(tmp_path, exs, reference, attn):
    assert_same(step_gradients(tmp_path, [[pack([0, 1], [2, 3], exs=exs)]], attn=attn), reference)


def test_packed_batch_with_activation_checkpointing(tmp_path, exs, reference):
    grads = step_gradients(tmp_path, [[pack([0, 1], [2, 3], exs=exs)]], attn="varlen_sdpa", checkpointing=True)
    assert_same(grads, reference)


def test_packed_with_gradient_accumulation(tmp_path, exs, reference):
    micro = [pack([0, 1, 2], exs=exs), pack([3], exs=exs)]  # deliberately unequal label counts
    assert_same(step_gradients(tmp_path, [micro], accumulate=2), reference)


def test_clipping_scales_the_step_gradient_to_the_limit_and_logs_the_norm_before(tmp_path, exs, reference):
    micro = [pack([0, 1, 2], exs=exs), pack([3], exs=exs)]
    metrics = {}
    grads = step_gradients(tmp_path, [micro], accumulate=2, clip=1e-3, metrics=metrics)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in reference.values()]))
    assert float(metrics["train/grad_norm"]) == pytest.approx(float(norm), rel=1e-5)  # pre-clip, whole step
    assert norm > 1e-2  # so the limit really cut it
    assert_same(grads, {name: g * (1e-3 / norm) for name, g in reference.items()})


@pytest.mark.slow  # several processes (CI runs slow tests too)
def test_two_ddp_processes(tmp_path, exs, reference):
    per_rank = [[pack([0], exs=exs), pack([1, 2], exs=exs)], [PaddingCollator(368)([exs[3]]), pack([], exs=exs)]]
    assert_same(step_gradients(tmp_path, per_rank, accumulate=2, devices=2), reference)


class PerMicroBatchMean(MossTTSDLitModule):
    """What plain accumulation does: the mean of per-micro-batch means (pitfall P4)."""

    def training_step(self, step, batch_idx):
        optimizer = self.optimizers()
        for micro in step.micro:
            self.manual_backward(self(micro).loss / len(step))
        optimizer.step()
        optimizer.zero_grad()


def test_the_naive_objective_would_be_caught(tmp_path, exs, reference, monkeypatch):
    monkeypatch.setattr(MossTTSDLitModule, "training_step", PerMicroBatchMean.training_step)
    micro = [pack([0, 1, 2], exs=exs), pack([3], exs=exs)]
    grads = step_gradients(tmp_path, [micro], accumulate=2)
    with pytest.raises(AssertionError):
        assert_same(grads, reference)


def test_pack_sums_are_the_sums_of_its_samples(exs):
    """No loss leaks across sample boundaries inside a pack; the collator's counts match the loss's."""
    model = MossTTSD.from_config(MossTTSDConfig.tiny(**CONFIG), seed=0).eval()
    batch = pack([0, 1, 2, 3], exs=exs)
    with torch.no_grad():
        hidden = model(batch.input_ids, position_ids=batch.position_ids).last_hidden_state
        packed = channel_cross_entropy(hidden, [h.weight for h in model.lm_heads], batch.labels)
        alone = [
            model(torch.from_numpy(e.input_ids).long()[None], labels=torch.from_numpy(e.labels).long()[None])
            for e in exs
        ]
    assert torch.equal(packed.counts, batch.label_counts)
    assert torch.equal(packed.counts, sum(o.channel_label_counts for o in alone))
    torch.testing.assert_close(packed.sums, sum(o.channel_loss_sums for o in alone), rtol=1e-5, atol=1e-4)
