"""Pytree arithmetic: ``funcaccum.tree.add(a, b)``, as ``optax.tree`` is to optax.

A pytree here is any nesting of dicts, lists, tuples and NamedTuples whose leaves
are tensors, handled by optree. **None policy:** ``None`` marks an absent leaf.
It is kept in place and never passed to a function (optree's default,
``none_is_leaf=False``), so a frozen parameter's ``None`` gradient stays
``None`` through every operation. Trees combined in one call must have the
same structure, ``None`` in the same places; a mismatch raises optree's
``ValueError`` naming both structures.

Reductions (:func:`global_norm`, :func:`vdot`, :func:`weighted_sum`) compute
in at least float32, so bf16 and fp16 trees do not lose the sum to rounding.
Over DTensor leaves (a sharded model's params, gradients and moments) the
elementwise functions run on each rank's shard without communication, and
:func:`global_norm` and :func:`vdot` return a plain 0-d tensor, the same on
every rank, for one scalar all-reduce.

The elementwise functions run one ``torch._foreach_*`` call over all leaves
instead of one op per leaf: eagerly that is one dispatch for the whole tree,
and under ``torch.compile`` one graph node, so the traced graph does not grow
with the number of parameter tensors.

Example:
    >>> from funcaccum import tree
    >>> g = torch.Generator().manual_seed(0)
    >>> params = {"w": torch.randn(3, 2, generator=g), "frozen": None}  # w: (3, 2)
    >>> average = tree.zeros_like(params)
    >>> average = tree.lerp(average, params, 0.5)                       # an EMA step
    >>> torch.equal(tree.sub(params, average)["w"], average["w"]), average["frozen"]
    (True, None)
"""

from __future__ import annotations

import functools

import optree
import torch

from ._tree import (
    PyTree,
    Tree,
    accum_dtype,
    foreach_map,
    leaf_norms,
    replicated_value,
    sum_over_leaves,
)

__all__ = [
    "add",
    "add_weighted",
    "cast",
    "global_norm",
    "lerp",
    "scale",
    "select",
    "sub",
    "vdot",
    "weighted_sum",
    "zeros_like",
]


def add(*trees: Tree) -> Tree:
    """Leafwise sum of one or more trees of the same structure.

    >>> g = torch.Generator().manual_seed(0)
    >>> a = {"w": torch.randn(2, 3, generator=g), "b": None}          # w: (2, 3); b absent
    >>> total = add(a, a, a)
    >>> total["w"].shape, total["b"], torch.equal(total["w"], a["w"] + a["w"] + a["w"])
    (torch.Size([2, 3]), None, True)
    """
    return foreach_map(lambda *xs: sum(xs[1:], xs[0]), *trees)


def sub(a: Tree, b: Tree) -> Tree:
    """Leafwise ``a - b``.

    >>> g = torch.Generator().manual_seed(0)
    >>> a, b = ({"w": torch.randn(2, 3, generator=g)} for _ in range(2))  # w: (2, 3)
    >>> torch.equal(sub(a, b)["w"], a["w"] - b["w"]), torch.count_nonzero(sub(a, a)["w"]).item()
    (True, 0)
    """
    return foreach_map(lambda x, y: x - y, a, b)


def scale(tree: Tree, factor: float | torch.Tensor, *, donate: bool = False) -> Tree:
    """Every leaf multiplied by ``factor`` (a number or a 0-d tensor), in the leaf's dtype.

    With ``donate`` the caller gives ``tree`` up and its tensors are scaled in place.

    >>> g = torch.Generator().manual_seed(0)
    >>> t = [torch.randn(4, generator=g, dtype=torch.bfloat16), None]  # (4,) bf16; an absent leaf
    >>> half = scale(t, 0.5)
    >>> half[0].dtype, half[1], torch.equal(half[0], t[0] / 2)
    (torch.bfloat16, None, True)
    """
    if donate:
        return foreach_map(lambda x: x.mul_(factor), tree, donate=True)
    return foreach_map(lambda x: x.mul(factor), tree)


def zeros_like(tree: Tree, *, dtype: torch.dtype | None = None) -> Tree:
    """Fresh zero tensors shaped like the leaves; ``dtype`` overrides each leaf's dtype.

    >>> g = torch.Generator().manual_seed(0)
    >>> t = {"w": torch.randn(2, 3, generator=g, dtype=torch.bfloat16)}  # (2, 3) bf16
    >>> zeros = zeros_like(t, dtype=torch.float32)
    >>> zeros["w"].shape, zeros["w"].dtype, torch.count_nonzero(zeros["w"]).item()
    (torch.Size([2, 3]), torch.float32, 0)
    """
    return optree.tree_map(lambda x: torch.zeros_like(x, dtype=dtype), tree)


def cast(tree: Tree, dtype: torch.dtype | None) -> Tree:
    """Floating leaves cast to ``dtype``; other leaves (all, if ``dtype`` is None) unchanged.

    >>> g = torch.Generator().manual_seed(0)
    >>> batch = {"x": torch.randn(4, 3, generator=g), "y": torch.randint(2, (4,), generator=g)}
    >>> low = cast(batch, torch.bfloat16)                            # x: (4, 3); y: (4,) labels
    >>> low["x"].dtype, low["y"].dtype, cast(batch, None) is batch
    (torch.bfloat16, torch.int64, True)
    """
    if dtype is None:
        return tree
    return optree.tree_map(lambda x: x.to(dtype) if x.is_floating_point() else x, tree)


def vdot(a: PyTree, b: PyTree) -> torch.Tensor:
    """Sum over all leaves of the elementwise products, a 0-d tensor in at least float32.

    >>> g = torch.Generator().manual_seed(0)
    >>> a = {"w": torch.randn(2, 3, generator=g), "b": torch.randn(3, generator=g)}  # (2, 3), (3,)
    >>> want = (a["w"] * a["w"]).sum() + (a["b"] * a["b"]).sum()
    >>> torch.allclose(vdot(a, a), want), vdot(a, a).shape
    (True, torch.Size([]))
    """
    products = optree.tree_map(
        lambda x, y: torch.sum(x.to(accum_dtype(x.dtype)) * y.to(accum_dtype(y.dtype))), a, b
    )
    return replicated_value(sum_over_leaves(optree.tree_leaves(products)))


def global_norm(tree: PyTree) -> torch.Tensor:
    """Global L2 norm: the norm of all leaves concatenated, a 0-d tensor in at least float32.

    >>> g = torch.Generator().manual_seed(0)
    >>> t = {"w": torch.randn(2, 3, generator=g), "b": torch.randn(3, generator=g)}  # (2, 3), (3,)
    >>> torch.allclose(global_norm(t), torch.cat([t["w"].flatten(), t["b"]]).norm())
    True
    >>> global_norm({"h": torch.full((4096,), 0.01, dtype=torch.bfloat16)}).dtype
    torch.float32
    """
    leaves = optree.tree_leaves(tree)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for leaf in leaves:
        by_dtype.setdefault(accum_dtype(leaf.dtype), []).append(leaf)
    if not by_dtype:
        return torch.zeros(())
    dtype = functools.reduce(torch.promote_types, by_dtype)
    # One foreach norm per dtype (each leaf reduced in at least float32), then the norm of norms.
    norms = [norm.to(dtype) for acc, leaves in by_dtype.items() for norm in leaf_norms(leaves, acc)]
    return replicated_value(torch.linalg.vector_norm(torch.stack(norms)))


def weighted_sum(tree: Tree, weights: torch.Tensor, *, dtype: torch.dtype | None = None) -> Tree:
    """``sum_i weights[i] * leaf[i]`` over the leading axis of every leaf.

    Sums in ``dtype`` (default: at least float32), as one matrix-vector
    product per leaf.

    Args:
        tree: leaves shaped ``(k, ...)``.
        weights: shape ``(k,)``.
        dtype: the summation dtype.

    Returns:
        A tree of leaves shaped ``(...)``.

    >>> g = torch.Generator().manual_seed(0)
    >>> stacked = {"w": torch.randn(4, 2, 3, generator=g)}           # (k=4, 2, 3)
    >>> weights = torch.rand(4, generator=g)                          # (k,)
    >>> total = weighted_sum(stacked, weights)["w"]                    # (2, 3)
    >>> torch.allclose(total, (weights[:, None, None] * stacked["w"]).sum(0))
    True
    """

    def weighted(x: torch.Tensor) -> torch.Tensor:
        acc = accum_dtype(x.dtype, dtype)
        return torch.tensordot(weights.to(acc), x.to(acc), dims=1)

    return optree.tree_map(weighted, tree)


def add_weighted(acc: Tree, tree: PyTree, weights: torch.Tensor, *, donate: bool = False) -> Tree:
    """``acc + sum_i weights[i] * tree[i]``, in ``acc``'s dtypes, for accumulators.

    A 0-d ``weights`` adds one tree scaled by it; a ``(k,)`` ``weights`` adds
    the weighted sum of a stacked chunk whose leaves are shaped ``(k, ...)``.
    With ``donate`` the caller gives ``acc`` up: the sum is written into its
    tensors, sparing a new accumulator per call.

    >>> g = torch.Generator().manual_seed(0)
    >>> acc = {"w": torch.zeros(3, dtype=torch.float64)}              # (3,) float64
    >>> chunk = {"w": torch.randn(2, 3, generator=g)}                 # (k=2, 3) float32
    >>> acc = add_weighted(acc, chunk, torch.tensor([1.0, 1.0]))      # a chunk of two
    >>> acc = add_weighted(acc, {"w": chunk["w"][0]}, torch.tensor(-1.0))  # one, weighted -1
    >>> acc["w"].dtype, torch.allclose(acc["w"], chunk["w"][1].double())
    (torch.float64, True)
    """
    if weights.ndim == 0:
        # One fused op per leaf: the fold runs it for every microbatch.
        if donate:  # the foreach op sums a narrower tensor into a wider one without a copy
            return foreach_map(lambda a, x: a.addmul_(x, weights), acc, tree, donate=True)
        return foreach_map(lambda a, x: a.addmul(x.to_dtypes_of(a), weights), acc, tree)

    def chunk(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        total = torch.tensordot(weights.to(a.dtype), x.to(a.dtype), dims=1)
        return a.add_(total) if donate else a + total

    return optree.tree_map(chunk, acc, tree)


def lerp(start: Tree, end: Tree, weight: float | torch.Tensor) -> Tree:
    """``start + weight * (end - start)``, leafwise: one step of an exponential moving average.

    Weight averaging is ``average = tree.lerp(average, params, 1 - decay)``
    after each optimizer step.

    >>> g = torch.Generator().manual_seed(0)
    >>> average, params = {"w": torch.zeros(2, 3)}, {"w": torch.randn(2, 3, generator=g)}  # (2, 3)
    >>> torch.allclose(lerp(average, params, 0.25)["w"], 0.25 * params["w"])
    True
    """
    return foreach_map(lambda a, b: a + (b - a).mul(weight), start, end)


def select(pred: torch.Tensor, on_true: Tree, on_false: Tree) -> Tree:
    """Leafwise ``torch.where(pred, on_true, on_false)`` for a boolean 0-d ``pred``.

    The result is bit-identical to the chosen tree, so a rejected update leaves
    state exactly as it was. Eagerly, with ``pred`` on the CPU, reading it costs
    no device synchronisation, so the chosen tree is returned as it is: no
    ``where`` per leaf, and no copy (each ``where`` on a sharded DTensor leaf
    costs a dispatch of its own).

    >>> g = torch.Generator().manual_seed(0)
    >>> new, old = ({"w": torch.randn(2, 3, generator=g)} for _ in range(2))  # w: (2, 3)
    >>> finite = torch.isfinite(global_norm(new))                    # 0-d bool
    >>> torch.equal(select(finite, new, old)["w"], new["w"])
    True
    >>> torch.equal(select(~finite, new, old)["w"], old["w"])
    True
    """
    if (
        not torch.compiler.is_compiling()
        and pred.device.type == "cpu"
        and not torch._C._functorch.is_functorch_wrapped_tensor(pred)
    ):
        return on_true if bool(pred) else on_false
    return optree.tree_map(lambda a, b: torch.where(pred, a, b), on_true, on_false)
