"""The clipped mean reducer: clip each microbatch gradient, then average; optionally add noise."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import optree
import torch

from . import tree
from ._errors import FuncaccumError
from ._reducer import (
    Denominator,
    Maximum,
    Reducer,
    as_units,
    check_denominator,
    divisor,
    scalar_zeros,
    typed_merge,
)
from ._tree import PyTree, accumulator_like, foreach_map, unit_squared_norms
from ._validate import check_dtype, check_real, check_state

__all__ = ["ClippedMeanState", "ClippedMeanStats", "clipped_mean"]


class ClippedMeanState(NamedTuple):
    """State of :func:`clipped_mean`: sums, and one running maximum.

    Example:
        >>> import funcaccum as fa
        >>> reducer = fa.clipped_mean(max_norm=1.0)
        >>> state = reducer.init({"w": torch.zeros(2)})
        >>> state = reducer.update(state, {"w": torch.tensor([3.0, 4.0])}, torch.tensor(1.0))
        >>> isinstance(state, fa.extend.ClippedMeanState), state.clipped_sum["w"], state.norm_max
        (True, tensor([0.6000, 0.8000]), Maximum(value=tensor(5.)))
    """

    clipped_sum: PyTree  # sum_i w_i c_i g_i, c_i = min(1, max_norm / |g_i|)
    weight_sum: torch.Tensor  # sum_i w_i
    unit_count: torch.Tensor  # microbatches with w_i != 0
    clipped_count: torch.Tensor  # of those, how many had |g_i| > max_norm
    norm_sum: torch.Tensor  # sum of |g_i| before clipping
    clipped_norm_sum: torch.Tensor  # sum of |c_i g_i|
    norm_max: Maximum  # max of |g_i| before clipping


class ClippedMeanStats(NamedTuple):
    """Statistics of :func:`clipped_mean`, over the microbatches with nonzero weight.

    Attributes:
        clip_fraction: the share of microbatches whose gradient norm exceeded ``max_norm``.
        norm_mean: the mean gradient norm before clipping.
        norm_max: the largest gradient norm before clipping.
        clipped_norm_mean: the mean norm after clipping.

    Example:
        >>> import funcaccum as fa
        >>> reducer = fa.clipped_mean(max_norm=1.0)
        >>> state = reducer.init({"w": torch.zeros(2)})
        >>> state = reducer.update(state, {"w": torch.tensor([3.0, 4.0])}, torch.tensor(1.0))
        >>> _, stats = reducer.finalize(state)
        >>> isinstance(stats, fa.extend.ClippedMeanStats), stats.clip_fraction.item()
        (True, 1.0)
    """

    clip_fraction: torch.Tensor
    norm_mean: torch.Tensor
    norm_max: torch.Tensor
    clipped_norm_mean: torch.Tensor


def clipped_mean(
    max_norm: float,
    *,
    denominator: Denominator | None = None,
    noise_multiplier: float = 0.0,
    generator: torch.Generator | None = None,
    accum_dtype: torch.dtype | None = None,
) -> Reducer:
    """Clip each microbatch gradient to global L2 norm ``max_norm``, then take the weighted mean.

    Microbatch ``i`` contributes ``w_i * min(1, max_norm / |g_i|) * g_i``: the
    clip acts on each microbatch's own gradient, before accumulation, which is
    what per-example clipping and robust averaging need. At
    ``microbatch_size=1`` with ``noise_multiplier > 0`` this is the gradient
    mechanism of DP-SGD (Abadi et al. 2016, "Deep Learning with Differential
    Privacy"): Gaussian noise of standard deviation ``noise_multiplier *
    max_norm`` is added to the clipped sum once per optimizer step (in
    ``finalize``, never per microbatch), then the sum is divided by the
    denominator. Privacy accounting is not included: feed ``noise_multiplier``,
    the sampling rate and the step count to an accountant (Opacus has one).

    To clip the accumulated gradient instead, reduce with :func:`mean` and put
    :func:`funcaccum.optim.clip_by_global_norm` in the update rule. With a
    ``max_norm`` no gradient reaches and no noise, this equals :func:`mean`.
    A microbatch whose norm is Inf or NaN makes the result NaN (it is never
    silently clipped to zero), so a non-finite guard sees it.

    Args:
        max_norm: the clipping threshold, > 0.
        denominator: ``"weight"`` divides by the summed weight (the real
            example count); a number divides by that fixed number, as DP-SGD
            must (the expected batch size under Poisson sampling, since the
            real count is itself private). Default ``"weight"``; with noise,
            the choice must be made explicitly.
        noise_multiplier: the noise's standard deviation over ``max_norm``.
        generator: draws the noise; default the global generator (seed it
            with ``torch.manual_seed``; it is the one that compiles).
        accum_dtype: the dtype of the sums; default at least float32.

    Returns:
        A :class:`~funcaccum.extend.Reducer`; ``finalize`` gives ``(grads,
        stats)`` with :class:`~funcaccum.extend.ClippedMeanStats`:
        ``clip_fraction`` (of microbatches with nonzero weight), ``norm_mean``
        and ``norm_max`` (before clipping) and ``clipped_norm_mean`` (after).
        Its ``update_by_norms`` serves strategies that compute norms without
        materialising gradients (:func:`funcaccum.ghost`).

    Example:
        >>> reducer = clipped_mean(max_norm=1.0)
        >>> params = {"w": torch.zeros(2)}
        >>> grads = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}  # (units, d); norms 5 and 0.5
        >>> state = reducer.update(reducer.init(params), grads, torch.tensor([1.0, 1.0]))
        >>> clipped, stats = reducer.finalize(state)
        >>> clipped["w"]                                            # mean of [.6, .8] and [.3, .4]
        tensor([0.4500, 0.6000])
        >>> stats.clip_fraction.item(), stats.norm_max.item()
        (0.5, 5.0)

    References:
        Abadi et al., `Deep Learning with Differential Privacy
        <https://arxiv.org/abs/1607.00133>`_, 2016
    """
    check_real("max_norm", max_norm, low=0, low_inclusive=False)
    check_real("noise_multiplier", noise_multiplier, low=0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise FuncaccumError(f"generator must be a torch.Generator or None, got {generator!r}")
    if noise_multiplier > 0 and denominator is None:
        raise FuncaccumError(
            "with noise, choose the denominator explicitly: the expected batch size "
            "(denominator=B, as DP-SGD needs) or denominator='weight' (the real count, which "
            "is itself private under Poisson sampling)"
        )
    check_denominator(denominator)
    override = check_dtype("accum_dtype", accum_dtype)

    def init(params: PyTree) -> ClippedMeanState:
        weight, units, clipped, norms, clipped_norms, norm_max = scalar_zeros(params, 6, override)
        return ClippedMeanState(
            accumulator_like(params, override),
            weight,
            units,
            clipped,
            norms,
            clipped_norms,
            Maximum(norm_max),
        )

    def update_by_norms(
        state: ClippedMeanState,
        norms: torch.Tensor,
        weights: torch.Tensor,
        weighted_sum: Callable[[torch.Tensor], PyTree],
        *,
        donate: bool = False,
    ) -> ClippedMeanState:
        """Fold ``c`` units from their norms; ``weighted_sum(c)`` is ``sum_i c_i g_i``."""
        check_state(state, ClippedMeanState, owner="clipped_mean()", role="update")
        weights = weights.to(state.weight_sum.dtype)
        norms = norms.to(weights.dtype)
        # A non-finite norm gives a NaN factor, so it poisons the sum instead of vanishing.
        factor = torch.where(
            torch.isfinite(norms), torch.clamp(max_norm / norms, max=1.0), torch.nan
        )
        active = weights != 0
        zero = torch.zeros_like(norms)
        clipped = weighted_sum(torch.where(active, weights * factor, 0))
        return ClippedMeanState(
            clipped_sum=foreach_map(lambda a, c: a.add_(c), state.clipped_sum, clipped, donate=True)
            if donate
            else tree.add(state.clipped_sum, clipped),
            weight_sum=state.weight_sum + weights.sum(),
            unit_count=state.unit_count + active.sum(),
            clipped_count=state.clipped_count + (active & (norms > max_norm)).sum(),
            norm_sum=state.norm_sum + torch.where(active, norms, zero).sum(),
            clipped_norm_sum=state.clipped_norm_sum
            + torch.where(active, torch.clamp(norms, max=max_norm), zero).sum(),
            norm_max=Maximum(
                torch.maximum(state.norm_max.value, torch.where(active, norms, zero).max())
            ),
        )

    def update(
        state: ClippedMeanState, grads: PyTree, weight: torch.Tensor, *, donate: bool = False
    ) -> ClippedMeanState:
        units, weights = as_units(grads, weight)
        norms = torch.sqrt(unit_squared_norms(units, dtype=override))

        def weighted_sum(coefficients: torch.Tensor) -> PyTree:
            total = tree.weighted_sum(units, coefficients, dtype=override)
            return optree.tree_map(lambda t, a: t.to(a.dtype), total, state.clipped_sum)

        return update_by_norms(state, norms, weights, weighted_sum, donate=donate)

    def finalize(
        state: ClippedMeanState, *, donate: bool = False
    ) -> tuple[PyTree, ClippedMeanStats]:
        check_state(state, ClippedMeanState, owner="clipped_mean()", role="finalize")
        total = state.clipped_sum
        if noise_multiplier > 0:
            std = noise_multiplier * max_norm
            total = optree.tree_map(
                lambda s: (
                    s + std * torch.randn(s.shape, generator=generator, dtype=s.dtype).to(s.device)
                    if generator is not None
                    else s + std * torch.randn_like(s)
                ),
                total,
            )
        units = state.unit_count
        # Noise made new tensors, which are this call's own to scale.
        scale = 1 / divisor(state.weight_sum, denominator)
        scaled = tree.scale(total, scale, donate=donate or noise_multiplier > 0)
        return scaled, ClippedMeanStats(
            clip_fraction=state.clipped_count / units,
            norm_mean=state.norm_sum / units,
            norm_max=state.norm_max.value,
            clipped_norm_mean=state.clipped_norm_sum / units,
        )

    merge = typed_merge(ClippedMeanState, "clipped_mean()")
    return Reducer(init, update, merge, finalize, update_by_norms=update_by_norms)
