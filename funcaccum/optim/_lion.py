"""Lion."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._tree import PyTree, accumulator_like, foreach_map
from .._validate import check_hyperparam
from ._base import GradientTransformation, Schedule, ScheduleStep, chain, checked, hyperparams
from ._learning_rate import scale_by_learning_rate
from ._masked import Mask
from ._weight_decay import add_decayed_weights

__all__ = ["ScaleByLionState", "lion", "scale_by_lion"]


class ScaleByLionState(NamedTuple):
    """State of :func:`scale_by_lion`.

    Example:
        >>> state = scale_by_lion().init({"w": torch.zeros(2)})
        >>> state.mu["w"], sorted(state.hyperparams)
        (tensor([0., 0.]), ['b1', 'b2'])
    """

    mu: PyTree  # momentum, in at least float32
    hyperparams: dict[str, torch.Tensor]  # b1, b2


@checked(ScaleByLionState)
def scale_by_lion(b1: float = 0.9, b2: float = 0.99) -> GradientTransformation:
    """The sign of an interpolated momentum.

    From Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms". The
    update is ``sign(b1 * mu + (1 - b1) * g)``; then ``mu = b2 * mu + (1 - b2) * g``.

    >>> rule = scale_by_lion()
    >>> params = {"w": torch.zeros(3)}
    >>> rule.update({"w": torch.tensor([0.5, -2.0, 0.0])}, rule.init(params))[0]
    {'w': tensor([ 1., -1.,  0.])}

    References:
        Chen et al., `Symbolic Discovery of Optimization Algorithms
        <https://arxiv.org/abs/2302.06675>`_, 2023
    """
    check_hyperparam("b1", b1)
    check_hyperparam("b2", b2)

    def init(params: PyTree) -> ScaleByLionState:
        return ScaleByLionState(accumulator_like(params), hyperparams(params, b1=b1, b2=b2))

    def update(
        updates: PyTree,
        state: ScaleByLionState,
        params: PyTree = None,
        *,
        schedule_step: ScheduleStep = None,
    ) -> tuple[PyTree, ScaleByLionState]:
        h = state.hyperparams
        # As torch's Lion: interpolate, take the sign; the new tensors are written in place.
        direction = foreach_map(lambda m, g: m.lerp(g, 1 - h["b1"]).sign_(), state.mu, updates)
        mu = foreach_map(lambda m, g: m.lerp(g, 1 - h["b2"]), state.mu, updates)
        return direction, ScaleByLionState(mu, h)

    return GradientTransformation(init, update)


def lion(
    learning_rate: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.99,
    *,
    weight_decay: float = 0.0,
    mask: Mask | None = None,
) -> GradientTransformation:
    """Lion with decoupled weight decay: ``-learning_rate * (sign(...) + weight_decay * params)``.

    ``mask`` limits the decay to some params (see
    :func:`~funcaccum.optim.add_decayed_weights`).

    Example:
        >>> from funcaccum import optim
        >>> rule = optim.lion(1e-4, weight_decay=0.1)
        >>> state = rule.init({"w": torch.zeros(3)})

    References:
        Chen et al., `Symbolic Discovery of Optimization Algorithms
        <https://arxiv.org/abs/2302.06675>`_, 2023
    """
    check_hyperparam("learning_rate", learning_rate, allow_schedule=True)
    check_hyperparam("weight_decay", weight_decay)
    transforms = [add_decayed_weights(weight_decay, mask=mask)] if weight_decay else []
    return chain(scale_by_lion(b1, b2), *transforms, scale_by_learning_rate(learning_rate))
