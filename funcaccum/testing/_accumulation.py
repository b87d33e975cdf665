"""Checking that accumulation over microbatches gives a loss's full-batch gradient."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optree
import torch
from torch.func import grad_and_value

from .. import tree
from .._accumulate import accumulate
from .._folder import LossFn
from .._microbatch import as_batch, split_microbatches
from .._strategy import Strategy, chunked, vmap
from .._tree import PyTree

__all__ = ["assert_accumulation_exact"]


def _norm(t: PyTree) -> float:
    return float(tree.global_norm(t))


def _relative_error(got: PyTree, want: PyTree) -> float:
    return _norm(tree.sub(got, want)) / max(_norm(want), 1e-300)


def _value_grad_weight(loss_fn: LossFn, params: PyTree, batch: PyTree, has_weight: bool) -> tuple:
    def loss_and_weight(p: PyTree) -> tuple[torch.Tensor, Any]:
        out = loss_fn(p, batch)
        loss, weight = out if has_weight else (out, optree.tree_leaves(batch)[0].shape[0])
        return loss, torch.as_tensor(weight, dtype=torch.float64).detach()

    grads, (loss, weight) = grad_and_value(loss_and_weight, has_aux=True)(params)
    return loss.detach(), grads, float(weight)


def _diagnose(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    split: dict[str, Any],
    has_weight: bool,
    precision: torch.dtype,
) -> str:
    """Why a loss's microbatch gradients do not combine into its full-batch gradient."""
    first, second = (loss_fn(params, batch) for _ in range(2))
    first, second = (first[0], second[0]) if has_weight else (first, second)
    if not torch.equal(first, second):
        return (
            "loss_fn is not deterministic: two evaluations on the same batch gave "
            f"{first.item():.10g} and {second.item():.10g}. It draws random numbers (dropout?), so "
            "randomness differs between microbatches and the full batch: each sees other masks, "
            "and no split can reproduce the full-batch gradient. Check exactness with the "
            "randomness switched off (model.eval(), or a fixed mask)."
        )
    groups = split_microbatches(batch, **split)
    a = optree.tree_map(lambda x: x[0], groups[0].batch)
    b = optree.tree_map(lambda x: x[-1], groups[-1].batch)
    if len(groups) == 1 and groups[0].count == 1:
        return (
            "there is a single microbatch, yet the results differ: check the loss for side effects"
        )
    merged = optree.tree_map(lambda x, y: torch.cat([x, y]), a, b)
    _, grad_a, weight_a = _value_grad_weight(loss_fn, params, a, has_weight)
    _, grad_b, weight_b = _value_grad_weight(loss_fn, params, b, has_weight)
    _, grad_m, _ = _value_grad_weight(loss_fn, params, merged, has_weight)
    # Least squares: grad_m ~ ca * grad_a + cb * grad_b.
    gram = torch.tensor(
        [[tree.vdot(grad_a, grad_a), tree.vdot(grad_a, grad_b)],
         [tree.vdot(grad_b, grad_a), tree.vdot(grad_b, grad_b)]],
        dtype=torch.float64,
    )  # fmt: skip
    rhs = torch.tensor([tree.vdot(grad_a, grad_m), tree.vdot(grad_b, grad_m)], dtype=torch.float64)
    ca, cb = torch.linalg.lstsq(gram, rhs).solution.tolist()
    fitted = tree.add(tree.scale(grad_a, ca), tree.scale(grad_b, cb))
    residual = _relative_error(fitted, grad_m)
    share = weight_a / (weight_a + weight_b)
    if residual > 1e-6:
        return (
            "the model couples the examples of a microbatch (batch norm in training mode, or "
            "another op across the batch dimension): the gradient of two microbatches merged is "
            "not a weighted combination of their own gradients (relative residual "
            f"{residual:.2e}). Put batch norm in eval mode, or use a per-example norm "
            "(LayerNorm, GroupNorm)."
        )
    close = _SAME_SHARE[precision]
    if abs(ca - share) <= close and abs(cb - (1 - share)) <= close:
        return (
            "none that the two-microbatch test finds: merging two microbatches weights their "
            f"gradients {ca:.6f} : {cb:.6f}, as accumulation does ({share:.6f} : "
            f"{1 - share:.6f}), so the loss combines exactly and the difference is rounding. "
            f"The loss computes in {precision} (its value's dtype, or its params'): pass a "
            "looser rtol, or compute the loss in float64 to check it to float64 rounding."
        )
    if abs(ca + cb - 1) > 1e-6:
        return (
            f"loss_fn sums over its microbatch instead of averaging: the merged gradient is "
            f"{ca:.4g} * g_a + {cb:.4g} * g_b, coefficients that should add up to 1. Return the "
            "mean over the microbatch (and its weight, with has_weight=True, if it is not the "
            "number of examples)."
        )
    return (
        "loss_fn normalises each microbatch by its own count, which the accumulation does not "
        f"know: merging two microbatches weights their gradients {ca:.4f} : {cb:.4f}, while "
        f"accumulation weighted them {share:.4f} : {1 - share:.4f}"
        f"{' (their example counts)' if not has_weight else ''}. Return that count as the "
        "weight, `return loss, count` with has_weight=True (for a token-mean loss: the "
        "number of valid tokens)."
    )


# Default tolerances on the gradient's global norm, by the dtype the loss computes in (the
# narrowest of its value's and its params'): accumulation sums the same terms in another order,
# so it agrees with the full batch to that dtype's rounding, not float64's.
_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (1e-5, 1e-8),
    torch.bfloat16: (5e-2, 1e-4),
    torch.float16: (1e-2, 1e-5),
}
_SAME_SHARE: dict[torch.dtype, float] = {
    torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2,
}  # fmt: skip


def _precision(loss: torch.Tensor, params: PyTree) -> torch.dtype:
    """The narrowest floating dtype among the loss's value and the params (float64 at most)."""
    dtypes = [loss.dtype] + [p.dtype for p in optree.tree_leaves(params)]
    known = [d for d in dtypes if d in _TOLERANCES]
    return max(known, key=lambda d: torch.finfo(d).eps) if known else torch.float64


# The shorthands this check accepts: dropout draws independently, as a sequential loop does.
_CHECKED: dict[Any, Strategy] = {
    "vmap": vmap(randomness="different"),
    "chunked": chunked(2, randomness="different"),
}


def assert_accumulation_exact(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    num_microbatches: int | None = None,
    microbatch_size: int | None = None,
    strategies: Sequence[Strategy | str] = ("vmap", "scan", "chunked"),
    has_weight: bool = False,
    dtype: torch.dtype | None = torch.float64,
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    """Assert that accumulating ``loss_fn`` over microbatches gives its full-batch gradient.

    For each strategy, :func:`funcaccum.accumulate` with the :func:`funcaccum.mean`
    reducer must reproduce ``torch.func.grad(loss_fn)(params, batch)`` (in
    float64 by default: params and floating batch leaves are cast). When it
    does not, the message says why, from the loss's behaviour on two
    microbatches and their union:

    - the loss is not deterministic: randomness (dropout) differs between microbatches;
    - the merged gradient is a weighted combination of the parts' gradients,
      but with other weights: the loss normalises per microbatch (a token
      mean) and should return its weight;
    - the coefficients do not add up to one: the loss sums instead of averaging;
    - no combination fits: the model couples examples (batch norm in training mode).

    Args:
        loss_fn: ``loss_fn(params, batch)``, as for :func:`funcaccum.accumulate`.
        params: the parameter pytree.
        batch: the batch pytree.
        num_microbatches: the split to check (default: 3 microbatches, or
            fewer for a smaller batch).
        microbatch_size: or this.
        strategies: the strategies to check: :class:`~funcaccum.Strategy`
            objects, or ``"vmap"`` (random draws differ per microbatch),
            ``"scan"`` and ``"chunked"`` (chunks of 2).
        has_weight: ``loss_fn`` returns ``(loss, weight)``.
        dtype: cast params and floating batch leaves to this (None: as they are).
        rtol: relative tolerance on the gradient's global norm; None follows
            the dtype the loss computes in, the narrowest of its value's and
            its params' (float64: 1e-9; float32: 1e-5, as for a Hugging Face
            ``labels=`` loss, which casts its logits to float32; bfloat16: 5e-2).
        atol: absolute tolerance; None follows the dtype too (float64: 1e-12).

    Raises:
        AssertionError: the accumulated gradient differs; the message gives
            the strategy, the relative error, and the likely cause.

    Example:
        >>> def token_mean(params, batch):                 # normalises by its own tokens
        ...     losses = (batch["x"] @ params["w"] - batch["y"]) ** 2  # (m, t)
        ...     return (losses * batch["mask"]).sum() / batch["mask"].sum()
        >>> g = torch.Generator().manual_seed(0)
        >>> batch = {"x": torch.randn(6, 4, 3, generator=g), "y": torch.randn(6, 4, generator=g),
        ...          "mask": torch.arange(4) < torch.tensor([4, 4, 1, 2, 3, 1])[:, None]}
        >>> params = {"w": torch.randn(3, generator=g)}
        >>> assert_accumulation_exact(token_mean, params, batch, num_microbatches=3)
        Traceback (most recent call last):
        ...
        AssertionError: ... loss_fn normalises each microbatch by its own count...
    """
    batch = as_batch(batch)
    if dtype is not None:
        params = tree.cast(params, dtype)
        batch = tree.cast(batch, dtype)
    if num_microbatches is None and microbatch_size is None:
        num_microbatches = min(3, optree.tree_leaves(batch)[0].shape[0])
    split: dict[str, Any] = {
        "num_microbatches": num_microbatches,
        "microbatch_size": microbatch_size,
    }
    full_loss, full, _ = _value_grad_weight(loss_fn, params, batch, has_weight)
    precision = _precision(full_loss, params)
    rtol = _TOLERANCES[precision][0] if rtol is None else rtol
    atol = _TOLERANCES[precision][1] if atol is None else atol
    failures = []
    for strategy in strategies:
        result = accumulate(
            loss_fn, params, batch, **split,
            strategy=_CHECKED.get(strategy, strategy) if isinstance(strategy, str) else strategy,
            has_weight=has_weight,
        )  # fmt: skip
        error = _relative_error(result.grads, full)
        if not _norm(tree.sub(result.grads, full)) <= atol + rtol * _norm(full):
            failures.append(f"{strategy}: relative error {error:.3e}")
    if failures:
        raise AssertionError(
            f"the accumulated gradient differs from the full-batch gradient ({'; '.join(failures)}"
            f"; allowed rtol={rtol:g}, atol={atol:g}). Likely cause: "
            + _diagnose(loss_fn, params, batch, split, has_weight, precision)
        )
