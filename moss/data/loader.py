"""Optimiser steps over a resumable loader, for an exactly normalised loss.

The loss of one optimiser step divides each channel's summed cross-entropy by that channel's valid-label
count over the *whole step*: every micro-batch of gradient accumulation (and, in the module, every rank).
`StepLoader` groups the `k` micro-batches of a step into one `StepBatch`, which carries their summed counts;
the module's `training_step` runs the whole step.

It has a length (`max_steps`), so Lightning does not pre-fetch a step beyond the one it trains on, and a
`state_dict`: the position of the wrapped `StatefulDataLoader` after the last whole step handed out, which is
where a resumed run continues (checkpoints are written between steps). Under DDP only rank 0 writes the
checkpoint, so the state of *every* rank's stream is gathered into it, and each rank restores its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
import torch.distributed as dist

from moss.data.batch import PackedBatch, StepBatch
from moss.distributed import is_initialized, rank_and_world
from moss.errors import ConfigError

log = logging.getLogger(__name__)


class StepLoader:
    """Yields one `StepBatch` of `accumulate` micro-batches per optimiser step.

    Args:
        loader: a `torchdata.stateful_dataloader.StatefulDataLoader` yielding `PackedBatch` micro-batches.
        accumulate: micro-batches per optimiser step (`data.accumulate_grad_batches`).
        steps: optimiser steps in the whole run (`trainer.max_steps`).
    """

    def __init__(self, loader, accumulate: int, steps: int):
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        self.loader, self.accumulate, self.steps = loader, accumulate, steps
        self._active: Iterator[StepBatch] | None = None

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[StepBatch]:
        self._active = self._steps()
        return self._active

    def close(self) -> None:
        """Let go of the loader: its worker processes stop once nothing else holds it (end of training)."""
        if self._active is not None:
            self._active.close()
        self._active, self.loader = None, None

    def _steps(self) -> Iterator[StepBatch]:
        iterator = iter(self.loader)
        while True:
            micro = []
            for _ in range(self.accumulate):
                try:
                    micro.append(next(iterator))
                except StopIteration:
                    break
            if micro:
                yield StepBatch(tuple(micro))
            if len(micro) < self.accumulate:
                return

    def state_dict(self) -> dict:
        """`{"ranks": [state of rank 0, rank 1, ...]}`; a collective call under torch.distributed."""
        local = {"loader": self.loader.state_dict(), "workers": self.loader.num_workers}
        if not is_initialized():
            return {"ranks": [local]}
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, local)
        return {"ranks": states}

    def load_state_dict(self, state: dict) -> None:
        """Restore this rank's stream; from a checkpoint of another layout, continue every reader's unfinished work.

        Same ranks and loader workers: each stream continues exactly where it stopped (bit-exact). Other counts:
        what all the saved readers left unfinished of their passes is shared out among this run's readers, each
        sample once, and every reader then starts the next pass (`ShardStream.resume_elsewhere`).
        """
        ranks = state["ranks"]
        rank, world = rank_and_world()
        layout = [r.get("workers", self.loader.num_workers) for r in ranks]
        if layout == [self.loader.num_workers] * world:
            self.loader.load_state_dict(ranks[rank]["loader"])
            return
        readers = [stream for saved in ranks for stream in _stream_states(saved["loader"])]
        log.warning(
            "the checkpoint's data was read by %d ranks x %s loader workers, this run has %d x %d: what its %d "
            "readers left of their passes is shared out among the %d new ones (each sample once), then the next "
            "pass starts",
            len(ranks), "/".join(map(str, sorted(set(layout)))), world, self.loader.num_workers, len(readers),
            world * max(1, self.loader.num_workers),
        )  # fmt: skip
        self.loader.dataset.resume_elsewhere(readers)


def _stream_states(loader_state: dict) -> list[dict]:
    """Each loader worker's stream state in a saved `StatefulDataLoader` (its layout in torchdata 0.11).

    The one reading of torchdata's own layout: only its snapshot holds the state of a worker that has not
    handed out a batch since the run (re)started. A layout it no longer has is refused by name.
    """
    try:
        if "_snapshot" not in loader_state:  # no worker processes: the stream ran in the rank itself
            return [loader_state["dataset_state"]]
        workers = loader_state["_snapshot"]["_worker_snapshots"]
        return [workers[f"worker_{i}"]["dataset_state"] for i in range(len(workers))]
    except (KeyError, TypeError) as err:
        raise ConfigError(
            f"the checkpoint's loader state is not in the layout this build reads (torchdata 0.11; missing "
            f"{err}); resume on the same number of ranks and data.num_workers, which needs no reading of it"
        ) from None


class EvenBatches:
    """One validation pass in which every rank yields the same number of micro-batches.

    Ranks read different shards, so their validation passes differ in length (a rank may have no shard at all
    when there are more ranks than validation shards). A forward under DDP (buffer broadcast) or FSDP
    (parameter all-gathers) is a collective, so a rank that stopped early would leave the others waiting
    forever. Here the ranks agree before each micro-batch whether any of them still has one; a rank that has
    run out contributes `placeholder()` (a batch without labels) until all have. One tiny all-reduce per
    validation micro-batch; a single process iterates the loader as is.

    Args:
        loader: the rank's validation loader.
        placeholder: makes a micro-batch in the loader's format that adds nothing to the loss.
    """

    def __init__(self, loader, placeholder):
        self.loader, self.placeholder = loader, placeholder

    def __iter__(self) -> Iterator[PackedBatch]:
        if not is_initialized() or dist.get_world_size() == 1:
            yield from self.loader
            return
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        iterator, exhausted = iter(self.loader), False
        while True:
            batch = None if exhausted else next(iterator, None)
            exhausted = batch is None
            more = torch.tensor([0 if exhausted else 1], device=device)
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if not int(more.item()):
                return
            yield self.placeholder() if exhausted else batch
