"""Finite-difference checks of torch.func derivatives for pure functions of pytrees."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch
from torch.func import jvp, vjp

from .. import tree
from .._errors import FuncaccumError
from .._tree import PyTree

__all__ = ["check_grads"]


def _random_like(like: PyTree, generator: torch.Generator) -> PyTree:
    """A random direction shaped like ``like``, of unit global norm."""
    direction = optree.tree_map(
        lambda x: torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device), like
    )
    return tree.scale(direction, 1 / tree.global_norm(direction))


def _close(name: str, got: PyTree, want: PyTree, rtol: float, atol: float) -> None:
    error, scale = tree.global_norm(tree.sub(got, want)), tree.global_norm(want)
    if not error <= atol + rtol * scale:
        raise AssertionError(
            f"{name}: torch.func and central finite differences disagree: "
            f"|difference| = {error.item():.3e}, |finite difference| = {scale.item():.3e}, "
            f"allowed {atol:.1e} + {rtol:.1e} * |finite difference|"
        )


def _check_first_order(
    f: Callable[[PyTree], PyTree],
    params: PyTree,
    generator: torch.Generator,
    *,
    eps: float,
    rtol: float,
    atol: float,
    label: str,
) -> None:
    tangent = _random_like(params, generator)
    plus = f(tree.add(params, tree.scale(tangent, eps)))
    minus = f(tree.sub(params, tree.scale(tangent, eps)))
    numeric = tree.scale(tree.sub(plus, minus), 1 / (2 * eps))
    output, directional = jvp(f, (params,), (tangent,))[:2]
    _close(f"{label} JVP", directional, numeric, rtol, atol)
    # VJP through the dot-product test: <J^T u, v> must equal <u, J v>.
    cotangent = _random_like(output, generator)
    (pulled,) = vjp(f, params)[1](cotangent)
    _close(f"{label} VJP", tree.vdot(pulled, tangent), tree.vdot(cotangent, numeric), rtol, atol)


def check_grads(
    f: Callable[..., Any],
    params: PyTree,
    *args: Any,
    order: int = 1,
    eps: float = 1e-6,
    rtol: float = 1e-6,
    atol: float = 1e-9,
    seed: int = 0,
) -> None:
    """Check ``f``'s derivatives in ``params`` against central finite differences.

    In float64 (params and floating ``args`` are cast), along a random unit
    direction ``v``: the JVP ``J v`` from :func:`torch.func.jvp` must match
    ``(f(p + eps v) - f(p - eps v)) / (2 eps)``, and the VJP from
    :func:`torch.func.vjp` must pass the dot-product test
    ``<J^T u, v> == <u, J v>`` for a random cotangent ``u``. With ``order=2``
    the same checks run on the VJP itself: its JVP is a Hessian-vector
    product (forward-over-reverse, what ``torch.func.hessian`` and
    grad-of-grad methods compute) and its VJP reverse-over-reverse.

    Forward-over-forward (the JVP of the JVP) is not checked: torch's
    forward-mode derivative of some ops' forward-mode derivative is wrong
    while their reverse-mode one is right. For ``layer_norm`` (torch 2.13)
    ``jvp(jvp(f))`` gave 0.03338 where finite differences, the
    forward-over-reverse product and the same function written with plain
    ops all give 0.03585; a check that used it would blame every loss with
    a LayerNorm for torch's error.

    Args:
        f: a pure function ``f(params, *args)`` returning a tensor or pytree of tensors.
        params: the pytree to differentiate in.
        *args: further inputs, held fixed.
        order: 1 or 2.
        eps: the finite-difference step.
        rtol: relative tolerance, on the global norm of the difference.
        atol: absolute tolerance.
        seed: seeds the random directions.

    Raises:
        AssertionError: naming which check failed (JVP or VJP, which order)
            and by how much.
        FuncaccumError: ``order`` other than 1 or 2.

    Example:
        >>> def loss(params, x):
        ...     return torch.tanh(x @ params["w"]).pow(2).mean()
        >>> params, x = {"w": torch.randn(3, 2)}, torch.randn(5, 3)
        >>> check_grads(loss, params, x, order=2)
        >>> def broken(params, x):                      # .detach() silently cuts the gradient
        ...     return torch.tanh(x @ params["w"].detach()).pow(2).mean()
        >>> check_grads(broken, params, x)
        Traceback (most recent call last):
        ...
        AssertionError: order 1 JVP: torch.func and central finite differences disagree: ...
    """
    if order not in (1, 2) or isinstance(order, bool):
        raise FuncaccumError(f"order must be 1 or 2, got {order!r}")
    generator = torch.Generator().manual_seed(seed)
    params = tree.cast(params, torch.float64)
    args = optree.tree_map(
        lambda a: a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a,
        args,
        none_is_leaf=True,
    )

    def g(p: PyTree) -> PyTree:
        return f(p, *args)

    tolerances = {"eps": eps, "rtol": rtol, "atol": atol}
    _check_first_order(g, params, generator, label="order 1", **tolerances)
    if order == 2:
        cotangent = _random_like(g(params), generator)

        def pulled_back(p: PyTree) -> PyTree:
            return vjp(g, p)[1](cotangent)[0]

        # Second differences lose more to rounding: a larger step suits them.
        second = {**tolerances, "eps": max(eps, 1e-4), "rtol": max(rtol, 1e-5)}
        _check_first_order(pulled_back, params, generator, label="order 2 (of the VJP)", **second)
