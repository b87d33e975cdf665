"""The adaptive-step reducer: gradient-noise statistics that set the step and the batch."""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch

from . import tree
from ._errors import FuncaccumError
from ._reducer import (
    BatchControl,
    CarryRule,
    Control,
    Reducer,
    SumFold,
    as_units,
    scalar_zeros,
    typed_merge,
)
from ._tree import Leaves, PyTree, accumulator_like, leaf_norms, unit_squared_norms
from ._validate import check_dtype, check_int, check_real, check_state

__all__ = [
    "AdaptiveCarry",
    "AdaptiveState",
    "AdaptiveStats",
    "StepOutputs",
    "adaptive",
    "noise_statistics",
    "stats_dtype",
    "step_outputs",
]


def stats_dtype(accum_dtype: torch.dtype) -> torch.dtype:
    """The dtype of :func:`adaptive`'s scalar sums and carry: ``accum_dtype``, at least float32.

    It follows the gradient sum's dtype so that the whole state is one dtype
    and merges across processes in one collective of that dtype (a float32
    gradient sum beside float64 scalars would travel upcast, doubling the
    bytes). The squared norms in it then cost no precision that the gradient
    sum has not already cost: ``Q = sum_i n_i |g_i|^2 - n |g_bar|^2`` cancels
    between two terms, and ``|g_bar|^2`` carries ``accum_dtype``'s rounding.

    >>> stats_dtype(torch.float32), stats_dtype(torch.bfloat16), stats_dtype(torch.float64)
    (torch.float32, torch.float32, torch.float64)
    """
    return torch.promote_types(accum_dtype, torch.float32)


class AdaptiveState(NamedTuple):
    """State of :func:`adaptive` for one optimizer step: sums only, merged by addition.

    Example:
        >>> import funcaccum as fa
        >>> reducer = fa.adaptive()
        >>> state = reducer.init({"w": torch.zeros(2)})
        >>> state = reducer.update(state, {"w": torch.tensor([1.0, 0.0])}, torch.tensor(4.0))
        >>> isinstance(state, fa.extend.AdaptiveState), state.weight_sum, state.unit_count
        (True, tensor(4., dtype=torch.float64), tensor(1., dtype=torch.float64))
    """

    grad_sum: PyTree  # sum_i n_i g_i, in accum_dtype (float64 by default)
    square_sum: PyTree  # per parameter leaf: sum_i n_i |g_i|^2, 0-d, in stats_dtype(accum_dtype)
    weight_sum: torch.Tensor  # n = sum_i n_i
    unit_count: torch.Tensor  # k: microbatches with n_i > 0


class AdaptiveCarry(NamedTuple):
    """What :func:`adaptive` carries across optimizer steps.

    Example:
        >>> import funcaccum as fa
        >>> carry = fa.adaptive().carry.init({"w": torch.zeros(2)})  # also TrainState.reducer_carry
        >>> isinstance(carry, fa.extend.AdaptiveCarry), carry.progress, carry.suggested_k
        (True, tensor(0., dtype=torch.float64), tensor(2., dtype=torch.float64))
    """

    trace_ema: torch.Tensor  # EMA of the raw tr(Sigma) estimates
    grad_sq_ema: torch.Tensor  # EMA of the raw |G|^2 estimates
    ema_weight: torch.Tensor  # the EMA's total weight, 1 - prod(beta), to debias it
    progress: torch.Tensor  # tau = sum of the step scales so far
    suggested_k: torch.Tensor  # K for the next step, from the EMA (k_min before any)


def noise_statistics(state: AdaptiveState) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased estimates ``(T, G2)`` of ``tr(Sigma)`` per example and ``|G|^2``, from one step.

    With ``g_bar = sum_i n_i g_i / n`` and ``Q = sum_i n_i |g_i|^2 - n |g_bar|^2``:
    ``T = Q / (k - 1)`` and ``G2 = |g_bar|^2 - T / n``. If microbatch ``i``
    averages ``n_i`` examples drawn independently, ``E[Q] = (k - 1) tr(Sigma)``
    and ``E|g_bar|^2 = |G|^2 + tr(Sigma) / n``, so both are unbiased for unequal
    ``n_i``. They need ``k >= 2`` (else NaN or Inf); ``G2`` can come out negative.

    Example:
        Two microbatches of 4 examples: ``n = 8``, ``g_bar = (2, 0)``, ``Q = 40 - 32``:

        >>> import funcaccum as fa
        >>> reducer = fa.adaptive()
        >>> state = reducer.init({"w": torch.zeros(2)})
        >>> for g in ([1.0, 0.0], [3.0, 0.0]):
        ...     state = reducer.update(state, {"w": torch.tensor(g)}, torch.tensor(4.0))
        >>> fa.extend.noise_statistics(state)           # T = 8 / 1, G2 = 4 - 8 / 8
        (tensor(8., dtype=torch.float64), tensor(3., dtype=torch.float64))
    """
    n, k = state.weight_sum, state.unit_count
    mean_sq = tree.vdot(state.grad_sum, state.grad_sum).to(n.dtype) / n**2
    scatter = sum(optree.tree_leaves(state.square_sum)) - n * mean_sq
    trace = scatter / (k - 1)
    return trace, mean_sq - trace / n


class AdaptiveStats(NamedTuple):
    """Statistics of :func:`adaptive` (see there for what each means).

    Attributes:
        noise_trace: this step's raw ``T``, the per-example gradient noise ``tr(Sigma)``.
        grad_sq: this step's raw ``G2``, the squared true gradient ``|G|^2``.
        ready: this step's norm test, ``n theta^2 G2 >= T``.
        weight: ``n``, the step's summed weight.
        units: ``k``, its microbatches with nonzero weight.
        noise_scale: ``B = T / G2`` (from the carry's EMA in a training step).
        step_scale: the AdaScale gain ``r``.
        efficiency: ``r B0 / n``.
        suggested_k: the microbatch count that would pass the norm test.
        progress: ``tau`` before this step, the sum of the gains (0 without a carry).

    Example:
        >>> import funcaccum as fa
        >>> reducer = fa.adaptive()
        >>> state = reducer.init({"w": torch.zeros(2)})
        >>> for g in ([1.0, 0.0], [3.0, 0.0]):
        ...     state = reducer.update(state, {"w": torch.tensor(g)}, torch.tensor(4.0))
        >>> _, stats = reducer.finalize(state)
        >>> isinstance(stats, fa.extend.AdaptiveStats), stats.noise_trace.item(), stats.units.item()
        (True, 8.0, 2.0)
    """

    noise_trace: torch.Tensor
    grad_sq: torch.Tensor
    ready: torch.Tensor
    weight: torch.Tensor
    units: torch.Tensor
    noise_scale: torch.Tensor
    step_scale: torch.Tensor
    efficiency: torch.Tensor
    suggested_k: torch.Tensor
    progress: torch.Tensor


class StepOutputs(NamedTuple):
    """What the statistics imply, from :func:`step_outputs`."""

    noise_scale: torch.Tensor
    step_scale: torch.Tensor
    efficiency: torch.Tensor
    suggested_k: torch.Tensor


def step_outputs(
    trace: torch.Tensor,
    grad_sq: torch.Tensor,
    n: torch.Tensor,
    k: torch.Tensor,
    *,
    base_batch_size: float | None,
    theta: float,
    k_min: int,
    k_max: int,
) -> StepOutputs:
    """Noise scale, AdaScale gain, efficiency and suggested K from ``(T, G2)``.

    The estimates are clamped here, when read (``T >= 0``, ``G2 >= 0``):
    ``B = T / G2``; ``r = (G2 + T / B0) / (G2 + T / n)``, which is
    ``(1 + B / B0) / (1 + B / n)`` written so that ``G2 = 0`` gives ``n / B0``
    and ``T = 0`` gives 1; efficiency ``r B0 / n``; and the smallest K whose
    batch passes the norm test, ``ceil(B / (theta^2 n_bar))`` with ``n_bar =
    n / k``, clipped to ``[k_min, k_max]``. Unknown (non-finite) estimates
    give ``r = 1`` and suggest the current ``k``.
    """
    unknown = ~(torch.isfinite(trace) & torch.isfinite(grad_sq))
    trace, grad_sq = torch.clamp(trace, min=0), torch.clamp(grad_sq, min=0)
    base = n / k if base_batch_size is None else torch.full_like(n, base_batch_size)
    noise_scale = trace / grad_sq
    denominator = grad_sq + trace / n
    step_scale = torch.where(
        (denominator > 0) & ~unknown, (grad_sq + trace / base) / denominator, torch.ones_like(n)
    )
    needed = torch.ceil(noise_scale / (theta**2 * (n / k)))
    needed = torch.where(grad_sq > 0, needed, torch.full_like(needed, k_max))
    needed = torch.where(unknown, k, torch.clamp(needed, k_min, k_max))
    return StepOutputs(noise_scale, step_scale, step_scale * base / n, needed)


def adaptive(
    *,
    base_batch_size: float | None = None,
    theta: float = 1.0,
    k_min: int = 2,
    k_max: int = 64,
    decay: float = 0.999,
    accum_dtype: torch.dtype = torch.float64,
) -> Reducer:
    """The exact weighted mean, plus gradient-noise statistics that set the step and the batch.

    The gradient is the same as :func:`~funcaccum.mean`'s (never rescaled).
    From the same microbatch gradients the reducer estimates, without bias for
    unequal microbatch sizes, the per-example gradient noise ``T = tr(Sigma)``
    and the squared true gradient ``G2 = |G|^2`` (:func:`noise_statistics`),
    and from them:

    - ``noise_scale``: ``B = T / G2``, the gradient noise scale ``B_simple``
      (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training");
    - ``step_scale``: the AdaScale gain ``r = (1 + B/B0) / (1 + B/n)`` for a
      batch of ``n`` against the base batch ``B0`` (Johnson et al. 2020,
      "AdaScale SGD"), in ``[1, n/B0]``; :func:`~funcaccum.train_step`
      multiplies the update (the learning rate) by it;
    - ``progress``: ``tau``, the sum of the gains, a scale-invariant step count
      that a schedule can run on (``train_step(..., schedule_clock="progress")``);
    - ``efficiency``: ``r B0 / n``, the share of the scale-up that is progress;
    - ``ready``: this step's norm test (Byrd et al. 2012, "Sample size selection
      in optimization methods for machine learning"), in its exact form
      ``n theta^2 G2 >= T``: the batch mean is within ``theta |G|`` of the
      true gradient in expectation. (Byrd's practical form compares with
      ``|g_bar|^2 = G2 + T/n`` and always passes at ``theta = 1``.)
    - ``suggested_k``: the microbatch count whose batch would pass the test,
      ``ceil(B / (theta^2 n_bar))``, clipped to ``[k_min, k_max]``.

    :func:`~funcaccum.accumulate` reports these from the one step's raw
    estimates. Across the steps of a :func:`~funcaccum.train_step` the raw
    estimates (unclamped) enter a debiased EMA with ``beta = decay ** k``, so
    smoothing is per microbatch whatever K is; a step with ``k < 2`` or a
    non-finite estimate does not update it. ``noise_scale``, ``step_scale``,
    ``efficiency`` and ``suggested_k`` then come from the EMA; ``ready``
    stays this step's own; ``noise_trace`` and ``grad_sq`` are always raw.

    State: ``sum_i n_i g_i`` (in ``accum_dtype``, float64 by default, so that
    ``Q`` keeps its precision when the noise is small against the gradient),
    ``sum_i n_i |g_i|^2`` per parameter leaf (from gradients upcast to at
    least float32), ``n`` and ``k``: all sums, merged by one addition. The
    scalars, and the carry, are in :func:`stats_dtype`: ``accum_dtype``, at
    least float32, so the state is one dtype and merges across processes in
    one collective without widening the gradient sum. With
    ``accum_dtype=torch.float32`` they are float32 too, which raised the
    estimates' rounding error up to about 7x over float64 scalars on the
    measured models (to 1.5e-4 relative where it had been 2.6e-5), still far
    below their sampling error; where float32 gradient sums are too coarse,
    float64 scalars did not rescue them (docs/scaling.md). The gradient is
    returned in ``accum_dtype``; ``train_step`` casts it to each param's
    accumulation dtype for the update rule.

    Args:
        base_batch_size: ``B0``, the batch the learning rate was tuned for;
            default the mean microbatch size ``n / k``, so ``r`` is in ``[1, k]``.
        theta: the norm test's tolerance, > 0.
        k_min: the smallest microbatch count to suggest, >= 2.
        k_max: the largest.
        decay: the EMA's decay per microbatch, in (0, 1).
        accum_dtype: the dtype of the gradient sum.

    Returns:
        A :class:`~funcaccum.Reducer` with a cross-step tracker.

    Example:
        >>> def loss_fn(params, batch):
        ...     return 0.5 * torch.sum((params["w"] - batch) ** 2, dim=-1).mean()
        >>> from funcaccum import accumulate
        >>> params = {"w": torch.zeros(4, dtype=torch.float64)}
        >>> g = torch.Generator().manual_seed(0)
        >>> batch = torch.randn(4096, 4, generator=g, dtype=torch.float64) + 3.0  # (n, d)
        >>> result = accumulate(loss_fn, params, batch, reducer=adaptive(), num_microbatches=64)
        >>> stats = result.stats                        # the truth: tr(Sigma) = 4, |G|^2 = 36
        >>> round(stats.noise_trace.item(), 2), round(stats.grad_sq.item(), 2)
        (3.66, 35.52)
        >>> round(stats.noise_scale.item(), 3), bool(stats.ready)   # B = T / G2
        (0.103, True)

    References:
        McCandlish et al., `An Empirical Model of Large-Batch Training
        <https://arxiv.org/abs/1812.06162>`_, 2018 (the noise scale)

        Johnson et al., `AdaScale SGD: A User-Friendly Algorithm for Distributed Training
        <https://arxiv.org/abs/2007.05105>`_, 2020 (the gain)

        Byrd et al., `Sample size selection in optimization methods for machine learning
        <https://doi.org/10.1007/s10107-012-0572-5>`_, 2012 (the norm test)
    """
    check_real("base_batch_size", base_batch_size, low=0, low_inclusive=False, allow_none=True)
    check_real("theta", theta, low=0, low_inclusive=False)
    check_int("k_min", k_min)
    check_int("k_max", k_max)
    if not 2 <= k_min <= k_max:
        raise FuncaccumError(f"need 2 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    check_real("decay", decay, low=0, high=1, low_inclusive=False, high_inclusive=False)
    check_dtype("accum_dtype", accum_dtype, allow_none=False)
    options: dict[str, Any] = {
        "base_batch_size": base_batch_size,
        "theta": theta,
        "k_min": k_min,
        "k_max": k_max,
    }
    scalars = stats_dtype(accum_dtype)

    def init(params: PyTree) -> AdaptiveState:
        squares = optree.tree_map(lambda p: torch.zeros((), dtype=scalars, device=p.device), params)
        n, k = scalar_zeros(params, 2, scalars)
        return AdaptiveState(accumulator_like(params, accum_dtype), squares, n, k)

    def update(
        state: AdaptiveState, grads: PyTree, weight: torch.Tensor, *, donate: bool = False
    ) -> AdaptiveState:
        check_state(state, AdaptiveState, owner="adaptive()", role="update")
        if weight.ndim == 0:
            # One microbatch: every leaf's norm in one foreach op, each element squared and
            # summed in the statistics' dtype, whatever K or the number of leaves.
            weight = weight.to(scalars)
            leaves, treedef = optree.tree_flatten(state.square_sum)
            norms = Leaves(leaf_norms(treedef.flatten_up_to(grads), scalars), fresh=True)
            squares = Leaves(leaves).addmul(norms.mul_(norms), weight)
            return AdaptiveState(
                tree.add_weighted(state.grad_sum, grads, weight, donate=donate),
                optree.tree_unflatten(treedef, squares.tensors),
                state.weight_sum + weight,
                state.unit_count + (weight > 0),
            )
        units, weights = as_units(grads, weight)
        weights = weights.to(scalars)

        def weighted_squares(total: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            return total + torch.dot(weights, unit_squared_norms(g, sum_dtype=scalars))

        return AdaptiveState(
            tree.add_weighted(state.grad_sum, grads, weights, donate=donate),
            optree.tree_map(weighted_squares, state.square_sum, units),
            state.weight_sum + weights.sum(),
            state.unit_count + (weights > 0).sum(),
        )

    def update_by_sum(
        state: AdaptiveState,
        grad_sum: PyTree,
        weight: torch.Tensor,
        count: int,
        squares: torch.Tensor,
        *,
        donate: bool = False,
    ) -> AdaptiveState:
        """``count`` microbatches of one ``weight``: their gradients' sum and squared norms."""
        check_state(state, AdaptiveState, owner="adaptive()", role="update")
        weight = weight.to(scalars)
        leaves, treedef = optree.tree_flatten(state.square_sum)
        # Separate tensors, not views of one: a compiled loop refuses aliased carries.
        totals = Leaves(leaves).addmul(Leaves(squares.to(scalars).sum(0).unbind()), weight)
        return AdaptiveState(
            tree.add_weighted(state.grad_sum, grad_sum, weight, donate=donate),
            optree.tree_unflatten(treedef, totals.tensors),
            state.weight_sum + weight * count,
            state.unit_count + (weight > 0) * count,
        )

    def passes(n: torch.Tensor, trace: torch.Tensor, grad_sq: torch.Tensor) -> torch.Tensor:
        """The exact norm test, ``n theta^2 G2 >= T``."""
        return n * theta**2 * grad_sq >= trace

    def finalize(state: AdaptiveState, *, donate: bool = False) -> tuple[PyTree, AdaptiveStats]:
        check_state(state, AdaptiveState, owner="adaptive()", role="finalize")
        n, k = state.weight_sum, state.unit_count
        trace, grad_sq = noise_statistics(state)
        outputs = step_outputs(trace, grad_sq, n, k, **options)
        reported = AdaptiveStats(
            trace, grad_sq, passes(n, trace, grad_sq), n, k, *outputs, torch.zeros_like(n)
        )
        return tree.scale(state.grad_sum, 1 / n, donate=donate), reported

    def init_carry(params: PyTree) -> AdaptiveCarry:
        trace_ema, grad_sq_ema, ema_weight, progress, suggested_k = scalar_zeros(params, 5, scalars)
        return AdaptiveCarry(trace_ema, grad_sq_ema, ema_weight, progress, suggested_k + k_min)

    def update_carry(
        carry: AdaptiveCarry, stats: AdaptiveStats
    ) -> tuple[AdaptiveCarry, AdaptiveStats, Control]:
        check_state(carry, AdaptiveCarry, owner="adaptive()", role="carry update")
        trace, grad_sq, n, k = stats.noise_trace, stats.grad_sq, stats.weight, stats.units
        valid = torch.isfinite(trace) & torch.isfinite(grad_sq) & (k >= 2)
        beta = torch.where(valid, torch.full_like(k, decay) ** k, torch.ones_like(k))
        zero = torch.zeros_like(trace)
        trace_ema = beta * carry.trace_ema + (1 - beta) * torch.where(valid, trace, zero)
        grad_sq_ema = beta * carry.grad_sq_ema + (1 - beta) * torch.where(valid, grad_sq, zero)
        ema_weight = beta * carry.ema_weight + (1 - beta)
        # Before the first valid step the EMA is 0/0 = NaN: r = 1, K unchanged.
        outputs = step_outputs(trace_ema / ema_weight, grad_sq_ema / ema_weight, n, k, **options)
        new_carry = AdaptiveCarry(
            trace_ema,
            grad_sq_ema,
            ema_weight,
            carry.progress + outputs.step_scale,
            outputs.suggested_k,
        )
        reported = AdaptiveStats(
            trace, grad_sq, stats.ready, n, k, *outputs, carry.progress
        )
        return new_carry, reported, Control(outputs.step_scale, carry.progress)

    def ready(state: AdaptiveState) -> torch.Tensor:
        return passes(state.weight_sum, *noise_statistics(state))

    merge = typed_merge(AdaptiveState, "adaptive()")
    return Reducer(
        init,
        update,
        merge,
        finalize,
        by_sum=SumFold(update_by_sum, accum_dtype, wants_squares=True),
        carry=CarryRule(init_carry, update_carry),
        batch_control=BatchControl(k_min, k_max, ready, lambda carry: carry.suggested_k),
    )
