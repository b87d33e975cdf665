"""Epsilon from a privacy ledger, and the noise for a target epsilon, through dp-accounting."""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from typing import Any, Literal

from .._errors import FuncaccumError
from .._privacy import Accounting, PrivacyLedger, check_accounting
from .._validate import check_int, check_real, describe

__all__ = ["AccountantName", "calibrate_noise", "epsilon"]

AccountantName = Literal["rdp", "pld"]
"""A dp-accounting accountant: Renyi DP (``"rdp"``) or privacy loss distributions (``"pld"``)."""
_ACCOUNTANTS = ("rdp", "pld")


def _dp_accounting() -> Any:
    """dp-accounting, imported on first use: it is the optional ``privacy`` extra."""
    try:
        return importlib.import_module("dp_accounting")
    except ImportError as error:
        raise FuncaccumError(
            "privacy accounting uses dp-accounting, which is not installed: "
            "python -m pip install dp-accounting (funcaccum's 'privacy' extra)"
        ) from error


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """dp-accounting logs a warning for each RDP order whose series it leaves out (a small
    fractional order at a small sigma); the bound stays valid without it, so not per call."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _event(
    dp: Any, sample_rate: float, noise_multiplier: float, dataset_size: int, cap: int | None
) -> Any:
    """One step's DpEvent: Poisson-subsampled Gaussian, or truncated Poisson with a cap."""
    if cap:
        return dp.dp_event.TruncatedSubsampledGaussianDpEvent(
            dataset_size=dataset_size,
            sampling_probability=sample_rate,
            truncated_batch_size=cap,
            noise_multiplier=noise_multiplier,
        )
    return dp.dp_event.PoissonSampledDpEvent(
        sample_rate, dp.dp_event.GaussianDpEvent(noise_multiplier)
    )


def _fresh(dp: Any, accountant: AccountantName | None, capped: bool) -> Any:
    """A new accountant: RDP by default, PLD for truncated Poisson (the only one that has it)."""
    if accountant is not None and accountant not in _ACCOUNTANTS:
        raise FuncaccumError(
            f"accountant must be one of {_ACCOUNTANTS} or None, got {accountant!r}"
        )
    if accountant == "rdp" and capped:
        raise FuncaccumError(
            "a capped batch (max_batch_size) is truncated Poisson sampling, which dp-accounting "
            "accounts with its PLD accountant only: pass accountant='pld' (or None)"
        )
    if accountant == "pld" or (accountant is None and capped):
        return dp.pld.PLDAccountant()
    return dp.rdp.RdpAccountant()


def epsilon(ledger: PrivacyLedger, *, accountant: AccountantName | None = None) -> float:
    """The epsilon a :class:`~funcaccum.privacy.PrivacyLedger` has spent, at its delta.

    Computed on demand on the host (RDP: milliseconds; PLD: a fraction of a
    second), never inside a step. The accounting is dp-accounting's, for the
    add-or-remove-one adjacency: each step is a Poisson-subsampled Gaussian
    mechanism with sampling rate ``q`` and noise multiplier ``sigma``
    (``PoissonSampledDpEvent``), or, with a cap on the batch, truncated
    Poisson sampling (``TruncatedSubsampledGaussianDpEvent``), composed over
    the ledger's steps.

    Args:
        ledger: a ledger: ``state.reducer_carry`` or ``metrics.stats.privacy``
            of a noised ``clipped_mean(accounting=...)``, or
            ``Accounting.ledger(noise_multiplier, steps)`` for a plan.
        accountant: ``"rdp"`` (Renyi DP, Mironov 2017; the same orders and
            conversion as Opacus's RDP accountant), ``"pld"`` (privacy loss
            distributions, tighter), or None: RDP, or PLD for a capped batch.

    Returns:
        Epsilon, a float (0.0 before the first step).

    Raises:
        FuncaccumError: dp-accounting is not installed; the ledger was stepped
            under another configuration (steps = -1); RDP for a capped batch.

    Example:
        >>> from funcaccum import privacy
        >>> accounting = privacy.Accounting(dataset_size=60000, sample_rate=256 / 60000,
        ...                                 delta=1e-5)
        >>> round(privacy.epsilon(accounting.ledger(noise_multiplier=1.1, steps=14062)), 3)
        2.597

    References:
        Mironov, `Renyi Differential Privacy <https://arxiv.org/abs/1702.07476>`_, 2017;
        Doroshenko et al., `Connect the Dots: Tighter Discrete Approximations of Privacy Loss
        Distributions <https://arxiv.org/abs/2207.04380>`_, 2022;
        `dp-accounting <https://pypi.org/project/dp-accounting/>`_ (Google)
    """
    if not isinstance(ledger, PrivacyLedger):
        raise FuncaccumError(
            "epsilon takes a funcaccum.privacy.PrivacyLedger (state.reducer_carry or "
            f"metrics.stats.privacy of clipped_mean(accounting=...)), got {describe(ledger)}"
        )
    steps = int(ledger.steps)
    if steps < 0:
        raise FuncaccumError(
            "this privacy ledger was stepped by a reducer of another sampling rate, noise "
            "multiplier, dataset size or cap (a checkpoint resumed under another configuration), "
            "so its steps are not all of one kind: keep one ledger per configuration"
        )
    cap = int(ledger.max_batch_size) or None
    dp = _dp_accounting()
    fresh = _fresh(dp, accountant, cap is not None)
    if steps == 0:
        return 0.0
    event = _event(
        dp, float(ledger.sample_rate), float(ledger.noise_multiplier), int(ledger.dataset_size), cap
    )
    with _quiet():
        return float(fresh.compose(event, steps).get_epsilon(float(ledger.delta)))


def calibrate_noise(
    target_epsilon: float,
    accounting: Accounting,
    steps: int,
    *,
    accountant: AccountantName | None = None,
    tol: float = 1e-4,
) -> float:
    """The smallest noise multiplier whose epsilon after ``steps`` steps is at most the target.

    Searches with dp-accounting's ``calibrate_dp_mechanism`` (Brent's method)
    over ``sigma``, the accountant as in :func:`epsilon`, then makes sure the
    result meets the target (epsilon falls as sigma grows).

    Args:
        target_epsilon: the epsilon to stay within, > 0.
        accounting: the sampling, the dataset size, the delta and any cap
            (:class:`~funcaccum.privacy.Accounting`; ``sampler.accounting(delta)``).
        steps: the optimizer steps planned, >= 1.
        accountant: as for :func:`epsilon`.
        tol: the tolerance on sigma.

    Returns:
        ``sigma``, for ``clipped_mean(noise_multiplier=...)``.

    Example:
        >>> from funcaccum import privacy
        >>> accounting = privacy.Accounting(dataset_size=60000, sample_rate=256 / 60000,
        ...                                 delta=1e-5)
        >>> sigma = privacy.calibrate_noise(3.0, accounting, steps=14062)
        >>> round(sigma, 2), privacy.epsilon(accounting.ledger(sigma, 14062)) <= 3.0
        (1.01, True)
    """
    check_real("target_epsilon", target_epsilon, low=0, low_inclusive=False)
    check_accounting(accounting)
    check_int("steps", steps, low=1)
    check_real("tol", tol, low=0, low_inclusive=False)
    dp = _dp_accounting()
    capped = accounting.max_batch_size is not None
    _fresh(dp, accountant, capped)  # refuses a bad name or RDP for a cap before searching

    def make_event(sigma: float) -> Any:
        step = _event(
            dp, accounting.sample_rate, sigma, accounting.dataset_size, accounting.max_batch_size
        )
        return dp.dp_event.SelfComposedDpEvent(step, steps)

    try:
        with _quiet():
            sigma = float(
                dp.calibrate_dp_mechanism(
                    lambda: _fresh(dp, accountant, capped),
                    make_event,
                    target_epsilon,
                    accounting.delta,
                    dp.LowerEndpointAndGuess(tol, 1.0),
                    tol=tol,
                )
            )
    except Exception as error:  # dp-accounting's search errors (no bracket found, ...)
        raise FuncaccumError(
            f"calibrate_noise found no noise multiplier for target_epsilon={target_epsilon:g} "
            f"over {steps} steps at sample_rate={accounting.sample_rate:g}, "
            f"delta={accounting.delta:g} ({type(error).__name__}: {error}). Its search starts "
            f"at sigma = tol = {tol:g}: a target that no sigma reaches from there (epsilon at "
            "that sigma is already below it, or a target beyond the accountant's range) has "
            "no answer; check the target and the plan with epsilon(accounting.ledger(sigma, "
            "steps))"
        ) from error
    # Brent's method lands within tol of the boundary, on either side: step onto the safe one.
    while epsilon(accounting.ledger(sigma, steps), accountant=accountant) > target_epsilon:
        sigma += tol
    return sigma
