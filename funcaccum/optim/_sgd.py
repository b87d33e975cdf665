"""Stochastic gradient descent with momentum."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._errors import FuncaccumError
from .._tree import PyTree, accumulator_like, foreach_map
from .._validate import check_bool, check_hyperparam
from ._base import GradientTransformation, Schedule, ScheduleStep, chain, checked, hyperparams
from ._learning_rate import scale_by_learning_rate
from ._masked import Mask
from ._weight_decay import add_decayed_weights

__all__ = ["TraceState", "sgd", "trace"]


class TraceState(NamedTuple):
    """State of :func:`trace`.

    Example:
        >>> state = trace(0.9).init({"w": torch.zeros(2)})
        >>> state.trace["w"], state.hyperparams["momentum"].item()
        (tensor([0., 0.]), 0.9)
    """

    trace: PyTree  # the momentum buffer, in at least float32
    hyperparams: dict[str, torch.Tensor]  # momentum


@checked(TraceState)
def trace(momentum: float, *, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum: ``t = momentum * t + g``; the update is ``t`` (or ``g + momentum * t``).

    The buffer starts at zero, so its first value is ``g``, as in
    :class:`torch.optim.SGD` (Sutskever et al. 2013, "On the importance of
    initialization and momentum in deep learning").

    >>> rule = trace(0.5)
    >>> params = {"w": torch.zeros(1)}
    >>> state = rule.init(params)
    >>> first, state = rule.update({"w": torch.ones(1)}, state)
    >>> second, state = rule.update({"w": torch.ones(1)}, state)
    >>> first["w"].item(), second["w"].item()
    (1.0, 1.5)
    """
    check_hyperparam("momentum", momentum)
    check_bool("nesterov", nesterov)

    def init(params: PyTree) -> TraceState:
        return TraceState(accumulator_like(params), hyperparams(params, momentum=momentum))

    def update(
        updates: PyTree,
        state: TraceState,
        params: PyTree = None,
        *,
        schedule_step: ScheduleStep = None,
    ) -> tuple[PyTree, TraceState]:
        decay = state.hyperparams["momentum"]
        new_trace = foreach_map(lambda t, g: t.mul(decay).add_(g), state.trace, updates)
        if nesterov:
            updates = foreach_map(lambda g, t: g.addmul(t, decay), updates, new_trace)
        else:
            updates = new_trace
        return updates, TraceState(new_trace, state.hyperparams)

    return GradientTransformation(init, update)


def sgd(
    learning_rate: float | Schedule,
    momentum: float = 0.0,
    *,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    mask: Mask | None = None,
) -> GradientTransformation:
    """SGD with optional momentum, Nesterov momentum and L2 weight decay.

    Follows :class:`torch.optim.SGD` (with ``dampening=0``): the gradient gets
    ``weight_decay * params`` added, then momentum, then ``-learning_rate``.
    ``mask`` limits the decay to some params (see
    :func:`~funcaccum.optim.add_decayed_weights`).

    Example:
        >>> from funcaccum import optim
        >>> rule = optim.sgd(0.1, momentum=0.9)
        >>> params = {"w": torch.ones(2)}
        >>> updates, state = rule.update({"w": torch.ones(2)}, rule.init(params), params)
        >>> optim.apply_updates(params, updates)
        {'w': tensor([0.9000, 0.9000])}
    """
    check_hyperparam("learning_rate", learning_rate, allow_schedule=True)
    check_hyperparam("momentum", momentum)
    check_bool("nesterov", nesterov)
    check_hyperparam("weight_decay", weight_decay)
    if nesterov and not momentum:  # as torch.optim.SGD: plain SGD is not what was asked for
        raise FuncaccumError("nesterov=True needs a momentum > 0, got momentum=0")
    transforms = []
    if weight_decay:
        transforms.append(add_decayed_weights(weight_decay, mask=mask))
    if momentum or nesterov:
        transforms.append(trace(momentum, nesterov=nesterov))
    transforms.append(scale_by_learning_rate(learning_rate))
    return chain(*transforms)
