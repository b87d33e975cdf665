"""The clipped mean reducer: clip each microbatch gradient, then average; optionally add noise."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import optree
import torch

from . import tree
from ._errors import FuncaccumError
from ._privacy import (
    UNITS,
    Accounting,
    GaussianMechanism,
    PrivacyLedger,
    Unit,
    check_accounting,
    count_step,
)
from ._reducer import (
    CarryRule,
    Control,
    Denominator,
    Maximum,
    Reducer,
    as_units,
    check_denominator,
    divisor,
    scalar_zeros,
    typed_merge,
)
from ._tree import PyTree, accumulator_like, foreach_map, tree_device, unit_squared_norms
from ._validate import check_dtype, check_real, check_state

__all__ = ["ClippedMeanState", "ClippedMeanStats", "PrivateStats", "clipped_mean"]


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

    clipped_sum: PyTree  # sum_i w_i c_i g_i, c_i = min(1, max_norm / |g_i|); w_i = 1 with noise
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


class PrivateStats(NamedTuple):
    """What a training step reports for ``clipped_mean(accounting=...)``: the clip, and the ledger.

    Attributes:
        clip_fraction: as in :class:`~funcaccum.extend.ClippedMeanStats`.
        norm_mean: as there.
        norm_max: as there.
        clipped_norm_mean: as there.
        privacy: the :class:`~funcaccum.privacy.PrivacyLedger` after this step;
            epsilon on demand: ``privacy.epsilon(metrics.stats.privacy)``.

    Example:
        >>> import funcaccum as fa
        >>> from funcaccum import privacy
        >>> reducer = fa.clipped_mean(1.0, noise_multiplier=1.0, accounting=privacy.Accounting(
        ...     dataset_size=100, sample_rate=0.04, delta=1e-5))
        >>> step = fa.train_step(lambda p, b: (b @ p["w"]).mean(), optimizer=fa.optim.sgd(0.1),
        ...                      accumulation=fa.Accumulation(reducer=reducer, microbatch_size=1))
        >>> state, metrics = step(step.init({"w": torch.zeros(2)}), torch.ones(4, 2))
        >>> isinstance(metrics.stats, privacy.PrivateStats), int(metrics.stats.privacy.steps)
        (True, 1)
    """

    clip_fraction: torch.Tensor
    norm_mean: torch.Tensor
    norm_max: torch.Tensor
    clipped_norm_mean: torch.Tensor
    privacy: PrivacyLedger


def clipped_mean(
    max_norm: float,
    *,
    denominator: Denominator | None = None,
    noise_multiplier: float = 0.0,
    generator: torch.Generator | None = None,
    accum_dtype: torch.dtype | None = None,
    unit: Unit = "example",
    accounting: Accounting | None = None,
) -> Reducer:
    """Clip each microbatch gradient to global L2 norm ``max_norm``, then take the weighted mean.

    Microbatch ``i`` contributes ``w_i * min(1, max_norm / |g_i|) * g_i``: the
    clip acts on each microbatch's own gradient, before accumulation, which is
    what per-example clipping and robust averaging need.

    With ``noise_multiplier > 0`` this is the gradient mechanism of DP-SGD
    (Abadi et al. 2016), built so that the noise fits what one unit can
    change (docs/privacy.md):

    - the **unit** is one example (``microbatch_size=1``, enforced by
      :class:`~funcaccum.Accumulation`), or with ``unit="microbatch"`` one fixed
      group of ``microbatch_size`` examples drawn together;
    - each unit contributes ``min(1, max_norm / |g_u|) * g_u`` with **weight
      1**, whatever the loss's weight (a 50-token example is one unit, not 50;
      a weight of 0 still marks a padding unit absent), so one unit moves the
      clipped sum by at most ``max_norm``: the **sensitivity**
      (``reducer.privacy.sensitivity()``, under add-or-remove-one adjacency;
      twice that under replace-one);
    - Gaussian noise of standard deviation ``noise_multiplier * max_norm`` is
      added to the clipped sum once per optimizer step (in ``finalize``, after
      any merge across processes), and the sum is divided by a **fixed**
      denominator (the real count would publish the batch size without noise).

    With ``accounting=`` the reducer also keeps a
    :class:`~funcaccum.privacy.PrivacyLedger` as its carry (saved with the
    training state), stepped once per optimizer step, skipped steps included,
    and reported in the stats; :func:`funcaccum.privacy.epsilon` turns it into
    epsilon on demand.

    To clip the accumulated gradient instead, reduce with :func:`mean` and put
    :func:`funcaccum.optim.clip_by_global_norm` in the update rule. With a
    ``max_norm`` no gradient reaches and no noise, this equals :func:`mean`.
    A microbatch whose norm is Inf or NaN makes the result NaN (it is never
    silently clipped to zero), so a non-finite guard sees it.

    Args:
        max_norm: the clipping threshold, > 0.
        denominator: ``"weight"`` divides by the summed weight (the real
            example count); a number divides by that fixed number. Default
            ``"weight"``; with noise, a number is required (the expected
            number of units per batch), and ``accounting``'s
            ``expected_batch_size`` is the default.
        noise_multiplier: the noise's standard deviation over ``max_norm``, >= 0.
        generator: draws the noise; default the global generator (seed it
            with ``torch.manual_seed``; it is the one that compiles).
            :class:`~funcaccum.distributed.DataParallel` needs one, which it
            puts in the same state on every rank; save it with
            ``fa.save(..., generators={"noise": generator})``.
        accum_dtype: the dtype of the sums; default at least float32.
        unit: with noise, what one contribution is: ``"example"`` or ``"microbatch"``.
        accounting: with noise, how units are sampled and the delta to report
            (:class:`~funcaccum.privacy.Accounting`, e.g.
            ``sampler.accounting(delta=1e-5)``), to keep a privacy ledger.

    Returns:
        A :class:`~funcaccum.extend.Reducer`; ``finalize`` gives ``(grads,
        stats)`` with :class:`~funcaccum.extend.ClippedMeanStats`:
        ``clip_fraction`` (of microbatches with nonzero weight), ``norm_mean``
        and ``norm_max`` (before clipping) and ``clipped_norm_mean`` (after).
        Its ``update_by_norms`` serves strategies that compute norms without
        materialising gradients (:func:`funcaccum.ghost`); with noise its
        ``privacy`` is the :class:`~funcaccum.privacy.GaussianMechanism`.

    Raises:
        FuncaccumError: an argument out of range; noise without a fixed
            denominator; ``accounting`` without noise.

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
        >>> private = clipped_mean(1.0, noise_multiplier=1.1, denominator=256)
        >>> private.privacy.sensitivity(), private.privacy.noise_std
        (1.0, 1.1)

    References:
        Abadi et al., `Deep Learning with Differential Privacy
        <https://arxiv.org/abs/1607.00133>`_, 2016;
        Ponomareva et al., `How to DP-fy ML <https://arxiv.org/abs/2303.00654>`_, 2023
        (section 5.6: microbatches and sensitivity)
    """
    check_real("max_norm", max_norm, low=0, low_inclusive=False)
    check_real("noise_multiplier", noise_multiplier, low=0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise FuncaccumError(f"generator must be a torch.Generator or None, got {generator!r}")
    if unit not in UNITS:
        raise FuncaccumError(f"unit must be one of {UNITS}, got {unit!r}")
    noised = noise_multiplier > 0
    if accounting is not None:
        check_accounting(accounting)
        if not noised:
            raise FuncaccumError(
                "accounting= keeps a privacy ledger of a noised sum: give noise_multiplier > 0"
            )
    if noised and denominator is None:
        if accounting is None:
            raise FuncaccumError(
                "with noise, choose the denominator: the expected number of units per batch "
                "(denominator=q*N, sampler.expected_batch_size), or pass accounting=..., whose "
                "expected batch size is then the default"
            )
        denominator = accounting.expected_batch_size
    if noised and denominator == "weight":
        raise FuncaccumError(
            "with noise the denominator must be a fixed number, the expected number of units "
            "per batch (sampler.expected_batch_size): denominator='weight' divides by the real "
            "count, which would publish the batch size without noise"
        )
    check_denominator(denominator)
    override = check_dtype("accum_dtype", accum_dtype)
    mechanism = (
        GaussianMechanism(
            unit, float(max_norm), float(noise_multiplier), float(denominator),  # type: ignore[arg-type]
            generator, accounting,
        )
        if noised
        else None
    )  # fmt: skip

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
        # With noise every present unit weighs 1: the noise is calibrated for one unit's
        # clipped gradient, not for its examples or tokens (docs/privacy.md).
        unit_weights = active.to(weights.dtype) if noised else weights
        zero = torch.zeros_like(norms)
        clipped = weighted_sum(torch.where(active, unit_weights * factor, 0))
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
        if noised:
            total = _add_noise(total, noise_multiplier * max_norm, generator)
        units = state.unit_count
        # Noise made new tensors, which are this call's own to scale.
        scale = 1 / divisor(state.weight_sum, denominator)
        scaled = tree.scale(total, scale, donate=donate or noised)
        return scaled, ClippedMeanStats(
            clip_fraction=state.clipped_count / units,
            norm_mean=state.norm_sum / units,
            norm_max=state.norm_max.value,
            clipped_norm_mean=state.clipped_norm_sum / units,
        )

    merge = typed_merge(ClippedMeanState, "clipped_mean()")
    carry = None if accounting is None else _ledger_rule(accounting, float(noise_multiplier))
    return Reducer(
        init, update, merge, finalize, carry=carry, update_by_norms=update_by_norms,
        privacy=mechanism,
    )  # fmt: skip


def _add_noise(total: PyTree, std: float, generator: torch.Generator | None) -> PyTree:
    """``total`` plus ``N(0, std^2)`` in every coordinate, drawn from ``generator``."""
    if generator is None:
        return optree.tree_map(lambda s: s + std * torch.randn_like(s), total)
    if torch.compiler.is_compiling():
        raise FuncaccumError(
            "noise from a torch.Generator runs eagerly (torch.compile cannot trace a generator): "
            "compile='loss' compiles the loss and leaves the noise eager; or drop generator= "
            "to draw from torch's global generator (not under DataParallel)"
        )
    return optree.tree_map(
        lambda s: s + std * torch.randn(s.shape, generator=generator, dtype=s.dtype).to(s.device),
        total,
    )


def _ledger_rule(accounting: Accounting, noise_multiplier: float) -> CarryRule:
    """The carry of an accounted reducer: its ledger, one step per optimizer step, skips too."""

    def init(params: PyTree) -> PrivacyLedger:
        return accounting.ledger(noise_multiplier, device=tree_device(params))

    def skip(ledger: PrivacyLedger) -> PrivacyLedger:
        return count_step(ledger, accounting, noise_multiplier)

    def update(
        ledger: PrivacyLedger, stats: ClippedMeanStats
    ) -> tuple[PrivacyLedger, PrivateStats, Control]:
        ledger = skip(ledger)
        return ledger, PrivateStats(*stats, privacy=ledger), Control()

    return CarryRule(init, update, skip)
