"""Choosing each step's number of microbatches from the gradient noise."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal

from ._compile import compiled
from ._errors import FuncaccumError
from ._fold import Folded
from ._train import StepMetrics, TrainState, TrainStep
from ._tree import PyTree
from ._validate import check_int

__all__ = ["AdaptiveBatching"]

Controller = Literal["predictive", "sequential"]


class _ExhaustedError(FuncaccumError):
    """No microbatch was left for a step."""


class AdaptiveBatching:
    """Run a training step whose number of microbatches K follows the gradient noise.

    Each call pulls microbatches from an iterator, folds them one at a time
    into the step's reducer state with :meth:`TrainStep.fold` (compiled as
    the step says, once for one microbatch shape, whatever K), then applies
    the update once with :meth:`TrainStep.apply`. The step's reducer must be
    :func:`~funcaccum.adaptive`, which owns ``k_min`` and ``k_max`` and
    decides through its :class:`~funcaccum.BatchControl`. The controller runs
    here, in Python, outside the compiled functions:

    - ``"predictive"`` (default): K for this step is the one the reducer's
      carry suggested after the previous step, from the smoothed noise
      statistics (``k_min`` before the first). K is fixed before
      the step sees its data, so the gradient stays unbiased, and nothing is
      read back from the device between microbatches (one read per step).
    - ``"sequential"``: after each microbatch (from ``k_min`` on), run this
      step's norm test on what has been folded and stop once it passes, or at
      ``k_max``. This reads a flag from the device per microbatch, and it is
      optional stopping: the decision depends on the very gradients being
      averaged, which biases the mean (a batch that looks less noisy than it
      is stops early). Prefer ``"predictive"`` unless bias is acceptable.

    When the iterator runs out mid-step, the step is taken with the
    microbatches it has (weighted exactly); a call with none left raises
    :class:`~funcaccum.FuncaccumError`, and :meth:`steps` runs steps until
    the microbatches run out. Non-finite steps are skipped and
    counted as in :class:`TrainStep`, and the step's
    ``max_consecutive_skips`` stops the run. ``metrics.microbatches`` says
    how many microbatches a step took.

    Args:
        step: a :class:`TrainStep` built with an ``Accumulation(reducer=adaptive(...))``.
        controller: ``"predictive"`` or ``"sequential"``.
        k_initial: K for the first step (predictive); default the reducer's
            ``k_min``.

    Example:
        >>> import torch
        >>> import funcaccum as fa
        >>> def loss_fn(params, batch):
        ...     return 0.5 * torch.sum((params["w"] - batch) ** 2, dim=-1).mean()
        >>> reducer = fa.adaptive(k_min=2, k_max=16)
        >>> step = fa.train_step(loss_fn, optimizer=fa.optim.sgd(0.1),
        ...                      accumulation=fa.Accumulation(reducer=reducer))
        >>> runner = AdaptiveBatching(step)
        >>> state = step.init({"w": torch.zeros(3)})
        >>> microbatches = iter(torch.randn(400, 8, 3) + 1.0)       # (microbatches, m, d)
        >>> for _ in range(5):
        ...     state, metrics = runner(state, microbatches)
        >>> 2 <= metrics.microbatches.item() <= 16
        True
    """

    def __init__(
        self,
        step: TrainStep,
        *,
        controller: Controller = "predictive",
        k_initial: int | None = None,
    ) -> None:
        if not isinstance(step, TrainStep):
            raise FuncaccumError(f"step must be a TrainStep (from train_step), got {step!r}")
        control = step.accumulation.reducer.batch_control
        if control is None or controller not in ("predictive", "sequential"):
            raise FuncaccumError(
                "AdaptiveBatching needs a train_step with Accumulation(reducer=adaptive(...)) "
                f"and controller 'predictive' or 'sequential', got controller={controller!r}"
            )
        if k_initial is not None:
            check_int("k_initial", k_initial, low=control.k_min, high=control.k_max)
        self.step, self.controller, self.control = step, controller, control
        self.k_initial = k_initial
        # The unused gradient is dead code once compiled.
        self._ready = compiled(
            lambda folded: control.ready(folded.state.reducer), step.compile is not None
        )

    def __call__(
        self, state: TrainState, microbatches: Iterator[PyTree]
    ) -> tuple[TrainState, StepMetrics]:
        """One optimizer step on the next microbatches; ``metrics.microbatches`` says how many."""
        control = self.control
        if self.controller == "predictive":
            target = self.k_initial or int(control.suggested_k(state.reducer_carry))
            self.k_initial = None
        folded: Folded | None = None
        planned = 0  # what the folds should count, for check_skips
        for count, microbatch in enumerate(microbatches, start=1):
            # Each microbatch sees the model state the one before it left (folded carries it).
            folded = self.step.fold(state, microbatch, folded)
            planned += sum(groups for groups, _ in self.step.accumulation.plan(microbatch))
            if self.controller == "predictive":
                if count >= target:
                    break
            elif count >= control.k_max or (count >= control.k_min and bool(self._ready(folded))):
                break
        if folded is None:
            raise _ExhaustedError(
                "AdaptiveBatching: the microbatch iterator is exhausted; no step was taken (to "
                "run until it is, iterate over runner.steps(state, microbatches))"
            )
        state, metrics = self.step.apply(state, folded)
        self.step.check_skips(state, metrics, microbatches=planned)
        return state, metrics

    def steps(
        self, state: TrainState, microbatches: Iterable[PyTree]
    ) -> Iterator[tuple[TrainState, StepMetrics]]:
        """Every step the microbatches make, each ``(state, metrics)``, until they run out.

        The last step takes what is left, weighted exactly. Each step starts
        from the state the one before it yielded.

        Example:
            >>> import torch
            >>> import funcaccum as fa
            >>> step = fa.train_step(lambda p, b: ((b - p["w"]) ** 2).mean(),
            ...                      optimizer=fa.optim.sgd(0.1),
            ...                      accumulation=fa.Accumulation(reducer=fa.adaptive(k_max=4)))
            >>> runner = AdaptiveBatching(step, k_initial=3)
            >>> taken = [int(m.microbatches) for _, m in runner.steps(
            ...     step.init({"w": torch.zeros(2)}), torch.randn(7, 5, 2))]
            >>> taken[0], sum(taken)                    # 3 first, then what the noise says
            (3, 7)
        """
        iterator = iter(microbatches)
        while True:
            try:
                state, metrics = self(state, iterator)
            except _ExhaustedError:
                return
            yield state, metrics
