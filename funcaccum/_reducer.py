"""The reducer protocol: streaming folds of per-microbatch gradients."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import optree
import torch

from ._errors import FuncaccumError
from ._privacy import GaussianMechanism
from ._tree import PyTree, accum_dtype, tree_device
from ._validate import check_state

__all__ = [
    "BatchControl",
    "SumFold",
    "CarryRule",
    "Control",
    "Denominator",
    "Maximum",
    "Reducer",
    "Stats",
    "as_units",
    "check_denominator",
    "divisor",
    "merge_states",
    "scalar_zeros",
    "typed_merge",
    "weight_dtype",
]

Stats = Any
"""A reducer's statistics, reported and never read by the step: a NamedTuple of 0-d tensors for
the built-in reducers (:class:`~funcaccum.extend.ClippedMeanStats`, ...), any pytree of tensors
for one's own."""
Denominator = float | Literal["weight"]
"""What a mean divides its sums by: ``"weight"`` (the summed weight) or a fixed number."""


class Control(NamedTuple):
    """What a reducer's carry decides for the training step: typed, never read from stats.

    A reducer's stats are only reported; a field here is the one way it
    changes the step. None leaves the step as it is.

    Attributes:
        step_scale: multiplies the update (the AdaScale gain), 0-d.
        progress: the clock schedules run on with ``schedule_clock="progress"``, 0-d.
    """

    step_scale: torch.Tensor | None = None
    progress: torch.Tensor | None = None


class CarryRule(NamedTuple):
    """How a reducer carries statistics from one optimizer step to the next: its carry.

    Attributes:
        init: ``init(params) -> carry``.
        update: ``update(carry, stats) -> (carry, stats, control)``, called
            once per optimizer step with the typed stats the reducer's
            ``finalize`` returned; returns the new carry, the stats to report
            and a :class:`Control`.
        skip: ``skip(carry) -> carry``: the carry after a skipped (non-finite)
            step; None keeps it as it was. A privacy ledger counts the step,
            whose noise was drawn on sampled data all the same.

    Example:
        A carry that counts optimizer steps and reports the count:

        >>> import funcaccum as fa
        >>> from funcaccum.extend import CarryRule, Control
        >>> def update(carry, stats):
        ...     return carry + 1, {"steps": carry + 1}, Control()
        >>> rule = CarryRule(init=lambda params: torch.tensor(0), update=update)
        >>> carry = rule.init({"w": torch.zeros(2)})
        >>> carry, stats, control = rule.update(carry, ())
        >>> carry, stats, control = rule.update(carry, ())
        >>> stats["steps"], control.step_scale        # reported; the step is unchanged
        (tensor(2), None)
    """

    init: Callable[[PyTree], Any]
    update: Callable[[Any, Stats], tuple[Any, Stats, Control]]
    skip: Callable[[Any], Any] | None = None


class BatchControl(NamedTuple):
    """How many microbatches a step should take: what :class:`~funcaccum.AdaptiveBatching` reads.

    Attributes:
        k_min: the fewest microbatches per step.
        k_max: the most.
        ready: ``ready(state) -> bool tensor``: whether what is folded so far
            (a reducer state) passes the reducer's test.
        suggested_k: ``suggested_k(carry) -> int tensor``: K for the next step.
    """

    k_min: int
    k_max: int
    ready: Callable[[Any], torch.Tensor]
    suggested_k: Callable[[Any], torch.Tensor]


class SumFold(NamedTuple):
    """How a reducer folds ``k`` microbatches of one weight from their gradients' sum.

    Attributes:
        update: ``update(state, grad_sum, weight, count, squares, *,
            donate=False) -> state``: ``grad_sum`` is ``sum_i g_i`` over
            ``count`` microbatches, each of weight ``weight`` (0-d), in each
            param's dtype; ``squares`` is ``(count, leaves)``, each
            microbatch's squared norm per param leaf, when ``wants_squares``,
            else None; ``donate`` as for ``update``.
        dtype: the dtype the reducer sums in (None: each param's
            accumulation dtype): the sum is taken by autograd only where this
            is the params' own dtype, so it loses nothing against ``update``.
        wants_squares: whether ``update`` reads each microbatch's squared norms.
    """

    update: Callable[..., Any]
    dtype: torch.dtype | None = None
    wants_squares: bool = False


class Reducer(NamedTuple):
    """How per-microbatch gradients fold into one gradient.

    A reducer is four pure functions over a state pytree of tensors::

        state = init(params)
        state = update(state, grads, weight) # once per microbatch, or per stacked chunk
        state = merge(state_a, state_b)      # partial states: chunks, processes
        grads, stats = finalize(state)       # divide once, at the end

    ``weight`` is 0-d for one microbatch, or shaped ``(c,)`` for a chunk whose
    gradient leaves are stacked ``(c, ...)``. Every state field is a sum (or a
    :class:`Maximum`), so ``merge`` is a tree add and partial states combine in
    any order, across chunks or across processes with one all-reduce.

    Attributes:
        init: ``init(params) -> state``.
        update: ``update(state, grads, weight) -> state``.
        merge: ``merge(a, b) -> state``.
        finalize: ``finalize(state) -> (grads, stats)``; the stats (:data:`Stats`)
            are reported, never read by the step.
        carry: statistics kept across optimizer steps (:class:`CarryRule`),
            the one way a reducer changes the step (:class:`Control`); or None.
        update_by_norms: for reducers that need only each unit's gradient
            norm and a weighted sum of the gradients, ``update_by_norms(state,
            norms, weights, weighted_sum) -> state`` where
            ``weighted_sum(c)`` returns ``sum_i c_i g_i``; strategies that
            never materialise per-unit gradients (:func:`funcaccum.ghost`) use
            it. None if unsupported.
        batch_control: what :class:`~funcaccum.AdaptiveBatching` reads to
            choose K (:class:`BatchControl`), or None.
        privacy: the Gaussian mechanism a noised reducer applies
            (:class:`~funcaccum.privacy.GaussianMechanism`: its unit,
            sensitivity and noise), which :class:`~funcaccum.Accumulation`
            and :class:`~funcaccum.distributed.DataParallel` check the
            configuration against; None for a reducer that adds no noise.
        by_sum: how to fold ``k`` microbatches of one weight from the sum of
            their gradients (:class:`SumFold`), which lets the sequential
            strategy sum them through autograd, as ``.grad`` sums them in a
            hand-written loop; or None (the reducer needs each gradient).

    ``update`` and ``finalize`` may also take ``donate=True``: the caller gives
    the state up, and its tensors may be overwritten (the fold does so with a
    state it made itself, eagerly); a reducer without the keyword is always
    called without it.

    Example:
        The weighted *sum* rather than the mean: :func:`~funcaccum.mean` with
        another ``finalize``:

        >>> import funcaccum as fa
        >>> mean = fa.mean()
        >>> total = mean._replace(finalize=lambda state: (state.grad_sum, ()))
        >>> def loss_fn(params, batch):                                  # batch: (m, 2)
        ...     return (batch @ params["w"]).mean()
        >>> params, batch = {"w": torch.zeros(2)}, torch.ones(6, 2)
        >>> fa.accumulate(loss_fn, params, batch, reducer=total, num_microbatches=3).grads["w"]
        tensor([6., 6.])
        >>> fa.extend.Reducer._fields
        ('init', 'update', 'merge', 'finalize', 'carry', 'update_by_norms', 'batch_control',
         'privacy', 'by_sum')
    """

    init: Callable[[PyTree], Any]
    update: Callable[[Any, PyTree, torch.Tensor], Any]
    merge: Callable[[Any, Any], Any]
    finalize: Callable[[Any], tuple[PyTree, Stats]]
    carry: CarryRule | None = None
    update_by_norms: Callable[..., Any] | None = None
    batch_control: BatchControl | None = None
    privacy: GaussianMechanism | None = None
    by_sum: SumFold | None = None


class Maximum(NamedTuple):
    """A state field that merges by maximum rather than by sum.

    Example:
        >>> import funcaccum as fa
        >>> reducer = fa.clipped_mean(max_norm=1.0)
        >>> empty = reducer.init({"w": torch.zeros(2)})
        >>> a = reducer.update(empty, {"w": torch.tensor([3.0, 4.0])}, torch.tensor(1.0))
        >>> b = reducer.update(empty, {"w": torch.tensor([0.3, 0.4])}, torch.tensor(1.0))
        >>> merged = reducer.merge(a, b)
        >>> merged.norm_max, merged.norm_sum          # the Maximum keeps the larger; sums add
        (Maximum(value=tensor(5.)), tensor(5.5000))
    """

    value: torch.Tensor


def merge_states(a: Any, b: Any) -> Any:
    """Merge two reducer states: leaves add, :class:`Maximum` fields take the larger."""

    def merge(x: Any, y: Any) -> Any:
        if isinstance(x, Maximum):
            return Maximum(torch.maximum(x.value, y.value))
        return x + y

    return optree.tree_map(merge, a, b, is_leaf=lambda x: isinstance(x, Maximum))


def typed_merge(state_type: type, owner: str) -> Callable[[Any, Any], Any]:
    """:func:`merge_states` for one reducer, refusing a state another reducer made."""

    def merge(a: Any, b: Any) -> Any:
        check_state(a, state_type, owner=owner, role="merge")
        check_state(b, state_type, owner=owner, role="merge")
        return merge_states(a, b)

    return merge


def weight_dtype(params: PyTree, override: torch.dtype | None = None) -> torch.dtype:
    """The dtype of summed weights and scalar statistics: the widest accumulation dtype."""
    dtype = accum_dtype(torch.float32, override)
    for leaf in optree.tree_leaves(params):
        dtype = torch.promote_types(dtype, accum_dtype(leaf.dtype, override))
    return dtype


def scalar_zeros(
    params: PyTree, count: int, override: torch.dtype | None = None
) -> list[torch.Tensor]:
    """``count`` distinct 0-d zeros on the params' device, in :func:`weight_dtype`.

    Distinct tensors, so no state field aliases another (``scan`` refuses aliased carries).
    """
    dtype, device = weight_dtype(params, override), tree_device(params)
    return [torch.zeros((), dtype=dtype, device=device) for _ in range(count)]


def as_units(grads: PyTree, weight: torch.Tensor) -> tuple[PyTree, torch.Tensor]:
    """One microbatch (0-d weight) as a chunk of one, so reducers have one code path."""
    if weight.ndim == 0:
        return optree.tree_map(lambda g: g.unsqueeze(0), grads), weight.unsqueeze(0)
    return grads, weight


def check_denominator(denominator: Denominator | None) -> None:
    """Raise unless ``denominator`` is None, ``"weight"`` or a finite number > 0.

    A zero, negative or non-finite divisor would scale every gradient wrongly
    (a negative one flips the step), so it is refused when the reducer is made.
    """
    if denominator is None or denominator == "weight":
        return
    if (
        isinstance(denominator, bool)
        or not isinstance(denominator, numbers.Real)
        or not (math.isfinite(denominator) and denominator > 0)
    ):
        raise FuncaccumError(
            f"denominator must be a number or 'weight' (a number finite and > 0), "
            f"got {denominator!r}"
        )


def divisor(weight_sum: torch.Tensor, denominator: Denominator | None) -> torch.Tensor | float:
    """The summed weight, or the declared fixed ``denominator``."""
    if denominator is None or denominator == "weight":
        return weight_sum
    return denominator
