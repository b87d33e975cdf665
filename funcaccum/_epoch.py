"""One pass over a loader with a training step: the epoch's loss weighted right, and a log."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch

from ._errors import FuncaccumError
from ._microbatch import as_batch, batch_size
from ._privacy import PrivacyLedger
from ._train import StepMetrics, TrainState, TrainStep
from ._tree import PyTree
from ._validate import check_bool, check_callable, check_int, describe
from .privacy import epsilon as _epsilon

__all__ = ["EpochSummary", "OnStep", "run_epoch"]

OnStep = Callable[[int, TrainState, StepMetrics], Any]
"""``on_step(index, state, metrics)``: called after every step of :func:`run_epoch`, ``index``
counting the epoch's steps from 0; for a logger of one's own (what it reads from the device,
it reads)."""


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
    log_every: int = 1,
    unit: str = "examples",
    on_step: OnStep | None = None,
) -> tuple[TrainState, EpochSummary]:
    """Run ``step`` on every batch of ``batches`` and report the epoch as a whole.

    The epoch's loss is every applied step's loss weighted by its examples
    (or tokens), summed on the device and read once at the end: not the last
    batch's loss, and not a plain mean of per-step losses, which overweights
    a partial last batch. Skipped (non-finite) steps count apart.

    ``batches`` may be any iterable: a list, a ``DataLoader`` (over an
    ``IterableDataset`` too, which has no length), a generator. A batch
    too small for the step's ``num_microbatches`` (a loader's short last
    batch) runs with fewer, weighted exactly as every batch is: with fewer
    examples than ``num_microbatches``, one microbatch per example; with
    ``has_state`` (batch norm, whose statistics need two examples), with
    fewer than two examples per microbatch, microbatches of two (or three).
    An epoch without a single batch (an empty loader, or a generator a
    previous epoch used up) is refused.

    With ``progress=True`` the epoch is shown as it runs: on a terminal a
    ``rich`` progress bar; otherwise (output redirected to a file, as on a
    cluster) one plain line every ``log_every`` steps and one at the end.
    Both show the step count, the step's and the running epoch loss, the
    learning rate and the throughput (``unit`` per second: the summed weight,
    examples or tokens), read from the device once per ``log_every`` steps.
    ``on_step(index, state, metrics)`` is called after every step, for a
    logger of one's own.

    Args:
        step: the :class:`~funcaccum.TrainStep` (called, so
            ``max_consecutive_skips`` stops the run).
        state: the state to start from.
        batches: any iterable of batches, such as a ``DataLoader``.
        progress: show the epoch's progress (a bar, or lines in a log file).
        description: the label of the bar and of each line.
        log_every: read and show the figures every this many steps.
        unit: what the weight counts, for the throughput (``"tokens"`` for a
            token-weighted loss).
        on_step: called after every step with ``(index, state, metrics)``.

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
        >>> x, y = torch.ones(9, 3), torch.arange(9.0)
        >>> loader = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]  # 4, 4 and 1 examples
        >>> seen = []
        >>> state, epoch = fa.run_epoch(step, state, loader,
        ...                             on_step=lambda i, s, m: seen.append(int(m.microbatches)))
        >>> epoch.loss.item(), epoch.steps, seen          # the last batch: one microbatch
        (22.666666666666668, 3, [2, 2, 1])
    """
    _check_arguments(step, state, batches, progress, description, log_every, unit, on_step)
    # Sums stay on the device (float64): no read per step unless the figures are shown.
    totals = torch.zeros(3, dtype=torch.float64)  # loss * weight, weight, skipped
    steps, metrics = 0, None
    with _display(progress, description, batches, log_every, unit) as show:
        for batch in batches:
            state, metrics = _short_batch_step(step, batch)(state, batch)
            skipped = metrics.skipped
            weight = torch.where(skipped, 0, metrics.weight.double())
            # An empty (noise-only) batch has weight 0 and no loss: it adds nothing.
            loss = torch.where(skipped | (weight == 0), 0, metrics.loss.double())
            totals = totals.to(weight.device) + torch.stack([loss * weight, weight, skipped])
            steps += 1
            if on_step is not None:
                on_step(steps - 1, state, metrics)
            show(steps, totals, metrics)
    if steps == 0:
        raise FuncaccumError(
            f"run_epoch got no batches: batches ({describe(batches)}) was empty, or an iterator "
            "that a previous epoch used up (a generator runs once: pass the DataLoader, or a "
            "list, which start again each epoch)"
        )
    skipped_steps = int(totals[2])
    ledger = state.reducer_carry
    spent = _epsilon(ledger) if isinstance(ledger, PrivacyLedger) else None
    summary = EpochSummary(
        totals[0] / totals[1], totals[1], steps - skipped_steps, skipped_steps, metrics, spent
    )
    return state, summary


def _check_arguments(
    step: Any,
    state: Any,
    batches: Any,
    progress: Any,
    description: Any,
    log_every: Any,
    unit: Any,
    on_step: Any,
) -> None:
    if not isinstance(step, TrainStep):
        raise FuncaccumError(
            f"step must be a TrainStep (from funcaccum.train_step), got {describe(step)}"
        )
    step._check_state(state, "run_epoch(step, state, batches)")
    if not isinstance(batches, Iterable):
        raise FuncaccumError(
            f"batches must be an iterable of batches (a DataLoader, a list), got "
            f"{describe(batches)}"
        )
    check_bool("progress", progress)
    check_int("log_every", log_every, low=1)
    for name, value in (("description", description), ("unit", unit)):
        if not isinstance(value, str):
            raise FuncaccumError(f"{name} must be a str, got {describe(value)}")
    if on_step is not None:
        check_callable("on_step", on_step, "on_step(index, state, metrics), or None")


def _short_batch_step(step: TrainStep, batch: PyTree) -> TrainStep:
    """``step``, or for a batch too small for its microbatches, one with fewer of them."""
    wanted = step.accumulation.num_microbatches
    if wanted is None or wanted == 1:
        return step
    examples = batch_size(as_batch(batch), step.accumulation.batch_dim)
    # Model state (batch norm's statistics) needs two examples a microbatch.
    least = 2 if step.accumulation.has_state else 1
    if examples >= least * wanted:
        return step
    return step._with_microbatches(max(1, examples // least))


def _length(batches: Iterable[Any]) -> int | None:
    """The number of batches, where it is known (a DataLoader over an IterableDataset has
    ``__len__`` and raises in it)."""
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def _figures(
    steps: int, totals: torch.Tensor, metrics: StepMetrics, started: float, unit: str
) -> dict[str, str]:
    """The figures of the epoch so far, read from the device in one transfer."""
    rate = metrics.learning_rate
    read = torch.stack([
        totals[0], totals[1], totals[2], metrics.loss.double(),
        (rate if rate is not None else metrics.loss).double(),
    ]).tolist()  # fmt: skip
    loss_sum, weight, skipped, loss, learning_rate = read
    elapsed = time.perf_counter() - started
    return {
        "loss": f"{loss:.4g}",
        "epoch loss": f"{loss_sum / weight:.4g}" if weight else "-",
        "lr": f"{learning_rate:.3g}" if rate is not None else "-",
        "speed": f"{weight / elapsed:.4g} {unit}/s" if elapsed > 0 else "-",
        "skipped": f"{int(skipped)}",
        "elapsed": f"{elapsed:.1f} s",
    }


@contextlib.contextmanager
def _display(
    show: bool, description: str, batches: Iterable[Any], every: int, unit: str
) -> Iterator[Callable[[int, torch.Tensor, StepMetrics], None]]:
    """A ``rich`` bar on a terminal, plain lines elsewhere, or nothing; rich is imported here."""
    if not show:
        yield lambda steps, totals, metrics: None
        return
    from rich.console import Console

    total, started = _length(batches), time.perf_counter()
    console = Console()
    if not (console.is_terminal or console.is_jupyter):
        yield from _lines(description, total, every, unit, started)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]} (epoch {task.fields[epoch]})"),
        TextColumn("lr {task.fields[lr]}"), TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(), TimeRemainingColumn(),
    ]  # fmt: skip
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(description, total=total, loss="-", epoch="-", lr="-", speed="-")

        def advance(steps: int, totals: torch.Tensor, metrics: StepMetrics) -> None:
            fields: dict[str, Any] = {}
            if steps % every == 0 or steps == total:
                figures = _figures(steps, totals, metrics, started, unit)
                fields = {"loss": figures["loss"], "epoch": figures["epoch loss"],
                          "lr": figures["lr"], "speed": figures["speed"]}  # fmt: skip
            bar.update(task, advance=1, **fields)

        yield advance


def _lines(
    description: str, total: int | None, every: int, unit: str, started: float
) -> Iterator[Callable[[int, torch.Tensor, StepMetrics], None]]:
    """One line every ``every`` steps and one at the end, flushed: for a log file."""
    last: list[Any] = [0, None, None]  # steps, totals, metrics of the latest step

    def line(steps: int, totals: torch.Tensor, metrics: StepMetrics) -> None:
        last[:] = [steps, totals, metrics]
        if steps % every == 0:
            figures = _figures(steps, totals, metrics, started, unit)
            of = f"/{total}" if total is not None else ""
            print(
                f"{description} step {steps}{of}: loss {figures['loss']} "
                f"(epoch {figures['epoch loss']}), lr {figures['lr']}, {figures['speed']}, "
                f"{figures['skipped']} skipped, {figures['elapsed']}",
                file=sys.stdout,
                flush=True,
            )

    yield line
    steps, totals, metrics = last
    if metrics is not None:
        figures = _figures(steps, totals, metrics, started, unit)
        weight = float(totals[1])
        print(
            f"{description} done: {steps} steps, loss {figures['epoch loss']} over "
            f"{weight:.10g} {unit}, {figures['skipped']} skipped, {figures['elapsed']} "
            f"({figures['speed']})",
            file=sys.stdout,
            flush=True,
        )
