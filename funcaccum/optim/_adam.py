"""Adam and AdamW."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._tree import PyTree, accumulator_like, foreach_map, tree_device
from .._validate import check_hyperparam
from ._base import GradientTransformation, Schedule, ScheduleStep, chain, checked, hyperparams
from ._learning_rate import scale_by_learning_rate
from ._masked import Mask
from ._weight_decay import add_decayed_weights

__all__ = ["ScaleByAdamState", "adam", "adamw", "scale_by_adam"]


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`.

    Example:
        >>> state = scale_by_adam().init({"w": torch.zeros(2)})
        >>> state.count, state.mu["w"], sorted(state.hyperparams)
        (tensor(0), tensor([0., 0.]), ['b1', 'b2', 'eps'])
    """

    count: torch.Tensor  # type: ignore[assignment]  # updates taken, for the bias corrections
    mu: PyTree  # first moment, in at least float32
    nu: PyTree  # second moment, in at least float32
    hyperparams: dict[str, torch.Tensor]  # b1, b2, eps


@checked(ScaleByAdamState)
def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Rescale by Adam's bias-corrected moment estimates (Kingma and Ba 2015, "Adam").

    The update is ``(mu / (1 - b1^t)) / (sqrt(nu) / sqrt(1 - b2^t) + eps)``,
    arranged as :class:`torch.optim.Adam` computes it. The moments are kept
    in at least float32, whatever the dtype of the params.

    >>> rule = scale_by_adam()
    >>> params = {"w": torch.zeros(2)}
    >>> updates, _ = rule.update({"w": torch.tensor([0.1, -3.0])}, rule.init(params))
    >>> updates["w"]                                # the first step is sign(g), near enough
    tensor([ 1.0000, -1.0000])

    References:
        Kingma and Ba, `Adam: A Method for Stochastic Optimization
        <https://arxiv.org/abs/1412.6980>`_, 2014
    """
    check_hyperparam("b1", b1)
    check_hyperparam("b2", b2)
    check_hyperparam("eps", eps)

    def init(params: PyTree) -> ScaleByAdamState:
        return ScaleByAdamState(
            torch.zeros((), dtype=torch.int64, device=tree_device(params)),
            accumulator_like(params),
            accumulator_like(params),
            hyperparams(params, b1=b1, b2=b2, eps=eps),
        )

    def update(
        updates: PyTree,
        state: ScaleByAdamState,
        params: PyTree = None,
        *,
        schedule_step: ScheduleStep = None,
    ) -> tuple[PyTree, ScaleByAdamState]:
        h = state.hyperparams
        count = state.count + 1
        # As torch.optim.Adam's foreach kernels compute it; each first op makes the new
        # tensors, and the rest write into them (the old moments are never written).
        mu = foreach_map(lambda m, g: m.lerp(g.to_dtypes_of(m), 1 - h["b1"]), state.mu, updates)
        nu = foreach_map(
            lambda v, g: g.mul(1 - h["b2"]).mul_(g).to_dtypes_of(v).addmul_(v, h["b2"]),
            state.nu,
            updates,
        )
        correction1 = 1 - h["b1"] ** count
        root_correction2 = torch.sqrt(1 - h["b2"] ** count)
        updates = foreach_map(
            lambda m, v: m.div(v.sqrt().div_(root_correction2).add_(h["eps"])).div_(correction1),
            mu,
            nu,
        )
        return updates, ScaleByAdamState(count, mu, nu, h)

    return GradientTransformation(init, update)


def adam(
    learning_rate: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: float = 0.0,
    mask: Mask | None = None,
) -> GradientTransformation:
    """Adam, as :class:`torch.optim.Adam`: ``weight_decay`` is L2, added to the gradient.

    ``mask`` limits the decay to some params (see
    :func:`~funcaccum.optim.add_decayed_weights`).

    Example:
        >>> from funcaccum import optim
        >>> rule = optim.adam(1e-3)
        >>> params = {"w": torch.zeros(3)}
        >>> state = rule.init(params)
        >>> updates, state = rule.update({"w": torch.randn(3)}, state, params)

    References:
        Kingma and Ba, `Adam: A Method for Stochastic Optimization
        <https://arxiv.org/abs/1412.6980>`_, 2014
    """
    check_hyperparam("learning_rate", learning_rate, allow_schedule=True)
    check_hyperparam("weight_decay", weight_decay)
    transforms = [add_decayed_weights(weight_decay, mask=mask)] if weight_decay else []
    return chain(*transforms, scale_by_adam(b1, b2, eps), scale_by_learning_rate(learning_rate))


def adamw(
    learning_rate: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: float = 1e-2,
    mask: Mask | None = None,
) -> GradientTransformation:
    """AdamW, as :class:`torch.optim.AdamW`: weight decay decoupled from the moments.

    The step is ``-learning_rate * (adam_update + weight_decay * params)``
    (Loshchilov and Hutter 2019, "Decoupled Weight Decay Regularization").
    ``mask`` limits the decay to some params, as a torch parameter group with
    ``weight_decay=0`` for the rest: a pytree of bools like the params, or a
    callable such as :func:`~funcaccum.optim.decay_mask` (biases and norm
    scales excluded).

    Example:
        >>> from funcaccum import optim
        >>> rule = optim.adamw(optim.warmup_cosine_decay_schedule(0.0, 1e-3, 100, 1000))
        >>> state = rule.init({"w": torch.zeros(3)})
        >>> rule = optim.adamw(1e-3, weight_decay=0.1, mask=optim.decay_mask)
        >>> state = rule.init({"weight": torch.zeros(3, 2), "bias": torch.zeros(3)})

    References:
        Loshchilov and Hutter, `Decoupled Weight Decay Regularization
        <https://arxiv.org/abs/1711.05101>`_, 2019

        Kingma and Ba, `Adam: A Method for Stochastic Optimization
        <https://arxiv.org/abs/1412.6980>`_, 2014
    """
    check_hyperparam("learning_rate", learning_rate, allow_schedule=True)
    return chain(
        scale_by_adam(b1, b2, eps),
        add_decayed_weights(weight_decay, mask=mask),
        scale_by_learning_rate(learning_rate),
    )
