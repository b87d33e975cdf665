"""From an ``nn.Module`` to a pure function of parameter and buffer pytrees."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ._errors import FuncaccumError
from ._validate import describe

__all__ = ["functional_model"]

Apply = Callable[..., Any]


def _batch_norms_in_training(module: nn.Module) -> list[str]:
    return [
        name or type(module).__name__
        for name, sub in module.named_modules()
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training
    ]


def _check_module(module: object) -> None:
    if isinstance(module, type):
        raise FuncaccumError(
            f"functional_model needs a module instance, got the class {module.__name__}: "
            f"make one first, functional_model({module.__name__}(...))"
        )
    if not isinstance(module, nn.Module):
        hint = (
            ": a plain function has no parameters; write the loss as loss_fn(params, batch) "
            "and give the params to accumulate or train_step directly"
            if callable(module)
            else ""
        )
        raise FuncaccumError(
            f"functional_model needs a torch.nn.Module, got {describe(module)}{hint}"
        )
    if not any(p.requires_grad for p in module.parameters()):
        # torch.optim refuses an empty parameter list; training nothing is a mistake here too.
        raise FuncaccumError(
            f"the {type(module).__name__} has no trainable parameters (none with "
            "requires_grad=True), so there is nothing to train"
        )


def functional_model(
    module: nn.Module,
) -> tuple[Apply, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a module into a pure ``apply`` and its ``params`` and ``buffers`` pytrees.

    ``apply(params, buffers, *args, **kwargs)`` runs ``module.forward`` through
    :func:`torch.func.functional_call`, so a loss can be a pure function
    ``loss_fn(params, batch)`` that closes over ``apply`` and ``buffers``.

    ``params`` holds the trainable parameters (``requires_grad=True``), detached:
    they share storage with the module, as in the :mod:`torch.func` examples, and
    funcaccum never writes into them. Frozen parameters go with the buffers.
    Tied weights appear once.

    Batch norm in training mode normalises each microbatch with its own
    statistics, so the accumulated gradient would not be the full-batch
    gradient, and it writes its running statistics into the buffers. Such a
    module is refused with :class:`FuncaccumError`; call ``module.eval()`` (use
    the running statistics) or use a per-example norm (LayerNorm, GroupNorm).

    Args:
        module: the model.

    Returns:
        ``(apply, params, buffers)``.

    Raises:
        FuncaccumError: ``module`` is not an ``nn.Module`` instance, it has no
            trainable parameters, or a batch-norm layer is in training mode.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> apply, params, buffers = functional_model(model)
        >>> sorted(params)
        ['bias', 'weight']
        >>> x = torch.randn(5, 3)                       # (batch, features)
        >>> apply(params, buffers, x).shape             # (batch, outputs)
        torch.Size([5, 2])
    """
    _check_module(module)
    if names := _batch_norms_in_training(module):
        raise FuncaccumError(
            f"batch norm in training mode at {names}: it mixes the examples of a microbatch, "
            "so accumulating over microbatches would not give the full-batch gradient, and it "
            "writes running statistics into the buffers. Call module.eval() to normalise with "
            "the running statistics, or replace it with a per-example norm (LayerNorm, GroupNorm)."
        )
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in module.named_buffers()}
    buffers |= {n: p.detach() for n, p in module.named_parameters() if not p.requires_grad}

    def apply(
        params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], *args: Any, **kwargs: Any
    ) -> Any:
        return functional_call(
            module, (params, buffers), args, kwargs, tie_weights=True, strict=True
        )

    return apply, params, buffers
