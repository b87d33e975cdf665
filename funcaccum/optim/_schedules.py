"""Schedules: pure functions of the optimizer-step count.

A schedule maps the number of optimizer steps taken so far (a 0-d int64
tensor; 0 at the first update) to a 0-d float64 value. It advances once per
optimizer step, never per microbatch: the count lives in the optimizer state
and only an update moves it. Because the count is a tensor, a compiled step
reads a new value every step without recompiling.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from .._errors import FuncaccumError
from .._validate import check_bool, check_callable, check_int, check_real, describe
from ._base import HYPERPARAM_DTYPE, Schedule

__all__ = [
    "constant_schedule",
    "cosine_decay_schedule",
    "exponential_decay",
    "join_schedules",
    "linear_schedule",
    "piecewise_constant_schedule",
    "warmup_cosine_decay_schedule",
]


def _steps(count: torch.Tensor) -> torch.Tensor:
    return count.to(HYPERPARAM_DTYPE)


def constant_schedule(value: float) -> Schedule:
    """``value`` at every step.

    >>> constant_schedule(0.1)(torch.tensor(7))
    tensor(0.1000, dtype=torch.float64)
    """
    check_real("value", value)
    return lambda count: torch.full_like(_steps(count), value)


def linear_schedule(
    init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0
) -> Schedule:
    """From ``init_value`` to ``end_value`` linearly over ``transition_steps``, then constant.

    A linear warmup is ``linear_schedule(0.0, peak, warmup_steps)``.

    >>> [round(linear_schedule(0.0, 1.0, 4)(torch.tensor(t)).item(), 2) for t in range(6)]
    [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """
    check_real("init_value", init_value)
    check_real("end_value", end_value)
    check_int("transition_steps", transition_steps, low=1)
    check_int("transition_begin", transition_begin, low=0)

    def schedule(count: torch.Tensor) -> torch.Tensor:
        fraction = torch.clamp((_steps(count) - transition_begin) / transition_steps, 0.0, 1.0)
        return init_value + (end_value - init_value) * fraction

    return schedule


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """Half a cosine from ``init_value`` down to ``alpha * init_value`` over ``decay_steps``.

    The same curve as :class:`torch.optim.lr_scheduler.CosineAnnealingLR` with
    ``T_max=decay_steps`` and ``eta_min=alpha * init_value`` (Loshchilov and
    Hutter 2017, "SGDR") up to ``decay_steps``; after it, this schedule holds
    its end value, where torch's rises again along the cosine.

    >>> round(cosine_decay_schedule(1.0, 10)(torch.tensor(5)).item(), 6)
    0.5

    References:
        Loshchilov and Hutter, `SGDR: Stochastic Gradient Descent with Warm Restarts
        <https://arxiv.org/abs/1608.03983>`_, 2017
    """
    check_real("init_value", init_value)
    check_int("decay_steps", decay_steps, low=1)
    check_real("alpha", alpha, low=0, high=1)

    def schedule(count: torch.Tensor) -> torch.Tensor:
        fraction = torch.clamp(_steps(count) / decay_steps, max=1.0)
        cosine = 0.5 * (1 + torch.cos(math.pi * fraction))
        return init_value * ((1 - alpha) * cosine + alpha)

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run ``schedules[i]`` from ``boundaries[i - 1]`` on; each sees steps counted from its start.

    >>> warmup_then_constant = join_schedules(
    ...     [linear_schedule(0.0, 1.0, 2), constant_schedule(1.0)], boundaries=[2]
    ... )
    >>> [warmup_then_constant(torch.tensor(t)).item() for t in range(4)]
    [0.0, 0.5, 1.0, 1.0]
    """
    schedules, boundaries = list(schedules), list(boundaries)
    for i, later in enumerate(schedules):
        check_callable(f"schedules[{i}]", later, "a schedule (a function of the step count)")
    for i, boundary in enumerate(boundaries):
        check_int(f"boundaries[{i}]", boundary, low=0)
    if len(schedules) != len(boundaries) + 1:
        raise FuncaccumError(
            f"join_schedules needs one boundary fewer than schedules, got {len(schedules)} "
            f"schedules and {len(boundaries)} boundaries"
        )
    if any(a >= b for a, b in itertools.pairwise(boundaries)):
        # An equal pair would give the schedule between them no steps at all.
        raise FuncaccumError(f"boundaries must strictly increase, got {boundaries}")

    def schedule(count: torch.Tensor) -> torch.Tensor:
        value = schedules[0](count)
        for boundary, later in zip(boundaries, schedules[1:], strict=True):
            value = torch.where(count >= boundary, later(count - boundary), value)
        return value

    return schedule


def warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value``, then cosine decay to ``end_value``.

    ``decay_steps`` counts the warmup too (the optax convention): the cosine
    runs over ``decay_steps - warmup_steps`` steps.

    >>> schedule = warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=2, decay_steps=6)
    >>> [round(schedule(torch.tensor(t)).item(), 3) for t in range(7)]
    [0.0, 0.5, 1.0, 0.854, 0.5, 0.146, 0.0]

    References:
        Goyal et al., `Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour
        <https://arxiv.org/abs/1706.02677>`_, 2017 (linear warmup)

        Loshchilov and Hutter, `SGDR: Stochastic Gradient Descent with Warm Restarts
        <https://arxiv.org/abs/1608.03983>`_, 2017
    """
    check_real("init_value", init_value)
    check_real("peak_value", peak_value)
    check_int("warmup_steps", warmup_steps)
    check_int("decay_steps", decay_steps)
    check_real("end_value", end_value)
    if not 0 < warmup_steps < decay_steps:
        raise FuncaccumError(
            f"need 0 < warmup_steps < decay_steps, got warmup_steps={warmup_steps}, "
            f"decay_steps={decay_steps}"
        )
    alpha = end_value / peak_value if peak_value else 0.0
    return join_schedules(
        [
            linear_schedule(init_value, peak_value, warmup_steps),
            cosine_decay_schedule(peak_value, decay_steps - warmup_steps, alpha),
        ],
        [warmup_steps],
    )


def exponential_decay(
    init_value: float, transition_steps: int, decay_rate: float, *, staircase: bool = False
) -> Schedule:
    """``init_value * decay_rate ** (step / transition_steps)``; ``staircase`` floors the exponent.

    Step decay (:class:`torch.optim.lr_scheduler.StepLR`) is
    ``exponential_decay(lr, step_size, gamma, staircase=True)``.

    >>> [exponential_decay(1.0, 2, 0.5, staircase=True)(torch.tensor(t)).item() for t in range(5)]
    [1.0, 1.0, 0.5, 0.5, 0.25]
    """
    check_real("init_value", init_value)
    check_int("transition_steps", transition_steps, low=1)
    check_real("decay_rate", decay_rate, low=0, low_inclusive=False)
    check_bool("staircase", staircase)

    def schedule(count: torch.Tensor) -> torch.Tensor:
        exponent = _steps(count) / transition_steps
        if staircase:
            exponent = torch.floor(exponent)
        return init_value * torch.pow(torch.full_like(exponent, decay_rate), exponent)

    return schedule


def piecewise_constant_schedule(
    init_value: float, boundaries_and_scales: dict[int, float]
) -> Schedule:
    """``init_value``, multiplied by ``scale`` at each boundary step reached.

    :class:`torch.optim.lr_scheduler.MultiStepLR` with milestones ``[a, b]``
    and factor ``g`` is ``piecewise_constant_schedule(lr, {a: g, b: g})``.

    >>> schedule = piecewise_constant_schedule(1.0, {2: 0.1, 4: 0.1})
    >>> [round(schedule(torch.tensor(t)).item(), 4) for t in range(6)]
    [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    """
    check_real("init_value", init_value)
    if not isinstance(boundaries_and_scales, dict):
        raise FuncaccumError(
            f"boundaries_and_scales must be a dict of step to scale, got "
            f"{describe(boundaries_and_scales)}"
        )
    for boundary, scale in boundaries_and_scales.items():
        check_int("a boundary of boundaries_and_scales", boundary, low=0)
        # A negative scale would flip the sign of what it scales (a learning rate: ascent).
        check_real(f"boundaries_and_scales[{boundary}]", scale, low=0)

    def schedule(count: torch.Tensor) -> torch.Tensor:
        value = torch.full_like(_steps(count), init_value)
        for boundary, scale in sorted(boundaries_and_scales.items()):
            value = torch.where(count >= boundary, value * scale, value)
        return value

    return schedule
