"""A partial accumulation and every operation on it: init, add, add by norms, merge, finalize.

A :class:`FoldState` holds sums only, so partial states from chunks or
processes merge by addition, and a reducer's ``finalize`` divides once, at the
end. This module is the one owner of that state: strategies fold into it
through a :class:`~funcaccum.extend.Folder`, which calls :func:`add` and
:func:`add_by_norms` here, and :class:`~funcaccum.Accumulation` delegates its
``init``, ``merge`` and ``finalize`` here.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from ._errors import FuncaccumError
from ._microbatch import BatchDim
from ._reducer import Reducer, Stats, scalar_zeros
from ._tree import PyTree

__all__ = [
    "Accumulated",
    "FoldState",
    "Folded",
    "LossSpec",
    "MicrobatchOutput",
    "add",
    "add_by_norms",
    "add_sum",
    "finalize",
    "init",
    "merge",
]


class LossSpec(NamedTuple):
    """What a loss returns and where its batch holds its examples: what folding needs to know.

    Attributes:
        has_aux: the loss also returns auxiliary outputs.
        has_weight: the loss also returns its weight (valid tokens, say).
        has_state: the loss is ``loss_fn(params, model_state, batch) -> (out, new_state)``.
        batch_dim: where each batch leaf holds its examples (see
            :class:`~funcaccum.Accumulation`).
    """

    has_aux: bool = False
    has_weight: bool = False
    has_state: bool = False
    batch_dim: BatchDim = 0


class FoldState(NamedTuple):
    """A partial accumulation: sums only, so two states merge by addition.

    Attributes:
        reducer: the reducer's state.
        loss_sum: ``sum_i w_i L_i``.
        weight_sum: ``sum_i w_i``.
        microbatches: how many microbatches were folded, in the weights' dtype
            (so it merges across processes in the same collective).
    """

    reducer: Any
    loss_sum: torch.Tensor
    weight_sum: torch.Tensor
    microbatches: torch.Tensor


class MicrobatchOutput(NamedTuple):
    """What the loss gave for one microbatch (or, stacked, for several), besides its gradient.

    Attributes:
        loss: the microbatch's mean loss, detached.
        weight: its weight: examples, or what a ``has_weight`` loss returned.
        aux: its auxiliary outputs; ``()`` without ``has_aux``.
        model_state: the model state it left; ``()`` without ``has_state``.
    """

    loss: torch.Tensor
    weight: torch.Tensor
    aux: PyTree = ()
    model_state: PyTree = ()


class Folded(NamedTuple):
    """Microbatches folded so far, with what the loss left besides its sums.

    What :meth:`TrainStep.fold <funcaccum.TrainStep.fold>` returns and
    :meth:`TrainStep.apply <funcaccum.TrainStep.apply>` takes.

    Attributes:
        state: the :class:`FoldState`, sums only.
        model_state: the model state the last microbatch left (``()`` without ``has_state``).
        aux: the loss's auxiliary outputs stacked along a leading microbatch
            axis, or None without ``has_aux``.
    """

    state: FoldState
    model_state: PyTree = ()
    aux: PyTree = None


class Accumulated(NamedTuple):
    """A finished accumulation: what :func:`~funcaccum.accumulate` returns.

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
    stats: Stats
    aux: PyTree = None


def init(reducer: Reducer, params: PyTree) -> FoldState:
    """An empty state for ``params``: where a fold starts; what a rank without data merges."""
    return FoldState(reducer.init(params), *scalar_zeros(params, 3))


def _checked_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with each negative entry made NaN: it would subtract its microbatch."""
    return torch.where(weight >= 0, weight, torch.nan)


def add(
    reducer: Reducer,
    state: FoldState,
    grads: PyTree,
    output: MicrobatchOutput,
    *,
    has_weight: bool = False,
    donate: bool = False,
) -> FoldState:
    """Fold one microbatch (0-d weight) or a stacked chunk (``(c,)`` weights) into ``state``.

    With ``has_weight``, a microbatch the loss gives zero weight (all padding)
    adds exactly nothing, even when its loss and gradient are 0/0 = NaN. A
    negative weight becomes NaN, as a NaN one is: the step's guard skips it
    and :meth:`~funcaccum.TrainStep.check_skips` names it (no read here). With
    ``donate`` the caller gives ``state`` up, and a reducer whose ``update``
    takes ``donate=`` sums into its tensors instead of new ones.
    """
    weight = _checked_weight(output.weight.to(state.weight_sum.dtype))
    present = weight != 0
    if has_weight:
        grads = optree.tree_map(
            lambda g: torch.where(
                present.reshape(present.shape + (1,) * (g.ndim - present.ndim)), g, 0
            ),
            grads,
        )
    weighted_loss = torch.where(present, weight * output.loss.to(weight.dtype), 0)
    return FoldState(
        _call(reducer.update, donate, state.reducer, grads, weight),
        state.loss_sum + weighted_loss.sum(),
        state.weight_sum + weight.sum(),
        state.microbatches + weight.numel(),
    )


def add_sum(
    reducer: Reducer,
    state: FoldState,
    grad_sum: PyTree,
    losses: torch.Tensor,
    weight: torch.Tensor,
    squares: torch.Tensor | None = None,
    *,
    donate: bool = False,
) -> FoldState:
    """Fold ``k`` microbatches of one ``weight`` by their gradients' sum (``reducer.by_sum``).

    Equal to :func:`add` on each microbatch, up to rounding. ``losses`` holds
    each microbatch's mean loss, ``(k,)``; ``squares`` each one's squared
    norm per param leaf, ``(k, leaves)``, for a reducer that reads them.
    """
    if reducer.by_sum is None:
        raise FuncaccumError("add_sum needs a reducer that folds by sums (Reducer.by_sum)")
    weight = weight.to(state.weight_sum.dtype)
    count = losses.numel()
    reducer_state = _call(
        reducer.by_sum.update, donate, state.reducer, grad_sum, weight, count, squares
    )
    return FoldState(
        reducer_state,
        state.loss_sum + weight * losses.to(weight.dtype).sum(),
        state.weight_sum + weight * count,
        state.microbatches + count,
    )


def add_by_norms(
    reducer: Reducer,
    state: FoldState,
    norms: torch.Tensor,
    weights: torch.Tensor,
    weighted_sum: Callable[[torch.Tensor], PyTree],
    loss_sum: torch.Tensor,
    *,
    donate: bool = False,
) -> FoldState:
    """Fold ``c`` microbatches known by their gradient norms (a strategy that forms no gradients).

    Args:
        reducer: a reducer with ``update_by_norms`` (:func:`~funcaccum.clipped_mean`).
        state: the state to fold into.
        norms: each microbatch's gradient norm, ``(c,)``.
        weights: each microbatch's weight, ``(c,)``.
        weighted_sum: ``weighted_sum(coefficients)`` gives ``sum_i coefficients_i g_i``.
        loss_sum: ``sum_i w_i L_i`` over the ``c`` microbatches.
        donate: the caller gives ``state`` up (see :func:`add`).
    """
    if reducer.update_by_norms is None:
        raise FuncaccumError(
            "this strategy folds gradient norms, which needs a reducer that clips by norm "
            "(one with update_by_norms, such as clipped_mean)"
        )
    weights = _checked_weight(weights.to(state.weight_sum.dtype))
    return FoldState(
        _call(reducer.update_by_norms, donate, state.reducer, norms, weights, weighted_sum),
        state.loss_sum + loss_sum.to(state.loss_sum.dtype),
        state.weight_sum + weights.sum(),
        state.microbatches + weights.numel(),
    )


_TAKES_DONATE: weakref.WeakKeyDictionary[Callable[..., Any], bool] = weakref.WeakKeyDictionary()


def takes_donate(fn: Callable[..., Any]) -> bool:
    """Whether a reducer's function accepts ``donate=`` (the built-in ones do); read once."""
    known = _TAKES_DONATE.get(fn)
    if known is None:
        try:
            known = "donate" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            known = False
        _TAKES_DONATE[fn] = known
    return known


def _call(fn: Callable[..., Any], donate: bool, *args: Any) -> Any:
    """``fn(*args)``, with ``donate=True`` where asked and ``fn`` takes it."""
    if donate and takes_donate(fn):
        return fn(*args, donate=True)
    return fn(*args)


def merge(reducer: Reducer, a: FoldState, b: FoldState) -> FoldState:
    """Two partial states of one accumulation (chunks, or processes) as one."""
    return FoldState(
        reducer.merge(a.reducer, b.reducer),
        a.loss_sum + b.loss_sum,
        a.weight_sum + b.weight_sum,
        a.microbatches + b.microbatches,
    )


def finalize(
    reducer: Reducer, state: FoldState, aux: PyTree = None, *, donate: bool = False
) -> Accumulated:
    """The reduced gradient, the exact mean loss and the reducer's stats of a folded ``state``.

    With ``donate`` the caller gives ``state`` up, and a reducer whose
    ``finalize`` takes ``donate=`` divides its sums in place.
    """
    grads, stats = _call(reducer.finalize, donate, state.reducer)
    return Accumulated(grads, state.loss_sum / state.weight_sum, state.weight_sum, stats, aux)
