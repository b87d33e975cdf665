"""An accumulation: its options in one object, and the functions that run it."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import optree
import torch

from . import _fold
from ._compile import CompileMode, traced
from ._errors import FuncaccumError
from ._fold import Accumulated, Folded, FoldState, LossSpec, MicrobatchOutput
from ._folder import Folder, LossFn, Randomness, check_randomness
from ._mean import mean
from ._microbatch import BatchDim, MicrobatchGroup, as_batch, batch_size, plan_microbatches
from ._microbatch import split_microbatches as _split_microbatches
from ._reducer import Maximum, Reducer
from ._strategy import GroupRunner, Strategy, as_strategy, concat
from ._tree import PyTree, leaf_paths
from ._validate import check_bool, check_int, check_params, describe

__all__ = [
    "Accumulation",
    "MicrobatchGrads",
    "Runner",
    "accumulate",
    "microbatch_grads",
]


@dataclasses.dataclass(frozen=True)
class Accumulation:
    """How a batch becomes one gradient: every option of an accumulation, checked once.

    The same object carries its reducer from :meth:`init` through
    :meth:`fold` and :meth:`merge` to :meth:`finalize`, so a state is never
    finished by another reducer than the one that filled it.
    :func:`~funcaccum.train_step` takes one (``accumulation=``);
    :func:`accumulate` builds one from its keywords. Whether the strategy can
    run the loss (``vmap()`` with ``has_state``, ``ghost()`` with aux) is
    checked when the two meet: when a step is built, or at the first fold.

    Args:
        reducer: how microbatch gradients combine; default :func:`~funcaccum.mean`.
        strategy: how microbatch gradients are computed: :func:`~funcaccum.scan`
            (the default, one at a time), :func:`~funcaccum.vmap`,
            :func:`~funcaccum.chunked`, :func:`~funcaccum.ghost`, a
            :class:`~funcaccum.extend.Strategy` of your own, or the shorthand
            ``"scan"`` / ``"vmap"``.
        num_microbatches: split into ``K`` microbatches as evenly as possible.
        microbatch_size: split into microbatches of ``m``, the last one partial.
            With neither, the batch is one microbatch.
        has_aux: ``loss_fn`` also returns auxiliary outputs.
        has_weight: ``loss_fn`` also returns its weight (for example the
            number of valid tokens); default weight is the microbatch's number
            of examples.
        has_state: ``loss_fn(params, model_state, microbatch)`` returns
            ``(out, new_model_state)``: batch norm's running statistics, each
            microbatch seeing the state the one before it left (needs
            :func:`~funcaccum.scan`, or a ``model_state`` combine under vmap).
        batch_dim: where each batch leaf holds its examples: 0 (leading), an
            int for every leaf, or a pytree prefix of ints (``(1, 0)`` for a
            sequence-first ``(T, N)`` tensor next to an ``(N,)`` one). The
            loss sees each microbatch in the batch's own layout.

    Example:
        >>> import funcaccum as fa
        >>> def loss_fn(params, batch):
        ...     x, y = batch                            # x: (m, 3), y: (m,)
        ...     return torch.mean((x @ params["w"] - y) ** 2)
        >>> acc = fa.Accumulation(reducer=fa.clipped_mean(1.0), num_microbatches=2)
        >>> params = {"w": torch.zeros(3)}
        >>> state = acc.init(params)
        >>> for _ in range(4):                          # four loader batches, 8 examples each
        ...     x, y = torch.randn(8, 3), torch.randn(8)
        ...     state = acc.fold(loss_fn, params, (x, y), state)
        >>> result = acc.finalize(state)
        >>> result.weight.item(), result.grads["w"].shape
        (32.0, torch.Size([3]))
    """

    reducer: Reducer = dataclasses.field(default_factory=mean)
    strategy: Strategy | str = "scan"
    num_microbatches: int | None = None
    microbatch_size: int | None = None
    has_aux: bool = False
    has_weight: bool = False
    has_state: bool = False
    batch_dim: BatchDim = 0

    def __post_init__(self) -> None:
        if not isinstance(self.reducer, Reducer):
            raise FuncaccumError(
                f"reducer must be a funcaccum Reducer, got {type(self.reducer).__name__}"
            )
        object.__setattr__(self, "strategy", as_strategy(self.strategy))
        if self.num_microbatches is not None and self.microbatch_size is not None:
            raise FuncaccumError(
                "give at most one of num_microbatches and microbatch_size, got "
                f"num_microbatches={self.num_microbatches!r}, "
                f"microbatch_size={self.microbatch_size!r}"
            )
        if self.num_microbatches is not None:
            check_int("num_microbatches", self.num_microbatches, low=1)
        if self.microbatch_size is not None:
            check_int("microbatch_size", self.microbatch_size, low=1)
        for flag in ("has_aux", "has_weight", "has_state"):
            check_bool(flag, getattr(self, flag))
        for dim in optree.tree_leaves(self.batch_dim):
            check_int("batch_dim", dim)
        self._check_privacy_unit()

    def _check_privacy_unit(self) -> None:
        """A noised reducer's unit must be what a microbatch holds, or its noise is too small."""
        mechanism = self.reducer.privacy
        if mechanism is None:
            return
        if mechanism.unit == "example" and self.microbatch_size != 1:
            got = (
                f"num_microbatches={self.num_microbatches}"
                if self.num_microbatches is not None
                else f"microbatch_size={self.microbatch_size}"
                if self.microbatch_size is not None
                else "no split (the whole batch is one microbatch)"
            )
            raise FuncaccumError(
                "clipped_mean(noise_multiplier=...) protects one example, so each microbatch "
                f"must hold one: microbatch_size=1; got {got}. A microbatch of m examples is "
                "clipped as one, and since microbatches are cut by position, adding or removing "
                "one example regroups the rest: the noise would not cover it. For a fixed group "
                "of examples sampled together (one user's data) as the unit, pass "
                "clipped_mean(..., unit='microbatch') with microbatch_size=m."
            )
        if self.has_state:
            raise FuncaccumError(
                "clipped_mean(noise_multiplier=...) with has_state=True: a model state such as "
                "batch norm's running statistics is updated from the data without noise, so it "
                "would publish what the noise protects; use a normalisation without running "
                "statistics (GroupNorm, LayerNorm) for private training"
            )
        if mechanism.unit == "microbatch" and self.microbatch_size is None:
            raise FuncaccumError(
                "clipped_mean(unit='microbatch') protects fixed groups of examples: give "
                "microbatch_size=m, the group size (num_microbatches would cut groups by the "
                "batch's size)"
            )

    @property
    def spec(self) -> LossSpec:
        """What the loss returns and how its batch is laid out."""
        return LossSpec(self.has_aux, self.has_weight, self.has_state, self.batch_dim)

    def plan(self, batch: PyTree) -> tuple[tuple[int, int], ...]:
        """The ``(count, size)`` groups ``batch`` splits into, checked, without touching data.

        An empty batch is refused, except with a noised reducer, for which it
        is no group at all (a Poisson batch may be empty: the step is noise only).
        """
        size = batch_size(batch, self.batch_dim)
        mechanism = self.reducer.privacy
        if mechanism is not None:
            if size == 0:
                return ()
            if mechanism.unit == "microbatch" and size % (self.microbatch_size or 1):
                raise FuncaccumError(
                    f"clipped_mean(unit='microbatch') clips fixed groups of "
                    f"microbatch_size={self.microbatch_size} examples, but the batch holds "
                    f"{size}, not a multiple: a group was cut. Sample whole groups."
                )
        return plan_microbatches(size, **self._split())

    def split(self, batch: PyTree) -> list[MicrobatchGroup]:
        """``batch`` in groups of equal-size microbatches (no split given: one microbatch)."""
        if self.reducer.privacy is not None and not self.plan(batch):
            return []  # an empty batch, which only a noised reducer accepts
        return _split_microbatches(batch, **self._split(), batch_dim=self.batch_dim)

    def _split(self) -> dict[str, int | None]:
        if self.num_microbatches is None and self.microbatch_size is None:
            return {"num_microbatches": 1, "microbatch_size": None}
        return {"num_microbatches": self.num_microbatches, "microbatch_size": self.microbatch_size}

    def runner(self, loss_fn: LossFn, *, compile: CompileMode | None = None) -> Runner:
        """A :class:`~funcaccum.extend.Runner` that folds whole batches of ``loss_fn``.

        Its strategy is built now, so a strategy that cannot run this loss
        refuses here. ``compile`` says which pieces are compiled
        (:data:`~funcaccum.extend.CompileMode`; ``"step"`` compiles none, the
        caller traces the whole).
        """
        return Runner(loss_fn, self, compile=compile)

    def init(self, params: PyTree) -> FoldState:
        """An empty :class:`~funcaccum.extend.FoldState` for ``params``, for :meth:`fold`.

        A process with no examples in a step contributes this to the merge.
        """
        _check_params(params)
        return _fold.init(self.reducer, params)

    def fold(
        self, loss_fn: LossFn, params: PyTree, batch: PyTree, state: FoldState | None = None
    ) -> FoldState:
        """Fold ``batch``'s microbatches into ``state`` (None: a new one); pure, aux dropped.

        Use it when microbatches arrive one loader batch at a time; merge
        partial states (other chunks, other processes) with :meth:`merge` and
        finish with :meth:`finalize`. A loss with model state goes through
        :meth:`TrainStep.fold <funcaccum.TrainStep.fold>`, which returns it.
        """
        if self.has_state:
            raise FuncaccumError(
                "Accumulation.fold drops the model state a has_state loss leaves; fold with "
                "TrainStep.fold, which returns it, or with runner(loss_fn).fold"
            )
        if state is not None and not isinstance(state, FoldState):
            raise FuncaccumError(
                "Accumulation.fold(loss_fn, params, batch, state) continues a FoldState (what "
                f"init and fold return), or None to start one; got {describe(state)}"
            )
        _check_params(params)
        return (
            self.runner(loss_fn).fold(params, batch, None if state is None else Folded(state)).state
        )

    def merge(self, a: FoldState, b: FoldState) -> FoldState:
        """Merge two partial states of this accumulation (from chunks, or processes)."""
        return _fold.merge(self.reducer, a, b)

    def finalize(self, state: FoldState, aux: PyTree = None) -> Accumulated:
        """The reduced gradient, the exact mean loss and the stats of a folded ``state``."""
        return _fold.finalize(self.reducer, state, aux)


class Runner:
    """An :class:`~funcaccum.Accumulation` bound to a loss, its strategy built: folds whole batches.

    From :meth:`Accumulation.runner`. :meth:`fold` is pure; the drivers
    (:class:`~funcaccum.TrainStep`, :func:`accumulate`) call it every step.

    Attributes:
        accumulation: the options.
        folder: the :class:`~funcaccum.extend.Folder` the strategy was built with.
    """

    def __init__(
        self, loss_fn: LossFn, accumulation: Accumulation, *, compile: CompileMode | None = None
    ) -> None:
        self.accumulation = accumulation
        self.folder = Folder(loss_fn, accumulation.reducer, accumulation.spec, compile=compile)
        strategy = accumulation.strategy
        assert not isinstance(strategy, str)  # made a Strategy in Accumulation.__post_init__
        run = strategy.build(self.folder)
        if not callable(run):
            raise FuncaccumError(
                f"{type(strategy).__name__}.build(folder) must return run(params, state, group, "
                f"model_state), a function; it returned {type(run).__name__}"
            )
        self.run_group: GroupRunner = run

    def fold(
        self,
        params: PyTree,
        batch: PyTree,
        folded: Folded | None = None,
        *,
        model_state: PyTree = (),
    ) -> Folded:
        """Fold ``batch`` into ``folded`` (None: a new fold from ``model_state``).

        Returns the sums, the model state the last microbatch left, and the
        stacked aux (after ``folded``'s, with ``has_aux``).
        """
        accumulation = self.accumulation
        if folded is None:
            folded = Folded(_fold.init(accumulation.reducer, params), model_state)
            self.folder.own(folded.state)  # new here: the strategy may sum into it in place
        state, model_state = folded.state, folded.model_state
        outputs: list[PyTree] = [] if folded.aux is None else [folded.aux]
        start, planned = state.microbatches, 0
        try:
            for group in accumulation.split(batch):
                ran = self.run_group(params, state, group, model_state)
                state, out, model_state = self._checked(ran, state)
                planned += group.count
                outputs.append(out.aux)
        finally:
            self.folder.own(None)  # what is returned is the caller's
        # A strategy of one's own that folds part of its group (or a microbatch twice)
        # leaves another count: its weight sum becomes NaN, which the step's guard skips
        # and TrainStep.check_skips (or accumulate) names, with no read from the device.
        weight_sum = torch.where(state.microbatches == start + planned, state.weight_sum, torch.nan)
        state = FoldState(state.reducer, state.loss_sum, weight_sum, state.microbatches)
        return Folded(state, model_state, concat(outputs) if accumulation.has_aux else None)

    def _checked(
        self, ran: object, before: FoldState
    ) -> tuple[FoldState, MicrobatchOutput, PyTree]:
        """What a group runner returned, checked statically: its types, and the reducer
        state's tree, shapes and dtypes against ``before``."""
        name = type(self.accumulation.strategy).__name__
        if not (isinstance(ran, tuple) and len(ran) == 3):
            raise FuncaccumError(
                f"{name}'s run(params, state, group, model_state) must return (state, outputs, "
                f"model_state), got {describe(ran)}"
            )
        state, out, model_state = ran
        if not isinstance(state, FoldState):
            raise FuncaccumError(
                f"{name}'s run returned {describe(state)} as its state, where a FoldState "
                "belongs: fold each microbatch with folder.add, which returns it"
            )
        if not isinstance(out, MicrobatchOutput):
            raise FuncaccumError(
                f"{name}'s run returned {describe(out)} as its outputs, where the stacked "
                "MicrobatchOutput of the group belongs (folder.value_and_grad returns one per "
                "microbatch)"
            )
        _check_same_layout(before.reducer, state.reducer, name)
        return state, out, model_state


def _check_same_layout(before: PyTree, after: PyTree, strategy: str) -> None:
    """Refuse a reducer state whose tree, shapes or dtypes a fold changed (static: no read)."""
    old, old_def = optree.tree_flatten(before, is_leaf=_is_maximum)
    new, new_def = optree.tree_flatten(after, is_leaf=_is_maximum)
    same = old_def == new_def and all(
        _layout(a) == _layout(b) for a, b in zip(old, new, strict=True)
    )
    if same:
        return
    changed = [
        f"{path}: {_layout(a)} became {_layout(b)}"
        for (path, a), (_, b) in zip(
            leaf_paths(before, "state.reducer"), leaf_paths(after, "state.reducer"), strict=False
        )
        if _layout(a) != _layout(b)
    ] or [f"its tree changed from {old_def} to {new_def}"]
    raise FuncaccumError(
        f"{strategy}'s fold changed the reducer state ({changed[0]}): the gradients handed to "
        "folder.add must be shaped like the params (one microbatch with a 0-d weight), or "
        "stacked (c, *param.shape) with (c,) weights; a sum of another shape would broadcast "
        "into the params"
    )


def _is_maximum(x: object) -> bool:
    return isinstance(x, Maximum)


def _layout(leaf: object) -> object:
    if isinstance(leaf, Maximum):
        leaf = leaf.value
    if isinstance(leaf, torch.Tensor):
        return (tuple(leaf.shape), leaf.dtype)
    return type(leaf).__name__


def accumulate(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    reducer: Reducer | None = None,
    strategy: Strategy | str = "scan",
    num_microbatches: int | None = None,
    microbatch_size: int | None = None,
    has_aux: bool = False,
    has_weight: bool = False,
    batch_dim: BatchDim = 0,
) -> Accumulated:
    """The reduced gradient of ``loss_fn`` over ``batch``, microbatch by microbatch.

    With the default :func:`mean` reducer the result is the gradient of the
    whole batch's weighted mean loss, exactly (up to float rounding), for any
    split: uneven microbatches, a partial last one, or token-weighted losses
    whose microbatches hold different numbers of valid tokens. The keywords
    are :class:`Accumulation`'s fields, which this builds.

    Args:
        loss_fn: ``loss_fn(params, microbatch)``, pure, returning the mean loss
            over the microbatch as a 0-d tensor; with ``has_weight`` it returns
            ``(loss, weight)``, with ``has_aux`` ``(loss_or_pair, aux)``.
        params: the parameter pytree.
        batch: a pytree of tensors sharing the batch dimension ``N``.
        reducer: as for :class:`Accumulation`.
        strategy: as for :class:`Accumulation`.
        num_microbatches: as for :class:`Accumulation`.
        microbatch_size: as for :class:`Accumulation`.
        has_aux: as for :class:`Accumulation`.
        has_weight: as for :class:`Accumulation`.
        batch_dim: as for :class:`Accumulation`.

    Returns:
        :class:`~funcaccum.Accumulated` ``(grads, loss, weight, stats, aux)``.

    Raises:
        FuncaccumError: bad options, a malformed batch (see
            :func:`split_microbatches`), or a loss that does not return a 0-d
            tensor.

    Example:
        >>> def loss_fn(params, batch):
        ...     x, y = batch                            # x: (m, 3), y: (m,)
        ...     return torch.mean((x @ params["w"] - y) ** 2)
        >>> params = {"w": torch.zeros(3, dtype=torch.float64)}
        >>> x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
        >>> result = accumulate(loss_fn, params, (x, y), num_microbatches=3)  # sizes 4, 3, 3
        >>> full = torch.func.grad(loss_fn)(params, (x, y))
        >>> torch.allclose(result.grads["w"], full["w"], rtol=1e-12, atol=0)
        True
    """
    options = Accumulation(
        reducer=mean() if reducer is None else reducer, strategy=strategy,
        num_microbatches=num_microbatches, microbatch_size=microbatch_size, has_aux=has_aux,
        has_weight=has_weight, batch_dim=batch_dim,
    )  # fmt: skip
    _check_params(params)
    batch = as_batch(batch)
    planned = sum(count for count, _ in options.plan(batch))
    folded = options.runner(loss_fn).fold(params, batch)
    result = options.finalize(folded.state, folded.aux)
    if not traced():  # one read per call, to refuse a meaningless result
        _check_result(result.weight, folded.state.microbatches, planned)
    return result


def _check_params(params: PyTree) -> None:
    """Refuse params that cannot be differentiated, naming the leaf; or no params at all."""
    check_params(params)
    if not optree.tree_leaves(params):
        raise FuncaccumError(
            f"params has no tensor leaves ({describe(params)}): there is nothing to differentiate"
        )


def _check_result(weight: torch.Tensor, folded: torch.Tensor, planned: int) -> None:
    """Refuse a sum of weights that is not finite and > 0, or a fold of another count."""
    weight_value, folded_count = torch.stack([weight.double(), folded.double()]).tolist()
    if folded_count != planned:
        raise FuncaccumError(
            f"the strategy folded {folded_count:g} microbatches where the batch was planned into "
            f"{planned}: a strategy of one's own must fold each microbatch of every group "
            "exactly once (folder.add with its gradient)"
        )
    if not (math.isfinite(weight_value) and weight_value > 0):
        raise FuncaccumError(
            f"the summed weight is {weight_value:g}: a weight must be finite and >= 0, with a "
            "positive sum. A weight loss_fn returned (has_weight=True) was negative or NaN, or "
            "every weight was zero (no valid tokens in the batch?); the mean is undefined"
        )


class MicrobatchGrads(NamedTuple):
    """What :func:`microbatch_grads` returns; every leaf has a leading microbatch axis ``K``.

    Attributes:
        grads: the gradient of each microbatch's mean loss, ``(K, *param.shape)``.
        losses: each microbatch's mean loss, ``(K,)``.
        weights: each microbatch's weight, ``(K,)``.
        aux: the stacked auxiliary outputs, or None.
    """

    grads: PyTree
    losses: torch.Tensor
    weights: torch.Tensor
    aux: PyTree = None


def microbatch_grads(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    num_microbatches: int | None = None,
    microbatch_size: int | None = None,
    has_aux: bool = False,
    has_weight: bool = False,
    randomness: Randomness = "error",
    batch_dim: BatchDim = 0,
) -> MicrobatchGrads:
    """Every microbatch's gradient, stacked along a leading axis ``K``, computed with vmap.

    Per-example gradients are the case ``microbatch_size=1``. Memory grows
    with ``K``; to reduce them instead of keeping them, use :func:`accumulate`.
    ``randomness`` is as for :func:`~funcaccum.vmap`.

    Example:
        >>> def loss_fn(params, batch):
        ...     return torch.mean((batch @ params["w"]) ** 2)
        >>> params = {"w": torch.ones(3)}
        >>> out = microbatch_grads(loss_fn, params, torch.randn(5, 3), microbatch_size=1)
        >>> out.grads["w"].shape, out.losses.shape       # (examples, 3), (examples,)
        (torch.Size([5, 3]), torch.Size([5]))
    """
    options = Accumulation(
        num_microbatches=num_microbatches, microbatch_size=microbatch_size, has_aux=has_aux,
        has_weight=has_weight, batch_dim=batch_dim,
    )  # fmt: skip
    _check_params(params)
    folder = Folder(loss_fn, options.reducer, options.spec)
    batched = folder.vmap(
        folder.value_and_grad, (None, None, 0, None), check_randomness(randomness)
    )
    grads, out = concat(
        [batched(params, (), group.batch, group.size) for group in options.split(batch)]
    )
    return MicrobatchGrads(grads, out.loss, out.weight, out.aux if has_aux else None)
