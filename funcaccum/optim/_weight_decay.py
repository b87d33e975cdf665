"""Weight decay as a transformation."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._tree import PyTree, foreach_map
from .._validate import check_hyperparam
from ._base import GradientTransformation, ScheduleStep, checked, hyperparams
from ._masked import Mask, masked

__all__ = ["AddDecayedWeightsState", "add_decayed_weights"]


class AddDecayedWeightsState(NamedTuple):
    """State of :func:`add_decayed_weights`.

    Example:
        >>> add_decayed_weights(0.1).init({"w": torch.zeros(2)}).hyperparams["weight_decay"].item()
        0.1
    """

    hyperparams: dict[str, torch.Tensor]  # weight_decay


@checked(AddDecayedWeightsState, needs_params=True)
def add_decayed_weights(weight_decay: float, *, mask: Mask | None = None) -> GradientTransformation:
    """Add ``weight_decay * params`` to the updates (to those ``mask`` marks, if given).

    Before an adaptive rule (as in :func:`~funcaccum.optim.adam`) this is L2
    regularisation; after it (as in :func:`~funcaccum.optim.adamw`) it is
    decoupled weight decay (Loshchilov and Hutter 2019, "Decoupled Weight
    Decay Regularization"). With a ``mask`` (a pytree of bools, or a callable
    such as :func:`~funcaccum.optim.decay_mask`) it is
    ``masked(add_decayed_weights(weight_decay), mask)``: the other params are
    not decayed, as a torch parameter group with ``weight_decay=0``.

    >>> rule = add_decayed_weights(0.1)
    >>> params = {"w": torch.tensor([2.0]), "b": torch.tensor([2.0])}
    >>> grads = {"w": torch.tensor([1.0]), "b": torch.tensor([1.0])}
    >>> rule.update(grads, rule.init(params), params)[0]
    {'w': tensor([1.2000]), 'b': tensor([1.2000])}
    >>> rule = add_decayed_weights(0.1, mask={"w": True, "b": False})
    >>> rule.update(grads, rule.init(params), params)[0]
    {'w': tensor([1.2000]), 'b': tensor([1.])}
    """
    check_hyperparam("weight_decay", weight_decay)
    if mask is not None:
        return masked(add_decayed_weights(weight_decay), mask)

    def init(params: PyTree) -> AddDecayedWeightsState:
        return AddDecayedWeightsState(hyperparams(params, weight_decay=weight_decay))

    def update(
        updates: PyTree,
        state: AddDecayedWeightsState,
        params: PyTree = None,
        *,
        schedule_step: ScheduleStep = None,
    ) -> tuple[PyTree, AddDecayedWeightsState]:
        decay = state.hyperparams["weight_decay"]
        updates = foreach_map(lambda u, p: u.addmul(p.to_dtypes_of(u), decay), updates, params)
        return updates, state

    return GradientTransformation(init, update)
