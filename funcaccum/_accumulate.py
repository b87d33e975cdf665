"""An accumulation: its options in one object, and the functions that run it."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import optree
import torch
from torch.func import vmap as _vmap

from ._errors import FuncaccumError
from ._fold import Folder, FoldState, LossFn
from ._mean import mean
from ._microbatch import (
    BatchDim,
    MicrobatchGroup,
    batch_dims,
    batch_size,
    plan_microbatches,
    split_microbatches,
)
from ._reducer import Reducer, scalar_zeros
from ._strategy import Randomness, Strategy, as_strategy, check_randomness, concat, under_vmap
from ._tree import PyTree
from ._validate import check_bool, check_int

__all__ = [
    "Accumulated",
    "Accumulation",
    "MicrobatchGrads",
    "accumulate",
    "microbatch_grads",
]



class Accumulated(NamedTuple):
    """What :func:`accumulate` and :meth:`Accumulation.finalize` return.

    Attributes:
        grads: the reduced gradient, shaped like the params, in the
            accumulation dtype (at least float32).
        loss: the exact weighted mean loss of the whole batch,
            ``sum_i w_i L_i / sum_i w_i`` (not the last microbatch's).
        weight: ``sum_i w_i``: examples, or valid tokens for a weighted loss.
        stats: the reducer's statistics (clip fraction, norms, ...), reported only.
        aux: the loss's auxiliary outputs stacked along a leading microbatch
            axis, or None.
    """

    grads: PyTree
    loss: torch.Tensor
    weight: torch.Tensor
    stats: dict[str, torch.Tensor]
    aux: PyTree = None


def _no_loss(*args: Any) -> Any:  # pragma: no cover - never called: strategies build lazily
    raise AssertionError("a strategy called the loss while it was being built")


@dataclasses.dataclass(frozen=True)
class Accumulation:
    """How a batch becomes one gradient: every option of an accumulation, checked once.

    The same object carries its reducer from :meth:`init` through
    :meth:`fold` and :meth:`merge` to :meth:`finalize`, so a state is never
    finished by another reducer than the one that filled it.
    :func:`accumulate` and :func:`~funcaccum.train_step` take the same
    options as keywords and build one.

    Args:
        reducer: how microbatch gradients combine; default :func:`~funcaccum.mean`.
        strategy: how microbatch gradients are computed: :func:`~funcaccum.scan`
            (the default, one at a time), :func:`~funcaccum.vmap`,
            :func:`~funcaccum.chunked`, :func:`~funcaccum.ghost`, a
            :class:`~funcaccum.Strategy` of your own, or the shorthand
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
            :func:`~funcaccum.scan`).
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
        # The strategy checks what it cannot do (vmap with model state, ghost with aux) now.
        self.strategy.build(Folder(_no_loss, self))

    def _split(self) -> dict[str, int | None]:
        no_split = self.num_microbatches is None and self.microbatch_size is None
        return {
            "num_microbatches": 1 if no_split else self.num_microbatches,
            "microbatch_size": self.microbatch_size,
        }

    def plan(self, batch: PyTree) -> tuple[tuple[int, int], ...]:
        """The ``(count, size)`` groups ``batch`` splits into, checked, without touching data."""
        return plan_microbatches(batch_size(batch, self.batch_dim), **self._split())

    def split(self, batch: PyTree) -> list[MicrobatchGroup]:
        """``batch`` in groups of equal-size microbatches (no split given: one microbatch)."""
        return split_microbatches(batch, **self._split(), batch_dim=self.batch_dim)

    def to_layout(self, microbatch: PyTree) -> PyTree:
        """A microbatch (examples leading, as split) back in the batch's own layout."""
        if self.batch_dim == 0:
            return microbatch
        dims = batch_dims(microbatch, self.batch_dim)
        return optree.tree_map(lambda x, d: x.movedim(0, d), microbatch, dims)

    def folder(
        self, loss_fn: LossFn, *, compile: bool = False, compile_update: bool = False
    ) -> _Run:
        """The :class:`~funcaccum.Folder` for ``loss_fn``, with this strategy's runner built.

        With ``compile`` the pieces the strategy compiles (the loss, or the
        vmapped chunk) are compiled; with ``compile_update`` also the add into
        the state. Build it once and call its ``fold`` every step.
        """
        return _Run(loss_fn, self, compile=compile, compile_update=compile_update)

    def init(self, params: PyTree) -> FoldState:
        """An empty :class:`~funcaccum.FoldState` for ``params``: what :meth:`fold` starts from.

        A process with no examples in a step contributes this to the merge.
        """
        return FoldState(self.reducer.init(params), *scalar_zeros(params, 2))

    def fold(
        self, loss_fn: LossFn, params: PyTree, batch: PyTree, state: FoldState | None = None
    ) -> FoldState:
        """Fold ``batch``'s microbatches into ``state`` (None: a new one); pure, aux dropped.

        Use it when microbatches arrive one loader batch at a time; merge
        partial states (other chunks, other processes) with :meth:`merge` and
        finish with :meth:`finalize`.
        """
        return self.folder(loss_fn).fold(params, batch, state)[0]

    def merge(self, a: FoldState, b: FoldState) -> FoldState:
        """Merge two partial states of this accumulation (from chunks, or processes)."""
        return FoldState(
            self.reducer.merge(a.reducer, b.reducer),
            a.loss_sum + b.loss_sum,
            a.weight_sum + b.weight_sum,
        )

    def finalize(self, state: FoldState, aux: PyTree = None) -> Accumulated:
        """The reduced gradient, the exact mean loss and the stats of a folded ``state``."""
        grads, stats = self.reducer.finalize(state.reducer)
        return Accumulated(grads, state.loss_sum / state.weight_sum, state.weight_sum, stats, aux)


class _Run(Folder):
    """A :class:`Folder` with its strategy built: folds whole batches."""

    def __init__(self, loss_fn: LossFn, options: Accumulation, **compile: bool) -> None:
        super().__init__(loss_fn, options, **compile)
        self.run_group = options.strategy.build(self)

    def fold(
        self, params: PyTree, batch: PyTree, state: FoldState | None, model_state: PyTree = ()
    ) -> tuple[FoldState, Any, PyTree]:
        """Fold ``batch``: returns the state, the stacked aux (or None), the model state."""
        state = self.options.init(params) if state is None else state
        outputs = []
        for group in self.options.split(batch):
            state, out, model_state = self.run_group(params, state, group, model_state)
            outputs.append(out.aux)
        return state, concat(outputs) if self.options.has_aux else None, model_state


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
    whose microbatches hold different numbers of valid tokens.

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
        :class:`Accumulated` ``(grads, loss, weight, stats, aux)``.

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
    state, aux, _ = options.folder(loss_fn).fold(params, batch, None)
    return options.finalize(state, aux)


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
    batched = _vmap(
        Folder(loss_fn, options).grad,
        in_dims=(None, None, 0, None),
        randomness=check_randomness(randomness),
    )
    outputs = [
        under_vmap(batched, params, (), group.batch, group.size) for group in options.split(batch)
    ]
    grads, out = concat(outputs)
    return MicrobatchGrads(grads, out.loss, out.weight, out.aux if has_aux else None)

