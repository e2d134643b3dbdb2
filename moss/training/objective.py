"""The training objective over micro-batches and ranks, and the metrics it logs.

Per-channel CE arrives as sums with label counts (`moss.model.loss`); these classes decide what they are
divided by. `StepLoss`: the valid-label counts of the whole optimiser step (every micro-batch, every rank),
so packing, accumulation and data parallelism give the same gradient (DESIGN invariant 3). `SetLoss`: the
counts of a whole validation set, so the reported loss does not depend on how it was batched or split.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moss.model.loss import weighted_loss

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sum over ranks (the strategy's all-reduce)


class StepLoss:
    """The loss of each micro-batch of an optimiser step, normalised by the step's label counts."""

    def __init__(self, weights: torch.Tensor):
        self.weights = weights
        self.counts: torch.Tensor | None = None
        self.sums: torch.Tensor | None = None
        self.ranks = 1

    def start(self, counts: torch.Tensor, reduce: Reduce, ranks: int = 1) -> None:
        """A new step: `counts` are this rank's label counts of all its micro-batches in the step."""
        self.counts, self.ranks = reduce(counts), ranks
        self.sums = torch.zeros(counts.shape, dtype=torch.float32, device=counts.device)

    def __call__(self, sums: torch.Tensor) -> torch.Tensor:
        """What this micro-batch backpropagates: its summed CE over the step's counts, times the ranks.

        The step loss is the *sum* of every rank's share; DDP and FSDP average gradients over ranks, so each
        rank's share is scaled by their number to make that average the sum.
        """
        self.sums += sums.detach()
        return weighted_loss(sums, self.counts, self.weights)[0] * self.ranks

    def result(self, reduce: Reduce) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(loss, per-channel losses) of the step so far over all ranks; None before the first micro-batch."""
        return None if self.sums is None else weighted_loss(reduce(self.sums), self.counts, self.weights)


class SetLoss:
    """Summed CE and label counts over a whole validation pass, divided once at the end."""

    def __init__(self, weights: torch.Tensor):
        self.weights = weights
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def add(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        self.sums = sums.detach() if self.sums is None else self.sums + sums.detach()
        self.counts = counts if self.counts is None else self.counts + counts

    def result(self, reduce: Reduce, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(loss, per-channel losses) over every rank, or None when no rank saw a label; starts the next pass.

        A rank without a validation batch joins the reductions with zeros, so none waits on it.
        """
        if self.sums is None:
            self.sums = torch.zeros(len(self.weights), device=device)
            self.counts = torch.zeros(len(self.weights), dtype=torch.long, device=device)
        sums, counts = reduce(self.sums), reduce(self.counts)
        self.sums = self.counts = None
        if int(counts.sum()) == 0:
            return None
        return weighted_loss(sums, counts, self.weights)


def host_metrics(stage: str, loss: torch.Tensor, channel_losses: torch.Tensor, **extra: torch.Tensor) -> dict:
    """`{stage}/loss`, `{stage}/loss_ch{c}` and `extra`, brought to the host in one device-to-host copy.

    Lightning reads every progress-bar value back on every batch; values logged from the host cost nothing
    there, so a step's metrics cross to the host once instead of once per metric and batch.
    """
    values = torch.cat([loss.reshape(1), channel_losses, *(v.reshape(1).float() for v in extra.values())])
    values = values.detach().cpu()
    metrics = {f"{stage}/loss": values[0]}
    metrics.update({f"{stage}/loss_ch{c}": values[1 + c] for c in range(len(channel_losses))})
    metrics.update({key: values[1 + len(channel_losses) + i] for i, key in enumerate(extra)})
    return metrics


def is_log_step(trainer) -> bool:
    """Whether this step's metrics are read back to the host: the first, the last, every `log_every_n_steps`."""
    step = trainer.global_step
    return step == 0 or (step + 1) % trainer.log_every_n_steps == 0 or step + 1 >= (trainer.max_steps or 0)
