"""Differential privacy: the mechanism's unit, Poisson sampling, and accounting (docs/privacy.md).

A noised :func:`~funcaccum.clipped_mean` is DP-SGD's gradient mechanism: each
unit (one example, or one fixed group) contributes its clipped gradient with
weight 1, Gaussian noise fits that sensitivity, and the sum is divided by a
fixed denominator; its ``privacy`` is the :class:`GaussianMechanism`, and
:class:`~funcaccum.Accumulation` refuses a split in which one unit could
contribute more. Here are the pieces around it:

- :class:`PoissonSampler`: a batch sampler drawing each example with
  probability ``q`` (variable batches, empty ones included, an optional cap);
- :class:`Accounting` (``sampler.accounting(delta)``), given to
  ``clipped_mean(accounting=...)``, which then carries a
  :class:`PrivacyLedger` in the training state, one step per optimizer step;
- :func:`epsilon` (on demand, from a ledger) and :func:`calibrate_noise`
  (sigma for a target epsilon), through dp-accounting (the ``privacy`` extra).
"""

from .._clipped_mean import PrivateStats
from .._privacy import Accounting, GaussianMechanism, PrivacyLedger
from ._accounting import AccountantName, calibrate_noise, epsilon
from ._sampler import PoissonSampler

__all__ = [
    "AccountantName",
    "Accounting",
    "GaussianMechanism",
    "PoissonSampler",
    "PrivacyLedger",
    "PrivateStats",
    "calibrate_noise",
    "epsilon",
]
