"""The exact weighted mean reducer."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from . import tree
from ._reducer import (
    Denominator,
    Reducer,
    SumFold,
    check_denominator,
    divisor,
    scalar_zeros,
    typed_merge,
)
from ._tree import PyTree, accumulator_like
from ._validate import check_dtype, check_state

__all__ = ["MeanState", "MeanStats", "mean"]


class MeanState(NamedTuple):
    """State of :func:`mean`: sums only.

    Example:
        >>> import funcaccum as fa
        >>> reducer = fa.mean()
        >>> state = reducer.init({"w": torch.zeros(2)})
        >>> state = reducer.update(state, {"w": torch.tensor([1.0, 2.0])}, torch.tensor(4.0))
        >>> isinstance(state, fa.extend.MeanState), state.grad_sum["w"], state.weight_sum
        (True, tensor([4., 8.]), tensor(4.))
    """

    grad_sum: PyTree  # sum_i w_i g_i, in the accumulation dtype
    weight_sum: torch.Tensor  # sum_i w_i


class MeanStats(NamedTuple):
    """Statistics of :func:`mean`: none; the step reports the loss, weight and norm itself."""


def mean(
    *, denominator: Denominator | None = None, accum_dtype: torch.dtype | None = None
) -> Reducer:
    """The weighted mean of microbatch gradients: the full-batch gradient, exactly.

    Microbatch ``i`` with mean loss ``L_i`` over weight ``w_i`` (examples, or
    valid tokens) contributes ``w_i * grad L_i``; :attr:`Reducer.finalize`
    divides the sum once, by ``sum_i w_i``, so the result is the gradient of the
    full batch's weighted mean loss however the batch was split. This is the
    fix for dividing each microbatch loss by the number of microbatches, which
    is wrong as soon as microbatches differ in size or token count.

    Args:
        denominator: ``"weight"`` (the default) divides by the summed
            weight; a number > 0 divides by that fixed number instead (for a
            loss defined as a sum over a nominal batch size).
        accum_dtype: the dtype of the sums; default at least float32, so bf16
            and fp16 gradients are summed in float32.

    Returns:
        A :class:`~funcaccum.extend.Reducer` whose ``finalize`` gives ``(grads, MeanStats())``.

    Example:
        >>> reducer = mean()
        >>> params = {"w": torch.zeros(2)}
        >>> state = reducer.init(params)
        >>> state = reducer.update(state, {"w": torch.tensor([1.0, 0.0])}, torch.tensor(3.0))
        >>> state = reducer.update(state, {"w": torch.tensor([0.0, 1.0])}, torch.tensor(1.0))
        >>> reducer.finalize(state)[0]
        {'w': tensor([0.7500, 0.2500])}
    """
    check_denominator(denominator)
    override = check_dtype("accum_dtype", accum_dtype)

    def init(params: PyTree) -> MeanState:
        return MeanState(accumulator_like(params, override), *scalar_zeros(params, 1, override))

    def update(
        state: MeanState, grads: PyTree, weight: torch.Tensor, *, donate: bool = False
    ) -> MeanState:
        check_state(state, MeanState, owner="mean()", role="update")
        weight = weight.to(state.weight_sum.dtype)
        grad_sum = tree.add_weighted(state.grad_sum, grads, weight, donate=donate)
        return MeanState(grad_sum, state.weight_sum + weight.sum())

    def finalize(state: MeanState, *, donate: bool = False) -> tuple[PyTree, MeanStats]:
        check_state(state, MeanState, owner="mean()", role="finalize")
        scale = 1 / divisor(state.weight_sum, denominator)
        return tree.scale(state.grad_sum, scale, donate=donate), MeanStats()

    def update_by_sum(
        state: MeanState,
        grad_sum: PyTree,
        weight: torch.Tensor,
        count: int,
        squares: Any,
        *,
        donate: bool = False,
    ) -> MeanState:
        check_state(state, MeanState, owner="mean()", role="update")
        weight = weight.to(state.weight_sum.dtype)
        return MeanState(
            tree.add_weighted(state.grad_sum, grad_sum, weight, donate=donate),
            state.weight_sum + weight * count,
        )

    by_sum = SumFold(update_by_sum, override)
    merge = typed_merge(MeanState, "mean()")
    return Reducer(init, update, merge, finalize, by_sum=by_sum)
