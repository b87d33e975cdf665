"""Clipping the update to a global norm."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import tree
from .._tree import PyTree
from .._validate import check_hyperparam
from ._base import GradientTransformation, ScheduleStep, checked, hyperparams

__all__ = ["ClipByGlobalNormState", "clip_by_global_norm"]


class ClipByGlobalNormState(NamedTuple):
    """State of :func:`clip_by_global_norm`.

    Example:
        >>> clip_by_global_norm(1.0).init({"w": torch.zeros(2)}).hyperparams["max_norm"]
        tensor(1., dtype=torch.float64)
    """

    hyperparams: dict[str, torch.Tensor]  # max_norm


@checked(ClipByGlobalNormState)
def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale the whole update down to global L2 norm ``max_norm`` when it is longer.

    In a chain after a reducer this clips the *accumulated* gradient, once per
    optimizer step, as :func:`torch.nn.utils.clip_grad_norm_` does when it is
    called right before ``optimizer.step()``. To clip each microbatch gradient
    before accumulation, reduce with :func:`funcaccum.clipped_mean` instead.

    >>> rule = clip_by_global_norm(1.0)
    >>> params = {"w": torch.zeros(2)}
    >>> rule.update({"w": torch.tensor([3.0, 4.0])}, rule.init(params))[0]
    {'w': tensor([0.6000, 0.8000])}
    """
    check_hyperparam("max_norm", max_norm)

    def init(params: PyTree) -> ClipByGlobalNormState:
        return ClipByGlobalNormState(hyperparams(params, max_norm=max_norm))

    def update(
        updates: PyTree,
        state: ClipByGlobalNormState,
        params: PyTree = None,
        *,
        schedule_step: ScheduleStep = None,
    ) -> tuple[PyTree, ClipByGlobalNormState]:
        limit = state.hyperparams["max_norm"]
        norm = tree.global_norm(updates)
        factor = torch.where(norm > limit, limit / norm, torch.ones_like(limit))
        return tree.scale(updates, factor), state

    return GradientTransformation(init, update)
