"""Scaling by a learning rate or a schedule."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import torch

from .. import tree
from .._errors import FuncaccumError
from .._tree import PyTree, tree_device
from .._validate import HYPERPARAM_RULES, check_callable, check_hyperparam, check_real, describe
from ._base import (
    HYPERPARAM_DTYPE,
    GradientTransformation,
    Schedule,
    ScheduleStep,
    checked,
    hyperparams,
)

__all__ = [
    "ScaleByLearningRateState",
    "ScaleByScheduleState",
    "scale_by_learning_rate",
    "scale_by_schedule",
]


def _count(params: PyTree) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=tree_device(params))


def _rate(value: Any, clock: torch.Tensor) -> torch.Tensor:
    """A schedule's value as a 0-d float64 tensor: a number or a 0-d real tensor; else raise.

    The shape and dtype are checked here (free under ``torch.compile``); the
    value, which a step cannot read without a host sync, is checked by the
    step's non-finite guard: a negative or non-finite rate skips the step, and
    :meth:`~funcaccum.TrainStep.check_skips` names it.
    """
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 and not (value.dtype == torch.bool or value.is_complex()):
            return value.to(HYPERPARAM_DTYPE)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=HYPERPARAM_DTYPE, device=clock.device)
    raise FuncaccumError(
        "the learning_rate schedule must return a number or a 0-d real tensor (a learning "
        f"rate), got {describe(value)}"
    )


def _first_rate(schedule: Schedule, count: torch.Tensor) -> torch.Tensor:
    """The schedule's value at step 0, checked as a learning rate (>= 0, finite)."""
    try:
        value = schedule(count)
    except TypeError as error:
        raise FuncaccumError(
            "the learning_rate schedule failed when called with the optimizer-step count (one "
            f"argument, a 0-d int64 tensor): {error}"
        ) from error
    rate = _rate(value, count)
    check_real(
        "learning_rate (the schedule's value at step 0)", rate, **HYPERPARAM_RULES["learning_rate"]
    )
    return rate


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
        first = _first_rate(learning_rate, count) if callable(learning_rate) else learning_rate
        return ScaleByLearningRateState(count, hyperparams(params, learning_rate=first))

    def update(
        updates: PyTree,
        state: ScaleByLearningRateState,
        params: PyTree = None,
        *,
        schedule_step: ScheduleStep = None,
    ) -> tuple[PyTree, ScaleByLearningRateState]:
        clock = state.count if schedule_step is None else schedule_step
        if schedule is None:
            rate = state.hyperparams["learning_rate"]
        else:
            rate = _rate(schedule(clock), clock)
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
