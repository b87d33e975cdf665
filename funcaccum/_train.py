"""A whole training step as one pure function: microbatch gradients, reducer, update rule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import optree
import torch

from . import tree
from ._accumulate import Accumulation, LossFn
from ._errors import FuncaccumError
from ._fold import FoldState, compiled
from ._mean import mean
from ._microbatch import BatchDim
from ._reducer import Control, Reducer
from ._strategy import Strategy
from ._tree import PyTree, accum_dtype, tree_device
from ._validate import check_dtype
from .optim import GradientTransformation, apply_updates, get_hyperparams

__all__ = ["StepParts", "TrainState", "TrainStep", "train_step"]

Metrics = dict[str, Any]
ScheduleClock = Literal["step", "progress"]


class StepParts(NamedTuple):
    """A step's two halves as :meth:`TrainStep.parts` runs them, eagerly or compiled.

    Attributes:
        fold: ``fold(state, batch, folded=None) -> (folded, aux, model_state)``:
            the batch's microbatches folded into ``folded`` (a new accumulation
            if None); ``aux`` is the stacked auxiliary outputs, or None;
            ``model_state`` what the last microbatch left (``state.model_state``
            without ``has_state``).
        apply: ``apply(state, folded, model_state=None) -> (state, metrics)``:
            :meth:`TrainStep.apply`.
    """

    fold: Callable[..., tuple[FoldState, Any, PyTree]]
    apply: Callable[..., tuple[TrainState, Metrics]]


class TrainState(NamedTuple):
    """Everything a training run carries from one optimizer step to the next.

    Attributes:
        params: the parameter pytree (the master copy, under mixed precision).
        opt_state: the update rule's state.
        step: optimizer steps applied (skipped steps do not count), 0-d int64.
        skipped: steps skipped because the loss, gradient or update was not finite.
        consecutive_skips: skipped steps since the last applied one.
        reducer_carry: the reducer's cross-step statistics (``()`` if none).
        model_state: the model's own state, such as batch norm's running
            statistics, for a loss with ``has_state`` (``()`` if none).
    """

    params: PyTree
    opt_state: Any
    step: torch.Tensor
    skipped: torch.Tensor
    consecutive_skips: torch.Tensor
    reducer_carry: Any
    model_state: Any = ()


class TrainStep:
    """A training step built by :func:`train_step`.

    ``init(params)`` makes the :class:`TrainState`; :meth:`step` is the pure
    function ``(state, batch) -> (state, metrics)``; calling the object runs
    it (through its compiled pieces, if asked: :meth:`parts`) and then stops
    the run with :class:`FuncaccumError` after too many consecutive skipped steps.

    :meth:`step` is :meth:`fold` then :meth:`apply`, both pure. Use them
    apart to fold microbatches that arrive one by one, or to merge partial
    states from other processes before applying (:mod:`funcaccum.distributed`).
    """

    def __init__(
        self,
        loss_fn: LossFn,
        *,
        optimizer: GradientTransformation,
        accumulation: Accumulation,
        compute_dtype: torch.dtype | None,
        max_consecutive_skips: int | None,
        schedule_clock: ScheduleClock,
        compile: bool,
        compile_update: bool = False,
    ) -> None:
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.accumulation = accumulation
        self.reducer = accumulation.reducer
        self.has_state = accumulation.has_state
        self.has_aux = accumulation.has_aux
        self.compute_dtype = compute_dtype
        self.max_consecutive_skips = max_consecutive_skips
        self.schedule_clock = schedule_clock
        self.compile = compile
        self.compile_update = compile_update
        self._parts: dict[tuple[bool, bool], StepParts] = {}
        # Built now, not inside a caller's torch.compile of step(), which cannot create them.
        self.parts(False, False)

    def _loss(self, params: PyTree, *args: PyTree) -> Any:
        """The user's loss on params cast to the compute dtype (``args``: [model_state,] batch)."""
        return self.loss_fn(tree.cast(params, self.compute_dtype), *args)

    def init(self, params: PyTree, model_state: PyTree = ()) -> TrainState:
        """A fresh state: the params (detached, not copied), a new optimizer state, zero counts.

        ``model_state`` (the buffers of ``functional_model(module, has_state=True)``)
        is required by a step with ``has_state`` and refused by one without.
        """
        if bool(optree.tree_leaves(model_state)) != self.has_state:
            raise FuncaccumError(
                "a step with has_state=True needs init(params, model_state=...), and only such "
                "a step takes a model_state"
            )
        params = optree.tree_map(torch.Tensor.detach, params)
        model_state = optree.tree_map(torch.Tensor.detach, model_state)
        counts = [torch.zeros((), dtype=torch.int64, device=tree_device(params)) for _ in range(3)]
        carry = self.reducer.carry.init(params) if self.reducer.carry is not None else ()
        return TrainState(params, self.optimizer.init(params), *counts, carry, model_state)

    def parts(
        self, compile: bool | None = None, compile_update: bool | None = None
    ) -> StepParts:
        """The step's fold and apply halves, run as ``train_step(compile=...)`` runs them.

        The fold runs its microbatches in a Python loop. With ``compile=True``
        (default: the step's own settings) the loss is compiled, forward and
        backward, as ``torch.compile(model)`` compiles a hand-written loop's
        model (with ``"vmap"``/``"chunked"``, the vmapped chunk); with
        ``compile_update=True`` the fold into the accumulator and ``apply``
        are compiled too. Each compiled piece is one ``fullgraph`` graph.
        :mod:`funcaccum.distributed` and :class:`~funcaccum.AdaptiveBatching`
        drive a step through these.
        """
        key = (
            self.compile if compile is None else compile,
            self.compile_update if compile_update is None else compile_update,
        )
        if key not in self._parts:
            run = self.accumulation.folder(self._loss, compile=key[0], compile_update=key[1])

            def fold(
                state: TrainState, batch: PyTree, folded: FoldState | None = None
            ) -> tuple[FoldState, Any, PyTree]:
                return run.fold(state.params, batch, folded, state.model_state)

            self._parts[key] = StepParts(fold, compiled(self.apply, key[1]))
        return self._parts[key]

    def fold(self, state: TrainState, batch: PyTree, folded: FoldState | None = None) -> FoldState:
        """Fold ``batch``'s microbatches into ``folded`` (pure; auxiliary outputs are dropped)."""
        if self.has_state:
            raise FuncaccumError(
                "TrainStep.fold drops the model state a has_state step produces; use "
                "step.parts().fold, which returns it, and pass it to apply"
            )
        return self.parts(False, False).fold(state, batch, folded)[0]

    def step(self, state: TrainState, batch: PyTree) -> tuple[TrainState, Metrics]:
        """One optimizer step on ``batch``, as a pure function of the state.

        Eagerly this is what calling the step does with ``compile=False``. It
        can also be compiled whole, ``torch.compile(step.step, fullgraph=True)``:
        one graph with the microbatch loop as a ``scan`` (traced once whatever
        ``K``), slower to compile than ``compile=True``'s pieces and not cached
        across processes.
        """
        return self._step(self.parts(False, False), state, batch)

    def _step(
        self, parts: StepParts, state: TrainState, batch: PyTree
    ) -> tuple[TrainState, Metrics]:
        folded, aux, model_state = parts.fold(state, batch)
        state, metrics = parts.apply(state, folded, model_state if self.has_state else None)
        if self.has_aux:
            metrics["aux"] = aux
        return state, metrics

    def apply(
        self, state: TrainState, folded: FoldState, model_state: PyTree = None
    ) -> tuple[TrainState, Metrics]:
        """Finish the accumulation in ``folded`` and take one optimizer step (pure).

        ``model_state`` is the model state the fold left (None: unchanged); a
        skipped step keeps the old one, like the params.
        """
        new_model_state = state.model_state if model_state is None else model_state
        result = self.accumulation.finalize(folded)
        stats, carry, control = result.stats, state.reducer_carry, Control()
        if self.reducer.carry is not None:
            carry, stats, control = self.reducer.carry.update(carry, stats)
        # Each param's gradient in its accumulation dtype, whatever the reducer summed in.
        grads = optree.tree_map(lambda g, p: g.to(accum_dtype(p.dtype)), result.grads, state.params)
        grad_norm = tree.global_norm(grads)
        finite = torch.isfinite(result.loss) & torch.isfinite(grad_norm)

        clock = {}
        if self.schedule_clock == "progress":
            if control.progress is None:
                raise FuncaccumError(
                    "schedule_clock='progress' needs a reducer whose carry controls progress, "
                    "such as adaptive()"
                )
            clock["schedule_step"] = control.progress
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params, **clock)
        if control.step_scale is not None:  # a reducer that sets the step size scales the update
            updates = tree.scale(updates, control.step_scale)
        params = apply_updates(state.params, updates)
        # The guard covers the update too: a NaN learning rate, or an overflow in the update
        # rule, is skipped like a NaN gradient, so the params stay those of a finite step.
        finite = finite & torch.isfinite(tree.global_norm(updates))
        finite = finite & torch.isfinite(tree.global_norm(params))
        # A non-finite step changes nothing but the skip counts: bit-identical params and state.
        params, opt_state, carry, new_model_state = tree.select(
            finite,
            (params, opt_state, carry, new_model_state),
            (state.params, state.opt_state, state.reducer_carry, state.model_state),
        )
        new_state = TrainState(
            params,
            opt_state,
            state.step + finite,
            state.skipped + ~finite,
            torch.where(finite, 0, state.consecutive_skips + 1),
            carry,
            new_model_state,
        )
        metrics: Metrics = {
            "loss": result.loss,
            "grad_norm": grad_norm,
            "weight": result.weight,
            "skipped": ~finite,
            **stats,
        }
        if "learning_rate" in (rates := get_hyperparams(opt_state)):
            metrics["learning_rate"] = rates["learning_rate"]
        return new_state, metrics

    def check_skips(self, state: TrainState, metrics: Metrics) -> None:
        """Raise :class:`FuncaccumError` after ``max_consecutive_skips`` skipped steps in a row."""
        limit = self.max_consecutive_skips
        if limit is not None and int(state.consecutive_skips) >= limit:
            raise FuncaccumError(
                f"{int(state.consecutive_skips)} consecutive steps had a non-finite loss, "
                f"gradient or update (loss={float(metrics['loss'])}, "
                f"grad_norm={float(metrics['grad_norm'])}); "
                f"the params are those of step {int(state.step)}, the last finite one. Lower the "
                "learning rate, check the data for NaN or Inf, or raise max_consecutive_skips."
            )

    def __call__(self, state: TrainState, batch: PyTree) -> tuple[TrainState, Metrics]:
        """Run :meth:`step`; raise once ``max_consecutive_skips`` steps in a row were skipped."""
        # Checked eagerly, so a malformed batch gets its plain error even when compiled.
        self.accumulation.plan(batch)
        state, metrics = self._step(self.parts(), state, batch)
        self.check_skips(state, metrics)
        return state, metrics


def train_step(
    loss_fn: LossFn,
    *,
    optimizer: GradientTransformation,
    reducer: Reducer | None = None,
    strategy: Strategy | str = "scan",
    num_microbatches: int | None = None,
    microbatch_size: int | None = None,
    has_aux: bool = False,
    has_weight: bool = False,
    has_state: bool = False,
    batch_dim: BatchDim = 0,
    compute_dtype: torch.dtype | None = None,
    max_consecutive_skips: int | None = 10,
    schedule_clock: ScheduleClock = "step",
    compile: bool = False,
    compile_update: bool = False,
) -> TrainStep:
    """Compose a training step: microbatch gradients, a reducer, an update rule.

    The step splits each batch into microbatches, reduces their gradients
    (:func:`~funcaccum.accumulate`), applies the update rule once, and
    advances the step count once, so schedules move per optimizer step,
    never per microbatch. Metrics report the whole batch:

    - ``loss``: the exact weighted mean loss over every microbatch (not the last one's);
    - ``grad_norm``: the global norm of the reduced gradient;
    - ``weight``: examples (or valid tokens) in the step;
    - ``learning_rate``: the rate the update rule used;
    - ``skipped``: whether the step was rejected as non-finite;
    - the reducer's stats, and ``aux`` with ``has_aux``.

    A step whose loss, reduced gradient, update or new params hold a NaN or
    an Inf (a NaN learning rate, say) leaves the params,
    the optimizer state and the reducer's carry bit-identical and counts a
    skip; after ``max_consecutive_skips`` skips in a row, calling the step
    raises :class:`FuncaccumError` (None: never, and no host sync per step).

    Args:
        loss_fn: ``loss_fn(params, batch)``, as for :func:`~funcaccum.accumulate`.
        optimizer: the update rule, e.g. :func:`funcaccum.optim.adamw`.
        reducer: as for :class:`~funcaccum.Accumulation`.
        strategy: as for :class:`~funcaccum.Accumulation`.
        num_microbatches: as for :class:`~funcaccum.Accumulation`.
        microbatch_size: as for :class:`~funcaccum.Accumulation`.
        has_aux: ``loss_fn`` also returns auxiliary outputs, given as ``metrics["aux"]``.
        has_weight: ``loss_fn`` also returns its weight.
        has_state: the loss is ``loss_fn(params, model_state, batch) -> (out,
            new_model_state)``, where ``out`` is what a loss without state
            returns: for batch norm in training mode, with
            ``functional_model(module, has_state=True)``. Each microbatch sees
            the state the one before it left, in order, as a hand-written loop
            does; the state lives in :attr:`TrainState.model_state`
            (``step.init(params, model_state=buffers)``). Needs :func:`~funcaccum.scan`.
        batch_dim: as for :class:`~funcaccum.Accumulation`.
        compute_dtype: run ``loss_fn`` on params cast to this dtype (bf16,
            fp16) while the state keeps the params in their own dtype (float32
            master weights). Gradients are accumulated in float32 regardless.
        max_consecutive_skips: stop after this many non-finite steps in a row.
        schedule_clock: what learning-rate schedules read: ``"step"``, the
            optimizer-step count, or ``"progress"``, the adaptive reducer's
            scale-invariant ``tau`` (:attr:`~funcaccum.Control.progress`, passed to
            the update rule as ``schedule_step``).
        compile: compile the loss, forward and backward, with
            ``torch.compile(fullgraph=True)``, as ``torch.compile(model)``
            compiles a hand-written loop's model (for ``"vmap"`` and
            ``"chunked"``: the vmapped chunk); the microbatch loop runs in
            Python around it, and the fold and update run as ``foreach``
            kernels, as ``torch.optim``'s default update does. One graph
            whatever ``K`` (two shapes where the last microbatch is partial),
            cached across processes by torch's compile caches.
        compile_update: also compile the fold into the accumulator and the
            update (finalize, norm, update rule, guard), each one graph: fused
            kernels for a faster step, at the price of a longer first step
            (on a 2-core CPU it doubled it; see docs/benchmarks.md).

    Returns:
        A :class:`TrainStep`.

    Example:
        >>> from funcaccum import optim
        >>> def loss_fn(params, batch):
        ...     x, y = batch                            # x: (m, 3), y: (m,)
        ...     return torch.mean((x @ params["w"] - y) ** 2)
        >>> step = train_step(loss_fn, optimizer=optim.sgd(0.1), num_microbatches=4)
        >>> state = step.init({"w": torch.zeros(3)})
        >>> x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0))
        >>> for _ in range(50):
        ...     state, metrics = step(state, (x, x @ torch.tensor([1.0, -2.0, 0.5])))
        >>> metrics["loss"].item() < 1e-4, state.step.item()
        (True, 50)
    """
    accumulation = Accumulation(
        reducer=mean() if reducer is None else reducer, strategy=strategy,
        num_microbatches=num_microbatches, microbatch_size=microbatch_size, has_aux=has_aux,
        has_weight=has_weight, has_state=has_state, batch_dim=batch_dim,
    )  # fmt: skip
    check_dtype("compute_dtype", compute_dtype)
    if not isinstance(optimizer, GradientTransformation):
        raise FuncaccumError(
            "optimizer must be a funcaccum.optim.GradientTransformation, "
            f"got {type(optimizer).__name__}"
        )
    if schedule_clock not in ("step", "progress"):
        raise FuncaccumError(f"schedule_clock must be 'step' or 'progress', got {schedule_clock!r}")
    if schedule_clock == "progress" and accumulation.reducer.carry is None:
        raise FuncaccumError(
            "schedule_clock='progress' needs a reducer whose carry controls progress, such as "
            "adaptive()"
        )
    if max_consecutive_skips is not None and max_consecutive_skips < 1:
        raise FuncaccumError(
            f"max_consecutive_skips must be >= 1 or None, got {max_consecutive_skips}"
        )
    return TrainStep(
        loss_fn,
        optimizer=optimizer,
        accumulation=accumulation,
        compute_dtype=compute_dtype,
        max_consecutive_skips=max_consecutive_skips,
        schedule_clock=schedule_clock,
        compile=compile,
        compile_update=compile_update,
    )
