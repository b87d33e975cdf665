"""The privacy unit, the mechanism a noised reducer applies, and the ledger it carries.

Types only (no accountant: that is :mod:`funcaccum.privacy`, on dp-accounting),
so the reducers can name them without importing an optional dependency.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from ._errors import FuncaccumError
from ._validate import check_int, check_real, describe

__all__ = [
    "ADJACENCIES",
    "UNITS",
    "Accounting",
    "Adjacency",
    "GaussianMechanism",
    "PrivacyLedger",
    "Unit",
    "check_accounting",
    "count_step",
]

Unit = Literal["example", "microbatch"]
"""What one contribution to the noised sum is: one example, or one fixed group of examples."""
UNITS: tuple[Unit, ...] = ("example", "microbatch")
Adjacency = Literal["add_or_remove_one", "replace_one"]
"""Which datasets count as neighbours: one unit added or removed, or one unit replaced."""
ADJACENCIES: tuple[Adjacency, ...] = ("add_or_remove_one", "replace_one")


class PrivacyLedger(NamedTuple):
    """What a run has spent: the steps taken under one ``(q, sigma)``, as 0-d tensors.

    A noised :func:`~funcaccum.clipped_mean` with ``accounting=`` carries one
    (``state.reducer_carry``) and reports it (``metrics.stats.privacy``); it is
    saved and loaded with the state. :func:`funcaccum.privacy.epsilon`
    recomputes epsilon from it on demand: no accountant runs per step.

    Attributes:
        steps: optimizer steps accounted, applied and skipped alike (int64); -1
            once the ledger was stepped by a reducer of another sampling rate,
            noise multiplier, dataset size or cap (a checkpoint resumed under
            another configuration), which :func:`~funcaccum.privacy.epsilon` refuses.
        sample_rate: ``q``, the probability that a unit is in a step's batch (float64).
        noise_multiplier: ``sigma``, the noise's standard deviation over the
            sensitivity (float64).
        dataset_size: the units sampling draws from (int64).
        max_batch_size: the cap on a batch's units, 0 for none (int64): a
            capped batch is accounted as truncated Poisson sampling.
        delta: the delta epsilon is reported at (float64).

    Example:
        >>> import torch
        >>> import funcaccum as fa
        >>> from funcaccum import privacy
        >>> accounting = privacy.Accounting(dataset_size=100, sample_rate=0.04, delta=1e-5)
        >>> reducer = fa.clipped_mean(1.0, noise_multiplier=1.0, accounting=accounting)
        >>> step = fa.train_step(lambda p, b: (b @ p["w"]).mean(), optimizer=fa.optim.sgd(0.1),
        ...                      accumulation=fa.Accumulation(reducer=reducer, microbatch_size=1))
        >>> state = step.init({"w": torch.zeros(2)})
        >>> for _ in range(3):
        ...     state, metrics = step(state, torch.ones(4, 2))   # 4 microbatches, 1 step each
        >>> ledger = state.reducer_carry
        >>> isinstance(ledger, privacy.PrivacyLedger), int(ledger.steps)
        (True, 3)
    """

    steps: torch.Tensor
    sample_rate: torch.Tensor
    noise_multiplier: torch.Tensor
    dataset_size: torch.Tensor
    max_batch_size: torch.Tensor
    delta: torch.Tensor


class Accounting(NamedTuple):
    """How each step's units are drawn, and the delta to report epsilon at.

    What a noised :func:`~funcaccum.clipped_mean` needs to keep a
    :class:`PrivacyLedger` (``accounting=``); a
    :class:`funcaccum.privacy.PoissonSampler` gives its own
    (``sampler.accounting(delta)``).

    Attributes:
        dataset_size: the number of units sampling draws from.
        sample_rate: ``q``: each unit is in a step's batch with this probability,
            independently (Poisson sampling).
        delta: the delta of the (epsilon, delta) guarantee reported; it must
            be below ``1 / dataset_size`` (a delta of ``1 / dataset_size``
            allows publishing one unit's data outright), and is refused
            otherwise.
        max_batch_size: a cap on a batch's units (a batch over it keeps a
            uniformly random subset of this size), or None.
    """

    dataset_size: int
    sample_rate: float
    delta: float
    max_batch_size: int | None = None

    @property
    def expected_batch_size(self) -> float:
        """``q * dataset_size``: the fixed denominator DP-SGD divides the noised sum by."""
        return self.sample_rate * self.dataset_size

    def ledger(
        self, noise_multiplier: float, steps: int = 0, device: torch.device | None = None
    ) -> PrivacyLedger:
        """A :class:`PrivacyLedger` of ``steps`` steps at ``noise_multiplier`` under this sampling.

        Example:
            >>> from funcaccum import privacy
            >>> accounting = privacy.Accounting(dataset_size=60000, sample_rate=256 / 60000,
            ...                                 delta=1e-5)
            >>> ledger = accounting.ledger(noise_multiplier=1.1, steps=14062)
            >>> int(ledger.steps), accounting.expected_batch_size
            (14062, 256.0)
        """
        check_accounting(self)
        check_real("noise_multiplier", noise_multiplier, low=0, low_inclusive=False)
        check_int("steps", steps, low=0)

        def value(x: float, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(x, dtype=dtype, device=device)

        return PrivacyLedger(
            steps=value(steps, torch.int64),
            sample_rate=value(self.sample_rate, torch.float64),
            noise_multiplier=value(noise_multiplier, torch.float64),
            dataset_size=value(self.dataset_size, torch.int64),
            max_batch_size=value(self.max_batch_size or 0, torch.int64),
            delta=value(self.delta, torch.float64),
        )


def check_accounting(accounting: object) -> Accounting:
    """``accounting`` if it is an :class:`Accounting` with values in range; else raise."""
    if not isinstance(accounting, Accounting):
        raise FuncaccumError(
            "accounting must be a funcaccum.privacy.Accounting (sampler.accounting(delta)), "
            f"got {describe(accounting)}"
        )
    size = check_int("dataset_size", accounting.dataset_size, low=1)
    check_real("sample_rate", accounting.sample_rate, low=0, high=1, low_inclusive=False)
    check_real("delta", accounting.delta, low=0, high=1, low_inclusive=False, high_inclusive=False)
    if accounting.delta >= 1 / size:
        raise FuncaccumError(
            f"delta={accounting.delta:g} is not below 1/dataset_size = {1 / size:g}: publishing "
            "one random unit's data outright meets (0, 1/dataset_size)-DP, so the guarantee "
            "would say nothing. Use a delta well below 1/dataset_size (1e-5 for 60,000 units)"
        )
    if accounting.max_batch_size is not None:
        check_int("max_batch_size", accounting.max_batch_size, low=1, high=size)
    return accounting


class GaussianMechanism(NamedTuple):
    """The Gaussian mechanism a noised reducer applies: what it protects, and how much.

    A noised :func:`~funcaccum.clipped_mean` reports it as ``reducer.privacy``.
    Each unit contributes ``min(1, max_norm / |g_u|) g_u`` to the clipped sum
    (weight 1, whatever the loss's weight), noise ``N(0, (noise_multiplier *
    max_norm)^2)`` is added to that sum once per step, and the sum is divided by
    the fixed ``denominator``.

    Attributes:
        unit: ``"example"`` (each microbatch holds one example:
            ``microbatch_size=1``) or ``"microbatch"`` (each microbatch is a
            fixed group of ``microbatch_size`` examples, drawn together).
        max_norm: the clipping threshold ``C``.
        noise_multiplier: ``sigma``.
        denominator: the fixed number the noised sum is divided by.
        generator: the generator the noise is drawn from; None for torch's global one.
        accounting: how units are sampled, for the ledger; or None (no ledger).

    Example:
        >>> import funcaccum as fa
        >>> from funcaccum import privacy
        >>> mechanism = fa.clipped_mean(0.5, noise_multiplier=2.0, denominator=64).privacy
        >>> isinstance(mechanism, privacy.GaussianMechanism), mechanism.unit, mechanism.noise_std
        (True, 'example', 1.0)
    """

    unit: Unit
    max_norm: float
    noise_multiplier: float
    denominator: float
    generator: torch.Generator | None = None
    accounting: Accounting | None = None

    def sensitivity(self, adjacency: Adjacency = "add_or_remove_one") -> float:
        """How far one unit can move the clipped sum, in L2 norm.

        ``"add_or_remove_one"`` (the relation Poisson-sampled DP-SGD and the
        accountants use): ``max_norm``; ``"replace_one"``: ``2 * max_norm``.

        Example:
            >>> import funcaccum as fa
            >>> mechanism = fa.clipped_mean(0.5, noise_multiplier=1.0, denominator=64).privacy
            >>> mechanism.sensitivity(), mechanism.sensitivity("replace_one")
            (0.5, 1.0)
        """
        if adjacency not in ADJACENCIES:
            raise FuncaccumError(f"adjacency must be one of {ADJACENCIES}, got {adjacency!r}")
        return self.max_norm * (1 if adjacency == "add_or_remove_one" else 2)

    @property
    def noise_std(self) -> float:
        """The noise's standard deviation on the clipped sum: ``noise_multiplier * max_norm``."""
        return self.noise_multiplier * self.max_norm


def count_step(
    ledger: PrivacyLedger, accounting: Accounting, noise_multiplier: float
) -> PrivacyLedger:
    """``ledger`` one step further; marked -1 if it was kept under another configuration.

    Pure tensor arithmetic (no host read), so it runs inside a compiled step.
    ``delta`` becomes ``accounting.delta``: it is what epsilon is reported at,
    not part of what was spent.
    """
    same = (
        (ledger.sample_rate == accounting.sample_rate)
        & (ledger.noise_multiplier == noise_multiplier)
        & (ledger.dataset_size == accounting.dataset_size)
        & (ledger.max_batch_size == (accounting.max_batch_size or 0))
        & (ledger.steps >= 0)
    )
    return PrivacyLedger(
        torch.where(same, ledger.steps + 1, torch.full_like(ledger.steps, -1)),
        ledger.sample_rate,
        ledger.noise_multiplier,
        ledger.dataset_size,
        ledger.max_batch_size,
        torch.full_like(ledger.delta, accounting.delta),
    )
