"""Scaling by a learning rate or a schedule."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import tree
from .._tree import PyTree, tree_device
from .._validate import check_callable, check_hyperparam
from ._base import GradientTransformation, Schedule, ScheduleStep, checked, hyperparams

__all__ = [
    "ScaleByLearningRateState",
    "ScaleByScheduleState",
    "scale_by_learning_rate",
    "scale_by_schedule",
]


def _count(params: PyTree) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=tree_device(params))


class ScaleByLearningRateState(NamedTuple):
    """State of :func:`scale_by_learning_rate`.

    Example:
        >>> state = scale_by_learning_rate(0.1).init({"w": torch.zeros(2)})
        >>> state.count, state.hyperparams["learning_rate"].item()
        (tensor(0), 0.1)
    """

    count: torch.Tensor  # type: ignore[assignment]  # optimizer steps taken
    hyperparams: dict[str, torch.Tensor]  # learning_rate: the one the latest update used


@checked(ScaleByLearningRateState)
def scale_by_learning_rate(learning_rate: float | Schedule) -> GradientTransformation:
    """Multiply updates by ``-learning_rate`` (descent); the rate may be a schedule.

    A number becomes a 0-d tensor in the state, which
    :func:`~funcaccum.optim.set_hyperparams` can change without a recompile.
    A schedule is evaluated at the optimizer-step count held here, which moves
    once per update (never per microbatch), or at ``schedule_step``
    when the caller passes one; the state records the value used.

    Example:
        >>> from funcaccum import optim
        >>> rule = scale_by_learning_rate(optim.linear_schedule(1.0, 0.0, 4))
        >>> params = {"w": torch.zeros(1)}
        >>> state = rule.init(params)
        >>> for _ in range(3):
        ...     updates, state = rule.update({"w": torch.ones(1)}, state, params)
        >>> updates["w"], state.hyperparams["learning_rate"].item()
        (tensor([-0.5000]), 0.5)
    """
    check_hyperparam("learning_rate", learning_rate, allow_schedule=True)
    schedule = learning_rate if callable(learning_rate) else None

    def init(params: PyTree) -> ScaleByLearningRateState:
        count = _count(params)
        first = learning_rate(count) if callable(learning_rate) else learning_rate
        return ScaleByLearningRateState(count, hyperparams(params, learning_rate=first))

    def update(
        updates: PyTree,
        state: ScaleByLearningRateState,
        params: PyTree = None,
        *,
        schedule_step: ScheduleStep = None,
    ) -> tuple[PyTree, ScaleByLearningRateState]:
        clock = state.count if schedule_step is None else schedule_step
        rate = state.hyperparams["learning_rate"] if schedule is None else schedule(clock)
        return tree.scale(updates, -rate), ScaleByLearningRateState(
            state.count + 1, {"learning_rate": rate}
        )

    return GradientTransformation(init, update)


class ScaleByScheduleState(NamedTuple):
    """State of :func:`scale_by_schedule`.

    Example:
        >>> from funcaccum import optim
        >>> scale_by_schedule(optim.constant_schedule(0.5)).init({"w": torch.zeros(2)}).count
        tensor(0)
    """

    count: torch.Tensor  # type: ignore[assignment]  # named as optax names it


@checked(ScaleByScheduleState)
def scale_by_schedule(schedule: Schedule) -> GradientTransformation:
    """Multiply updates by ``schedule(count)``, the count of optimizer steps taken.

    >>> from funcaccum import optim
    >>> rule = scale_by_schedule(optim.exponential_decay(1.0, 1, 0.5))
    >>> state = rule.init({"w": torch.zeros(1)})
    >>> first, state = rule.update({"w": torch.ones(1)}, state)
    >>> second, state = rule.update({"w": torch.ones(1)}, state)
    >>> first["w"].item(), second["w"].item()
    (1.0, 0.5)
    """
    check_callable("schedule", schedule, "a function of the step count")

    def init(params: PyTree) -> ScaleByScheduleState:
        return ScaleByScheduleState(_count(params))

    def update(
        updates: PyTree,
        state: ScaleByScheduleState,
        params: PyTree = None,
        *,
        schedule_step: ScheduleStep = None,
    ) -> tuple[PyTree, ScaleByScheduleState]:
        clock = state.count if schedule_step is None else schedule_step
        return tree.scale(updates, schedule(clock)), ScaleByScheduleState(state.count + 1)

    return GradientTransformation(init, update)
