"""A whole training step as one pure function: microbatch gradients, reducer, update rule."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple

import optree
import torch

from . import _fold, tree
from ._accumulate import Accumulation, Runner
from ._compile import Compile, CompileMode, check_compile, compiled, traced
from ._errors import FuncaccumError
from ._fold import Folded
from ._folder import LossFn
from ._microbatch import as_batch
from ._reducer import Control, Stats
from ._tree import PyTree, accum_dtype, leaf_paths, tree_device
from ._validate import check_dtype, check_params, describe
from .optim import (
    GradientTransformation,
    apply_updates,
    get_hyperparams,
    with_extra_args_support,
)
from .optim._base import extras_taken

__all__ = ["ScheduleClock", "StepMetrics", "TrainState", "TrainStep", "train_step"]

ScheduleClock = Literal["step", "progress"]


class TrainState(NamedTuple):
    """Everything a training run carries from one optimizer step to the next.

    Attributes:
        params: the parameter pytree (the master copy, under mixed precision).
        opt_state: the update rule's state.
        step: optimizer steps applied (skipped steps do not count), 0-d int64.
        skipped: steps skipped because the loss, gradient or update was not finite.
        consecutive_skips: skipped steps since the last applied one.
        reducer_carry: the reducer's cross-step statistics (``()`` if none):
            a noised ``clipped_mean(accounting=...)``'s privacy ledger.
        model_state: the model's own state, such as batch norm's running
            statistics, for a loss with ``has_state`` (``()`` if none).
    """

    params: PyTree
    opt_state: Any
    step: torch.Tensor
    skipped: torch.Tensor
    consecutive_skips: torch.Tensor
    reducer_carry: Any
    model_state: PyTree = ()


class StepMetrics(NamedTuple):
    """What one optimizer step reports: the step's own figures, and the reducer's apart.

    Each figure covers the whole batch (every microbatch; under data
    parallelism, every rank), and no reducer statistic can stand in for one.

    Attributes:
        loss: the exact weighted mean loss over every microbatch (not the last one's).
        grad_norm: the global L2 norm of the reduced gradient.
        weight: the step's examples, or valid tokens for a weighted loss.
        skipped: whether the step was rejected as non-finite (0-d bool).
        learning_rate: the rate the update rule used, or None for a rule without one.
        microbatches: how many microbatches were folded.
        stats: the reducer's statistics (:class:`~funcaccum.extend.ClippedMeanStats`, ...).
        aux: the loss's auxiliary outputs stacked along a leading microbatch axis
            (``has_aux``), or None.
    """

    loss: torch.Tensor
    grad_norm: torch.Tensor
    weight: torch.Tensor
    skipped: torch.Tensor
    learning_rate: torch.Tensor | None
    microbatches: torch.Tensor
    stats: Stats
    aux: PyTree = None

    def to_dict(self) -> dict[str, torch.Tensor]:
        """The figures by name, for a log: the step's own, then the reducer's stats.

        A statistic named like one of the step's figures is logged as
        ``"stats.<name>"``, never in its place; a statistic that is itself a
        record (the privacy ledger) by dotted names (``"privacy.steps"``);
        ``aux``, a missing learning rate and None statistics are left out.

        Example:
            >>> import funcaccum as fa
            >>> step = fa.train_step(lambda p, b: (b @ p["w"]).mean(), optimizer=fa.optim.sgd(0.1),
            ...                      accumulation=fa.Accumulation(reducer=fa.clipped_mean(10.0)))
            >>> _, metrics = step(step.init({"w": torch.zeros(2)}), torch.ones(4, 2))
            >>> list(metrics.to_dict())[:3], metrics.to_dict()["clip_fraction"].item()
            (['loss', 'grad_norm', 'weight'], 0.0)
        """
        figures = {
            name: value
            for name, value in zip(self._fields, self, strict=True)
            if name not in ("stats", "aux") and value is not None
        }
        stats = self.stats._asdict() if hasattr(self.stats, "_asdict") else self.stats
        if isinstance(stats, dict):
            for name, value in stats.items():
                name = f"stats.{name}" if name in self._fields else name
                if hasattr(value, "_asdict"):  # a nested record (a privacy ledger): dotted names
                    figures.update({f"{name}.{k}": v for k, v in value._asdict().items()})
                elif value is not None:
                    figures[name] = value
        return figures


class TrainStep:
    """A training step: microbatch gradients, a reducer and an update rule; from :func:`train_step`.

    ``init(params)`` makes the :class:`TrainState`. There is one way to run
    each thing:

    - ``step(state, batch) -> (state, metrics)`` runs one optimizer step, its
      pieces compiled as ``compile`` says, and stops the run with
      :class:`~funcaccum.FuncaccumError` after ``max_consecutive_skips``
      skipped steps in a row;
    - :meth:`fold` and :meth:`apply` run its two halves by hand, for
      microbatches that arrive one by one or partial states merged across
      processes (the drivers in :mod:`funcaccum.distributed` and
      :class:`~funcaccum.AdaptiveBatching` use them);
    - :meth:`step` is the pure function ``(state, batch) -> (state,
      metrics)`` that calling the object runs, for tests and for a caller's
      own transforms (``torch.compile(step.step, fullgraph=True)`` compiles
      it whole, as ``compile="step"`` does).

    The arguments are those of :func:`train_step`, checked here.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        *,
        optimizer: GradientTransformation,
        accumulation: Accumulation | None = None,
        compute_dtype: torch.dtype | None = None,
        max_consecutive_skips: int | None = 10,
        schedule_clock: ScheduleClock = "step",
        compile: Compile = False,
    ) -> None:
        accumulation = Accumulation() if accumulation is None else accumulation
        if not isinstance(accumulation, Accumulation):
            raise FuncaccumError(
                "accumulation must be a funcaccum.Accumulation (Accumulation(reducer=..., "
                f"num_microbatches=...)), got {describe(accumulation)}"
            )
        if not callable(loss_fn):
            raise FuncaccumError(f"loss_fn must be a function, got {describe(loss_fn)}")
        if not isinstance(optimizer, GradientTransformation):
            raise FuncaccumError(
                "optimizer must be a funcaccum.optim.GradientTransformation, "
                f"got {describe(optimizer)}"
            )
        check_dtype("compute_dtype", compute_dtype)
        if compute_dtype == torch.float16:
            raise FuncaccumError(_FLOAT16.format(what="compute_dtype=torch.float16"))
        if schedule_clock not in ("step", "progress"):
            raise FuncaccumError(
                f"schedule_clock must be 'step' or 'progress', got {schedule_clock!r}"
            )
        if schedule_clock == "progress":
            if accumulation.reducer.carry is None:
                raise FuncaccumError(
                    "schedule_clock='progress' needs a reducer whose carry controls progress, "
                    "such as adaptive()"
                )
            if extras_taken(optimizer.update) == frozenset():
                raise FuncaccumError(
                    "schedule_clock='progress' passes schedule_step= to the update rule, which "
                    "takes no such keyword: its schedules would run on their own count"
                )
        if max_consecutive_skips is not None and (
            isinstance(max_consecutive_skips, bool)
            or not isinstance(max_consecutive_skips, int)
            or max_consecutive_skips < 1
        ):
            raise FuncaccumError(
                f"max_consecutive_skips must be an int >= 1 or None, got {max_consecutive_skips!r}"
            )
        mode = check_compile(compile)
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.accumulation = accumulation
        self.compute_dtype = compute_dtype
        self.max_consecutive_skips = max_consecutive_skips
        self.schedule_clock = schedule_clock
        self.compile: CompileMode | None = mode
        self._update = with_extra_args_support(optimizer).update
        # Built now (the strategy refuses a loss it cannot run here), and never inside a
        # caller's trace of step(), which could not create them.
        self._runner: Runner = accumulation.runner(
            self._loss, compile=None if mode == "step" else mode
        )
        whole = mode == "step"
        self._fold = compiled(self._fold_plain, whole)
        self._apply = compiled(self._apply_plain, whole or mode == "loss+update")
        self._step = compiled(self.step, whole)
        self._carry_type: type | None = None  # what the reducer's carry rule makes, once seen
        self._updates_checked = False
        self._variants: dict[int, TrainStep] = {}

    def _loss(self, params: PyTree, *args: PyTree) -> Any:
        """The user's loss on params cast to the compute dtype (``args``: [model_state,] batch).

        With ``has_state``, the model state's floating leaves are cast too (a
        batch norm's running statistics must match its input's dtype), and the
        new state comes back in the state's own dtypes.
        """
        params = tree.cast(params, self.compute_dtype)
        if self.compute_dtype is None or not self.accumulation.has_state:
            return self.loss_fn(params, *args)
        model_state, batch = args
        out = self.loss_fn(params, tree.cast(model_state, self.compute_dtype), batch)
        if not (isinstance(out, tuple) and len(out) == 2):
            return out  # the folder refuses it, naming has_state
        value, new_state = out
        if optree.tree_structure(new_state) != optree.tree_structure(model_state):
            return out  # apply names the buffers that differ
        return value, optree.tree_map(lambda new, old: new.to(old.dtype), new_state, model_state)

    def init(self, params: PyTree, model_state: PyTree = ()) -> TrainState:
        """A fresh state: the params (detached, not copied), a new optimizer state, zero counts.

        ``model_state`` (the buffers of ``functional_model(module, has_state=True)``)
        is required by a step with ``has_state`` and refused by one without;
        its floating-point leaves must be finite (a NaN running mean would
        normalise every later batch to NaN). Params must be floating tensors
        with storage, not float16 (see ``compute_dtype``).
        """
        check_params(params)
        if not optree.tree_leaves(params):
            raise FuncaccumError(
                f"params has no tensor leaves ({describe(params)}): there is nothing to train"
            )
        for path, leaf in leaf_paths(params, "params"):
            if leaf.dtype == torch.float16:
                raise FuncaccumError(_FLOAT16.format(what=f"{path} is float16, and training it"))
        if bool(optree.tree_leaves(model_state)) != self.accumulation.has_state:
            hint = ""
            if self.accumulation.has_state and isinstance(model_state, dict):
                hint = (
                    ". An empty model state is a module without buffers to update (a batch "
                    "norm with track_running_stats=False keeps none): make it with "
                    "functional_model(module) and a loss without has_state"
                )
            raise FuncaccumError(
                "a step with has_state=True needs init(params, model_state=...), and only such "
                f"a step takes a model_state; got model_state={describe(model_state)}{hint}"
            )
        _check_model_state(model_state)
        params = optree.tree_map(torch.Tensor.detach, params)
        model_state = optree.tree_map(torch.Tensor.detach, model_state)
        step, skipped, consecutive = (
            torch.zeros((), dtype=torch.int64, device=tree_device(params)) for _ in range(3)
        )
        carry_rule = self.accumulation.reducer.carry
        carry = carry_rule.init(params) if carry_rule is not None else ()
        opt_state = self.optimizer.init(params)
        return TrainState(params, opt_state, step, skipped, consecutive, carry, model_state)

    def fold(self, state: TrainState, batch: PyTree, folded: Folded | None = None) -> Folded:
        """Fold ``batch``'s microbatches into ``folded`` (None: a new fold), pure.

        The fold starts from ``state.model_state``, or continues from
        ``folded.model_state``; its result goes to :meth:`apply`, after a
        merge across processes if need be. Compiled as ``compile`` says.
        """
        self._check_state(state, "step.fold(state, batch)")
        if folded is not None:
            _check_folded(folded, "step.fold(state, batch, folded) continues")
        return self._fold(state, as_batch(batch), folded)

    def apply(self, state: TrainState, folded: Folded) -> tuple[TrainState, StepMetrics]:
        """Finish the accumulation in ``folded`` and take one optimizer step, pure.

        A non-finite step keeps the params, the optimizer state, the carry and
        the model state bit-identical and counts a skip (a carry rule with
        ``skip``, a privacy ledger, counts it too).
        """
        self._check_state(state, "step.apply(state, folded)")
        _check_folded(folded, "step.apply(state, folded) takes")
        return self._apply(state, folded)

    def step(self, state: TrainState, batch: PyTree) -> tuple[TrainState, StepMetrics]:
        """One optimizer step on ``batch``, pure: :meth:`apply` of :meth:`fold`."""
        # The fold is made here and seen by no one else: apply may divide it in place.
        return self._apply(state, self._fold(state, batch, None), True)

    def __call__(self, state: TrainState, batch: PyTree) -> tuple[TrainState, StepMetrics]:
        """Run :meth:`step`; raise once ``max_consecutive_skips`` steps in a row were skipped.

        Also raises at once, through :meth:`check_skips`, for a step whose
        figures show a bad input (a negative or NaN weight, a negative or
        non-finite learning rate, a strategy that folded another number of
        microbatches than planned); such a step was skipped.
        """
        self._check_state(state, "step(state, batch)")
        batch = as_batch(batch)
        # Planned eagerly (a malformed batch gets its plain error, not Dynamo's), and the
        # count of microbatches the fold must report.
        planned = sum(count for count, _ in self.accumulation.plan(batch))
        state, metrics = self._step(state, batch)
        self.check_skips(state, metrics, microbatches=planned)
        return state, metrics

    def check_skips(
        self, state: TrainState, metrics: StepMetrics, *, microbatches: int | None = None
    ) -> None:
        """Raise :class:`~funcaccum.FuncaccumError` after too many skipped steps in a row.

        In the same single read from the device (none with
        ``max_consecutive_skips=None``), raise at once where the step's
        figures show bad input, which the guard skipped: a summed weight that
        is negative or not finite (a weight the loss returned was negative or
        NaN), or zero in a skipped step (every weight zero: a noised reducer
        still steps on an empty batch, a mean cannot), a learning rate that is negative or not
        finite (a schedule that crosses zero), or, given ``microbatches`` (the
        number the batch was planned into), a strategy that folded another
        number.
        """
        limit = self.max_consecutive_skips
        if limit is None:
            return
        figures = [state.consecutive_skips, metrics.weight, metrics.microbatches, metrics.skipped]
        if metrics.learning_rate is not None:
            figures.append(metrics.learning_rate)
        read = torch.stack([torch.as_tensor(f).detach().to(torch.float64) for f in figures])
        consecutive, weight, folded, was_skipped, *rate = read.tolist()
        skipped = f" The step was skipped; the params are those of step {int(state.step)}."
        if microbatches is not None and folded != microbatches:
            raise FuncaccumError(
                f"the strategy folded {folded:g} microbatches where the batch was planned into "
                f"{microbatches}: a strategy of one's own must fold each microbatch of every "
                "group exactly once (folder.add with its gradient)." + skipped
            )
        # A zero sum is an empty batch: a noised reducer steps on its noise, a mean skips.
        if not (math.isfinite(weight) and (weight > 0 or (weight == 0 and not was_skipped))):
            raise FuncaccumError(
                f"the step's summed weight is {weight:g}: a weight must be finite and >= 0, "
                "with a positive sum. A weight the loss returned (has_weight=True) was negative "
                "or NaN, every weight was zero (a batch with no valid tokens?), or a strategy "
                "of one's own folded another number of microbatches than its groups hold." + skipped
            )
        if rate and not (math.isfinite(rate[0]) and rate[0] >= 0):
            raise FuncaccumError(
                f"the learning_rate at optimizer step {int(state.step)} is {rate[0]:g}: a "
                "learning rate must be finite and >= 0 (a schedule that crosses zero, or "
                "returns NaN?)." + skipped
            )
        if consecutive >= limit:
            raise FuncaccumError(
                f"{int(consecutive)} consecutive steps had a non-finite loss, gradient, update "
                f"or model state (loss={float(metrics.loss)}, "
                f"grad_norm={float(metrics.grad_norm)}); "
                f"the params are those of step {int(state.step)}, the last finite one. Lower the "
                "learning rate, check the data for NaN or Inf, or raise max_consecutive_skips."
            )

    def _with_microbatches(self, num_microbatches: int) -> TrainStep:
        """This step with ``num_microbatches`` in its accumulation, the rest the same; cached.

        :func:`~funcaccum.run_epoch` runs a batch with fewer examples than the
        step's ``num_microbatches`` (a loader's short last batch) with one
        microbatch per example through it. Its state is this step's state.
        """
        cache = self._variants
        if num_microbatches not in cache:
            cache[num_microbatches] = TrainStep(
                self.loss_fn,
                optimizer=self.optimizer,
                accumulation=dataclasses.replace(
                    self.accumulation, num_microbatches=num_microbatches, microbatch_size=None
                ),
                compute_dtype=self.compute_dtype,
                max_consecutive_skips=self.max_consecutive_skips,
                schedule_clock=self.schedule_clock,
                compile=self.compile or False,
            )
        return cache[num_microbatches]

    def _check_state(self, state: Any, where: str) -> None:
        """Refuse a state this step did not make: pure-Python tests, no device read."""
        if not isinstance(state, TrainState):
            raise FuncaccumError(
                f"{where} takes the TrainState that step.init(params) made, got {describe(state)}"
                + (" (the arguments are (state, batch))" if isinstance(state, dict) else "")
            )
        if self.accumulation.has_state and not optree.tree_leaves(state.model_state):
            raise FuncaccumError(
                f"{where}: this step has has_state=True, and state.model_state holds no tensors "
                f"({describe(state.model_state)}): the state was made by a step without "
                "has_state; make it with step.init(params, model_state=buffers)"
            )
        rule = self.accumulation.reducer.carry
        if rule is not None:
            if self._carry_type is None:
                self._carry_type = type(rule.init(state.params))
            if type(state.reducer_carry) is not self._carry_type:
                raise FuncaccumError(
                    f"{where}: state.reducer_carry is {describe(state.reducer_carry)} where this "
                    f"step's reducer carries a {self._carry_type.__name__}: the state was made "
                    "by a step with another reducer; make it with this step's init (or load a "
                    "checkpoint of this configuration)"
                )

    def _fold_plain(self, state: TrainState, batch: PyTree, folded: Folded | None) -> Folded:
        return self._runner.fold(state.params, batch, folded, model_state=state.model_state)

    def _apply_plain(
        self, state: TrainState, folded: Folded, owned: bool = False
    ) -> tuple[TrainState, StepMetrics]:
        # A fold this step made (eagerly, in step()) is its own: divided in place.
        donate = owned and not traced()
        result = _fold.finalize(self.accumulation.reducer, folded.state, donate=donate)
        stats, carry, control = result.stats, state.reducer_carry, Control()
        carry_rule = self.accumulation.reducer.carry
        if carry_rule is not None:
            carry, stats, control = carry_rule.update(carry, stats)
        # Each param's gradient in its accumulation dtype, whatever the reducer summed in.
        grads = optree.tree_map(lambda g, p: g.to(accum_dtype(p.dtype)), result.grads, state.params)
        grad_norm = tree.global_norm(grads)
        extra = {}
        if self.schedule_clock == "progress":
            extra["schedule_step"] = control.progress
        out = self._update(grads, state.opt_state, state.params, **extra)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise FuncaccumError(
                "the update rule's update(updates, state, params) must return the pair (updates, "
                f"new_state), got {describe(out)}"
            )
        updates, opt_state = out
        if traced():  # shapes are static: checked once when traced, once when eager
            _check_updates(updates, state.params)
        elif not self._updates_checked:
            _check_updates(updates, state.params)
            self._updates_checked = True
        if control.step_scale is not None:  # a reducer that sets the step size scales the update
            updates = tree.scale(updates, control.step_scale)
        params = apply_updates(state.params, updates)
        # The guard: a non-finite update (a NaN learning rate, an overflow in the rule) shows
        # in the new params, so the loss, the gradient's norm and the params' cover it. An
        # empty batch (weight 0) has no loss (0/0); its step stands or falls by its gradient:
        # a noised reducer's fixed denominator gives a noise-only step, a mean NaN (skipped).
        finite = (
            (torch.isfinite(result.loss) | (result.weight == 0))
            & torch.isfinite(grad_norm)
            & torch.isfinite(tree.global_norm(params))
        )
        # A learning rate must be >= 0 (a negative one ascends): the rate this update used.
        rate = get_hyperparams(opt_state).get("learning_rate")
        if rate is not None:
            finite = finite & torch.isfinite(rate) & (rate >= 0)
        model_state = folded.model_state if self.accumulation.has_state else state.model_state
        if self.accumulation.has_state:  # running statistics driven to Inf, or NaN
            finite = finite & _all_finite(model_state)
        kept_carry = state.reducer_carry
        if carry_rule is not None and carry_rule.skip is not None:
            kept_carry = carry_rule.skip(kept_carry)  # a privacy ledger counts a skipped step too
        # A non-finite step changes nothing but the skip counts: bit-identical params and state.
        if not traced() and self.max_consecutive_skips is not None:
            # Eagerly, with the one read per step the skip check makes anyway: keep the new
            # state or the old one whole, without a select pass over every tensor.
            if bool(finite):
                new_state = TrainState(
                    params,
                    opt_state,
                    state.step + 1,
                    state.skipped,
                    torch.zeros_like(state.consecutive_skips),
                    carry,
                    model_state,
                )
            else:
                new_state = state._replace(
                    skipped=state.skipped + 1,
                    consecutive_skips=state.consecutive_skips + 1,
                    reducer_carry=kept_carry,
                )
        else:
            params, opt_state, carry, model_state = tree.select(
                finite,
                (params, opt_state, carry, model_state),
                (state.params, state.opt_state, kept_carry, state.model_state),
            )
            new_state = TrainState(
                params,
                opt_state,
                state.step + finite,
                state.skipped + ~finite,
                torch.where(finite, 0, state.consecutive_skips + 1),
                carry,
                model_state,
            )
        opt_state = new_state.opt_state
        metrics = StepMetrics(
            loss=result.loss,
            grad_norm=grad_norm,
            weight=result.weight,
            skipped=~finite,
            learning_rate=rate,
            microbatches=folded.state.microbatches,
            stats=stats,
            aux=folded.aux,
        )
        return new_state, metrics


_FLOAT16 = (
    "{what} needs loss scaling, which funcaccum does not do: float16 flushes gradients below "
    "6e-8 to zero (and overflows above 65504), so steps would be applied with part of the "
    "gradient silently lost. Use torch.bfloat16 (float32's exponent range) as compute_dtype, "
    "keeping float32 params (master weights), or train in float32."
)


def _check_folded(folded: Any, where: str) -> None:
    if not isinstance(folded, Folded):
        hint = ": wrap a FoldState as fa.Folded(fold_state)" if isinstance(folded, tuple) else ""
        raise FuncaccumError(
            f"{where} the Folded that step.fold returns, got {describe(folded)}{hint}"
        )


def _all_finite(tree_: PyTree) -> torch.Tensor:
    """0-d bool: every floating leaf finite (``0 * x`` is NaN exactly where ``x`` is not)."""
    floating = [x for x in optree.tree_leaves(tree_) if x.is_floating_point()]
    if not floating:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(tree.global_norm(tree.scale(floating, 0.0)))


def _check_model_state(model_state: PyTree) -> None:
    """Refuse a model state with a leaf that is not a tensor, or a NaN or Inf (read once)."""
    for path, leaf in leaf_paths(model_state, "model_state"):
        if not isinstance(leaf, torch.Tensor):
            raise FuncaccumError(f"{path} must be a tensor, got {describe(leaf)}")
        if leaf.is_floating_point() and not bool(torch.isfinite(leaf).all()):
            raise FuncaccumError(
                f"{path} holds NaN or Inf: every batch normalised with it would be NaN too. "
                "Reset it (a fresh module's buffers), or load a checkpoint from before it broke"
            )


def _check_updates(updates: PyTree, params: PyTree) -> None:
    """Refuse updates that do not fit the params: added, they would broadcast or fail obscurely."""
    want = dict(leaf_paths(params, "params"))
    got = dict(leaf_paths(updates, "params"))
    if want.keys() != got.keys():
        missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        raise FuncaccumError(
            "the update rule returned updates that are not shaped like the params "
            f"(missing: {missing}, not in the params: {extra}); update(updates, state, params) "
            "returns (updates, state), the updates a tree like the params"
        )
    for path, param in want.items():
        update = got[path]
        if not isinstance(update, torch.Tensor) or update.shape != param.shape:
            shape = tuple(update.shape) if isinstance(update, torch.Tensor) else describe(update)
            raise FuncaccumError(
                f"the update rule returned {shape} for {path}, whose shape is "
                f"{tuple(param.shape)}: added to the param it would change its shape"
            )


def train_step(
    loss_fn: LossFn,
    *,
    optimizer: GradientTransformation,
    accumulation: Accumulation | None = None,
    compute_dtype: torch.dtype | None = None,
    max_consecutive_skips: int | None = 10,
    schedule_clock: ScheduleClock = "step",
    compile: Compile = False,
) -> TrainStep:
    """Compose a training step: microbatch gradients, a reducer, an update rule.

    The step splits each batch into microbatches, reduces their gradients as
    ``accumulation`` says, applies the update rule once, and advances the
    step count once, so schedules move per optimizer step, never per
    microbatch. Its :class:`StepMetrics` report the whole batch: the exact
    weighted mean loss over every microbatch (not the last one's), the norm
    of the reduced gradient, the examples (or tokens), the learning rate,
    whether the step was skipped, and apart from those the reducer's stats
    and the loss's aux.

    A step whose loss, reduced gradient, update or new params hold a NaN or
    an Inf (a NaN learning rate, say) leaves the params, the optimizer state,
    the reducer's carry (unless its rule counts skips: a privacy ledger) and
    the model state bit-identical and counts a skip; an empty batch (weight 0)
    is judged by its gradient alone (a noised reducer's step is noise only);
    after ``max_consecutive_skips`` skips in a row, calling the step raises
    :class:`~funcaccum.FuncaccumError` (None: never, and no host sync per step).

    Args:
        loss_fn: ``loss_fn(params, batch)``, as for :func:`~funcaccum.accumulate`;
            with ``has_state``, ``loss_fn(params, model_state, batch) -> (out,
            new_model_state)``, the state living in :attr:`TrainState.model_state`
            (``step.init(params, model_state=buffers)``).
        optimizer: the update rule, e.g. :func:`funcaccum.optim.adamw`.
        accumulation: how each batch becomes one gradient: the reducer, the
            strategy, the split and what the loss returns
            (:class:`~funcaccum.Accumulation`); default one microbatch, :func:`~funcaccum.mean`.
        compute_dtype: run ``loss_fn`` on params cast to this dtype
            (``torch.bfloat16``) while the state keeps the params in their own
            dtype (float32 master weights). Gradients are accumulated in float32
            regardless. ``torch.float16`` is refused: it needs loss scaling,
            which funcaccum does not do (docs/concepts.md, "Mixed precision").
        max_consecutive_skips: stop after this many non-finite steps in a row.
        schedule_clock: what learning-rate schedules read: ``"step"``, the
            optimizer-step count, or ``"progress"``, the adaptive reducer's
            scale-invariant ``tau`` (passed to the update rule as ``schedule_step=``).
        compile: what to compile (:data:`~funcaccum.extend.CompileMode`):
            ``False``, eager; ``True`` or ``"loss"``, each microbatch's
            forward and backward, as ``torch.compile(model)`` compiles a
            hand-written loop's model, quick to compile and cached across
            processes; ``"loss+update"``, also the fold into the accumulator
            and the update; ``"step"``, the whole step as one graph, the
            fastest step on small models and the slowest to compile.

    Returns:
        A :class:`TrainStep`.

    Example:
        >>> import funcaccum as fa
        >>> def loss_fn(params, batch):
        ...     x, y = batch                            # x: (m, 3), y: (m,)
        ...     return torch.mean((x @ params["w"] - y) ** 2)
        >>> step = train_step(loss_fn, optimizer=fa.optim.sgd(0.1),
        ...                   accumulation=fa.Accumulation(num_microbatches=4))
        >>> state = step.init({"w": torch.zeros(3)})
        >>> x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0))
        >>> for _ in range(50):
        ...     state, metrics = step(state, (x, x @ torch.tensor([1.0, -2.0, 0.5])))
        >>> metrics.loss.item() < 1e-4, state.step.item(), metrics.microbatches.item()
        (True, 50, 4.0)
    """
    return TrainStep(
        loss_fn,
        optimizer=optimizer,
        accumulation=accumulation,
        compute_dtype=compute_dtype,
        max_consecutive_skips=max_consecutive_skips,
        schedule_clock=schedule_clock,
        compile=compile,
    )
