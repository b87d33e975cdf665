"""Model state from microbatches run side by side: batch norm's running statistics, closed form."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._errors import FuncaccumError

__all__ = ["CombineStates", "running_stats"]

Buffers = dict[str, torch.Tensor]
CombineStates = Callable[[Any, Any], Any]
"""``combine(old, stacked) -> state``: ``stacked`` holds K new states, each computed from
``old`` by one microbatch (leading axis K); the result is the state K microbatches run one
after another, in order, would leave."""


def _ema(old: torch.Tensor, new: torch.Tensor, momentum: float) -> torch.Tensor:
    """``r_K = a^K r_0 + sum_k a^(K-k) (new_k - a r_0)``, with ``a = 1 - momentum``.

    Microbatch ``k`` alone gives ``new_k = a r_0 + momentum mu_k``, so
    ``momentum mu_k = new_k - a r_0``; in order, ``r_k = a r_(k-1) + momentum
    mu_k``. The sums run in float64.
    """
    count = new.shape[0]
    a = 1.0 - momentum
    powers = torch.tensor(
        [a ** (count - 1 - k) for k in range(count)], dtype=torch.float64, device=new.device
    )
    old64, new64 = old.to(torch.float64), new.to(torch.float64)
    steps = new64 - a * old64
    total = a**count * old64 + torch.tensordot(powers, steps, dims=1)
    return total.to(old.dtype)


def running_stats(module: nn.Module) -> CombineStates:
    """How batch norm's running statistics from K side-by-side microbatches combine, exactly.

    For :func:`~funcaccum.vmap` and :func:`~funcaccum.chunked` with
    ``has_state=True``: each microbatch of a chunk runs from the same model
    state, and this closed form gives the state the microbatches, run one
    after another as a hand-written loop runs them, would have left: for
    ``running_mean`` and ``running_var`` with momentum ``m``, ``r_K = (1-m)^K
    r_0 + sum_k (1-m)^(K-k) m mu_k``; ``num_batches_tracked`` counts K. A
    layer with ``momentum=None`` (a cumulative mean) is refused: it reads its
    count as a Python number, which vmap cannot batch. It is exact because in training
    mode batch norm normalises with the microbatch's own statistics, so no
    microbatch's output depends on the running statistics. In eval mode
    nothing is updated and the state stays as it was.

    Args:
        module: the module given to ``functional_model(module, has_state=True)``;
            every buffer must belong to a ``BatchNorm1d/2d/3d`` (another buffer
            has no known rule: use :func:`~funcaccum.scan`, or write a combine).

    Returns:
        ``combine(old, stacked) -> state`` over the buffers dict.

    Example:
        >>> import funcaccum as fa
        >>> from torch.nn import functional
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
        >>> apply, params, buffers = fa.functional_model(model, has_state=True)
        >>> def loss_fn(params, state, batch):          # batch: (m, 3)
        ...     out, state = apply(params, state, batch)
        ...     return out.pow(2).mean(), state
        >>> batch = torch.randn(12, 3)
        >>> side = fa.Accumulation(num_microbatches=3, has_state=True,
        ...                        strategy=fa.vmap(model_state=fa.running_stats(model)))
        >>> loop = fa.Accumulation(num_microbatches=3, has_state=True)
        >>> a = side.runner(loss_fn).fold(params, batch, model_state=buffers).model_state
        >>> b = loop.runner(loss_fn).fold(params, batch, model_state=buffers).model_state
        >>> torch.allclose(a["1.running_mean"], b["1.running_mean"])
        True
        >>> int(a["1.num_batches_tracked"])             # three microbatches, as the loop counts
        3

    References:
        Ioffe and Szegedy, `Batch Normalization: Accelerating Deep Network Training by
        Reducing Internal Covariate Shift <https://arxiv.org/abs/1502.03167>`_, 2015
    """
    rules: dict[str, tuple[str, Any]] = {}
    for prefix, sub in module.named_modules():
        if not isinstance(sub, nn.modules.batchnorm._BatchNorm) or not sub.track_running_stats:
            continue
        name = f"{prefix}." if prefix else ""
        momentum = sub.momentum
        if momentum is None:
            raise FuncaccumError(
                f"batch norm {prefix!r} has momentum=None (a cumulative mean), whose factor "
                "it reads from num_batches_tracked as a Python number, which vmap cannot "
                "batch: use strategy=scan(), or give the layer a momentum"
            )
        rules[f"{name}running_mean"] = rules[f"{name}running_var"] = ("ema", momentum)
        rules[f"{name}num_batches_tracked"] = ("count", None)
    unknown = [name for name, _ in module.named_buffers() if name not in rules]
    if unknown:
        raise FuncaccumError(
            f"running_stats knows batch norm's running statistics only; {unknown[:3]} "
            "are other buffers, whose update has no known closed form: use strategy=scan(), "
            "or pass your own combine(old, stacked) as model_state="
        )

    def combine(
        old: dict[str, torch.Tensor], stacked: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        if set(old) != set(rules):
            raise FuncaccumError(
                f"running_stats({type(module).__name__}) combines the buffers "
                f"{sorted(rules)[:3]}..., got a model state with {sorted(old)[:3]}..."
            )
        state = {}
        for name, (kind, detail) in rules.items():
            if kind == "count":
                state[name] = old[name] + (stacked[name] - old[name]).sum(0)
            else:
                state[name] = _ema(old[name], stacked[name], detail)
        return state

    return combine
