"""Choosing each step's number of microbatches from the gradient noise."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import torch

from ._accumulate import _compiled
from ._errors import FuncaccumError
from ._train import Metrics, TrainState, TrainStep
from ._tree import PyTree

__all__ = ["AdaptiveBatching"]

Controller = Literal["predictive", "sequential"]


class AdaptiveBatching:
    """Run a training step whose number of microbatches K follows the gradient noise.

    Each call pulls microbatches from an iterator, folds them one at a time
    into the step's reducer state with :meth:`TrainStep.fold` (compiled once,
    for one microbatch shape, whatever K), then applies the update once with
    :meth:`TrainStep.apply`. The step's reducer must be
    :func:`~funcaccum.adaptive`. The controller runs here, in Python, outside
    the compiled functions:

    - ``"predictive"`` (default): K for this step is the previous step's
      ``suggested_k``, from the smoothed noise statistics. K is fixed before
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
    :class:`StopIteration`. Non-finite steps are skipped and counted as in
    :class:`TrainStep`, and the step's ``max_consecutive_skips`` stops the run.

    Args:
        step: a :class:`TrainStep` built with ``reducer=adaptive(...)``.
        controller: ``"predictive"`` or ``"sequential"``.
        k_min: the fewest microbatches per step, >= 2 (the statistics need two).
        k_max: the most.
        k_initial: K for the first step (predictive); default ``k_min``.
        compile: compile :meth:`TrainStep.fold` and :meth:`TrainStep.apply`.

    Example:
        >>> from funcaccum import adaptive, optim, train_step
        >>> def loss_fn(params, batch):
        ...     return 0.5 * torch.sum((params["w"] - batch) ** 2, dim=-1).mean()
        >>> step = train_step(loss_fn, optimizer=optim.sgd(0.1), reducer=adaptive())
        >>> runner = AdaptiveBatching(step, k_min=2, k_max=16)
        >>> state = step.init({"w": torch.zeros(3)})
        >>> microbatches = iter(torch.randn(400, 8, 3) + 1.0)       # (microbatches, m, d)
        >>> for _ in range(5):
        ...     state, metrics = runner(state, microbatches)
        >>> 2 <= metrics["k"] <= 16
        True
    """

    def __init__(
        self,
        step: TrainStep,
        *,
        controller: Controller = "predictive",
        k_min: int = 2,
        k_max: int = 64,
        k_initial: int | None = None,
        compile: bool = False,
    ) -> None:
        if step.reducer.track is None or controller not in ("predictive", "sequential"):
            raise FuncaccumError(
                "AdaptiveBatching needs a train_step with reducer=adaptive(...) and "
                f"controller 'predictive' or 'sequential', got controller={controller!r}"
            )
        if not 2 <= k_min <= k_max:
            raise FuncaccumError(f"need 2 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
        self.step, self.controller = step, controller
        self.k_min, self.k_max = k_min, k_max
        self.k = k_initial if k_initial is not None else k_min

        def ready(folded: Any) -> torch.Tensor:
            return step.reducer.finalize(folded.reducer)[1]["ready"]

        self._parts = step.parts(compile)
        self._ready = _compiled(ready, compile)  # the unused gradient is dead code once compiled

    def __call__(
        self, state: TrainState, microbatches: Iterator[PyTree]
    ) -> tuple[TrainState, Metrics]:
        """One optimizer step on the next microbatches; ``metrics["k"]`` says how many."""
        target = min(max(self.k, self.k_min), self.k_max)
        folded = self.step.init_fold(state)
        model_state, count = state.model_state, 0
        for microbatch in microbatches:
            # Each microbatch sees the model state the one before it left.
            seen = state._replace(model_state=model_state)
            folded, _, model_state = self._parts.fold(seen, microbatch, folded)
            count += 1
            if self.controller == "predictive":
                if count >= target:
                    break
            elif count >= self.k_max or (count >= self.k_min and bool(self._ready(folded))):
                break
        if count == 0:
            raise StopIteration
        new_model_state = model_state if self.step.has_state else None
        state, metrics = self._parts.apply(state, folded, new_model_state)
        self.step.check_skips(state, metrics)
        if self.controller == "predictive":
            self.k = int(metrics["suggested_k"])
        return state, {**metrics, "k": count}
