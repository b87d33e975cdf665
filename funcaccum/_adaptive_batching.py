"""Choosing each step's number of microbatches from the gradient noise."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from ._errors import FuncaccumError
from ._fold import compiled
from ._train import Metrics, TrainState, TrainStep
from ._tree import PyTree
from ._validate import check_int

__all__ = ["AdaptiveBatching"]

Controller = Literal["predictive", "sequential"]


class AdaptiveBatching:
    """Run a training step whose number of microbatches K follows the gradient noise.

    Each call pulls microbatches from an iterator, folds them one at a time
    into the step's reducer state with :meth:`TrainStep.fold` (compiled once,
    for one microbatch shape, whatever K), then applies the update once with
    :meth:`TrainStep.apply`. The step's reducer must be
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
    :class:`StopIteration`. Non-finite steps are skipped and counted as in
    :class:`TrainStep`, and the step's ``max_consecutive_skips`` stops the run.

    Args:
        step: a :class:`TrainStep` built with ``reducer=adaptive(...)``.
        controller: ``"predictive"`` or ``"sequential"``.
        k_initial: K for the first step (predictive); default the reducer's
            ``k_min``.
        compile: compile :meth:`TrainStep.fold` and :meth:`TrainStep.apply`.

    Example:
        >>> import torch
        >>> from funcaccum import adaptive, optim, train_step
        >>> def loss_fn(params, batch):
        ...     return 0.5 * torch.sum((params["w"] - batch) ** 2, dim=-1).mean()
        >>> reducer = adaptive(k_min=2, k_max=16)
        >>> step = train_step(loss_fn, optimizer=optim.sgd(0.1), reducer=reducer)
        >>> runner = AdaptiveBatching(step)
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
        k_initial: int | None = None,
        compile: bool = False,
    ) -> None:
        control = step.reducer.batch_control
        if control is None or controller not in ("predictive", "sequential"):
            raise FuncaccumError(
                "AdaptiveBatching needs a train_step with reducer=adaptive(...) and "
                f"controller 'predictive' or 'sequential', got controller={controller!r}"
            )
        if k_initial is not None:
            check_int("k_initial", k_initial, low=control.k_min, high=control.k_max)
        self.step, self.controller, self.control = step, controller, control
        self.k_initial = k_initial
        self._parts = step.parts(compile)
        # The unused gradient is dead code once compiled.
        self._ready = compiled(lambda folded: control.ready(folded.reducer), compile)

    def __call__(
        self, state: TrainState, microbatches: Iterator[PyTree]
    ) -> tuple[TrainState, Metrics]:
        """One optimizer step on the next microbatches; ``metrics["k"]`` says how many."""
        control = self.control
        if self.controller == "predictive":
            target = self.k_initial or int(control.suggested_k(state.reducer_carry))
            self.k_initial = None
        folded = self.step.accumulation.init(state.params)
        model_state, count = state.model_state, 0
        for microbatch in microbatches:
            # Each microbatch sees the model state the one before it left.
            seen = state._replace(model_state=model_state)
            folded, _, model_state = self._parts.fold(seen, microbatch, folded)
            count += 1
            if self.controller == "predictive":
                if count >= target:
                    break
            elif count >= control.k_max or (count >= control.k_min and bool(self._ready(folded))):
                break
        if count == 0:
            raise StopIteration
        new_model_state = model_state if self.step.has_state else None
        state, metrics = self._parts.apply(state, folded, new_model_state)
        self.step.check_skips(state, metrics)
        return state, {**metrics, "k": count}
