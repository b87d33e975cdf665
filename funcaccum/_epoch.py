"""One pass over a loader with a training step: the epoch's loss weighted right, and progress."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sized
from typing import Any, NamedTuple

import torch

from ._privacy import PrivacyLedger
from ._train import StepMetrics, TrainState, TrainStep
from ._tree import PyTree
from .privacy import epsilon as _epsilon

__all__ = ["EpochSummary", "run_epoch"]


class EpochSummary(NamedTuple):
    """What :func:`run_epoch` reports for the whole pass (not its last step).

    Attributes:
        loss: ``sum_s w_s L_s / sum_s w_s`` over every applied step ``s``: the
            epoch's weighted mean loss, a partial last batch weighted by its size.
        weight: the examples (or tokens) of the applied steps.
        steps: optimizer steps applied.
        skipped: steps skipped as non-finite.
        last: the last step's metrics (None for an epoch without steps).
        epsilon: with a noised ``clipped_mean(accounting=...)``, the epsilon
            spent by the end of the epoch, the whole run so far, at the
            ledger's delta (computed once, at the end); else None.
    """

    loss: torch.Tensor
    weight: torch.Tensor
    steps: int
    skipped: int
    last: StepMetrics | None
    epsilon: float | None = None


def run_epoch(
    step: TrainStep,
    state: TrainState,
    batches: Iterable[PyTree],
    *,
    progress: bool = False,
    description: str = "epoch",
) -> tuple[TrainState, EpochSummary]:
    """Run ``step`` on every batch of ``batches`` and report the epoch as a whole.

    The epoch's loss is every applied step's loss weighted by its examples
    (or tokens), summed on the device and read once at the end: not the last
    batch's loss, and not a plain mean of per-step losses, which overweights
    a partial last batch. Skipped (non-finite) steps count apart. With
    ``progress=True`` a ``rich`` progress bar shows the running epoch loss,
    which reads it from the device once per step.

    Args:
        step: the :class:`~funcaccum.TrainStep` (called, so
            ``max_consecutive_skips`` stops the run).
        state: the state to start from.
        batches: any iterable of batches, such as a ``DataLoader``.
        progress: show a progress bar (with the loader's length when it has one).
        description: the progress bar's label.

    Returns:
        The new state and an :class:`EpochSummary`.

    Example:
        >>> import funcaccum as fa
        >>> def loss_fn(params, batch):
        ...     x, y = batch                            # x: (m, 3), y: (m,)
        ...     return torch.mean((x @ params["w"] - y) ** 2)
        >>> step = fa.train_step(loss_fn, optimizer=fa.optim.sgd(0.0),
        ...                      accumulation=fa.Accumulation(num_microbatches=2))
        >>> state = step.init({"w": torch.zeros(3)})
        >>> x, y = torch.ones(10, 3), torch.arange(10.0)
        >>> loader = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]  # 4, 4 and 2 examples
        >>> state, epoch = fa.run_epoch(step, state, loader)
        >>> epoch.loss.item(), epoch.steps              # mean of y**2 over all 10 examples
        (28.5, 3)
    """
    # Sums stay on the device (float64): no read per step unless the bar shows the loss.
    totals = torch.zeros(3, dtype=torch.float64)  # loss * weight, weight, skipped
    steps, metrics = 0, None
    with _bar(progress, description, batches) as advance:
        for batch in batches:
            state, metrics = step(state, batch)
            skipped = metrics.skipped
            weight = torch.where(skipped, 0, metrics.weight.double())
            # An empty (noise-only) batch has weight 0 and no loss: it adds nothing.
            loss = torch.where(skipped | (weight == 0), 0, metrics.loss.double())
            totals = totals.to(weight.device) + torch.stack([loss * weight, weight, skipped])
            steps += 1
            if progress:
                advance(float(totals[0] / totals[1]))
    skipped_steps = int(totals[2])
    ledger = state.reducer_carry
    spent = _epsilon(ledger) if isinstance(ledger, PrivacyLedger) else None
    summary = EpochSummary(
        totals[0] / totals[1], totals[1], steps - skipped_steps, skipped_steps, metrics, spent
    )
    return state, summary


@contextlib.contextmanager
def _bar(show: bool, description: str, batches: Iterable[Any]) -> Iterator[Any]:
    """A ``rich`` progress bar with the running loss, or nothing; rich is imported only here."""
    if not show:
        yield lambda loss: None
        return
    from rich.progress import Progress, TextColumn

    total = len(batches) if isinstance(batches, Sized) else None
    # rich's own columns (description, bar, percentage, time left) and the running loss.
    columns = [*Progress.get_default_columns(), TextColumn("loss {task.fields[loss]}")]
    with Progress(*columns) as bar:
        task = bar.add_task(description, total=total, loss="-")
        yield lambda loss: bar.update(task, advance=1, loss=f"{loss:.4f}")
