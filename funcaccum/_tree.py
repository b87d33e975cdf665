"""Pytree arithmetic on optree.

A pytree here is any nesting of dicts, lists, tuples and NamedTuples whose leaves
are tensors. **None policy:** ``None`` marks an absent leaf. It is kept in place
and never passed to a function (optree's default, ``none_is_leaf=False``), so a
frozen parameter's ``None`` gradient stays ``None`` through every operation.
Trees combined in one call must have the same structure, ``None`` in the same
places; a mismatch raises optree's ``ValueError`` naming both structures.

Reductions (:func:`tree_global_norm`, :func:`tree_vdot`,
:func:`tree_weighted_sum`) compute in at least float32, so bf16 and fp16 trees
do not lose the sum to rounding.

The elementwise helpers run one ``torch._foreach_*`` call over all leaves
instead of one op per leaf: eagerly that is one dispatch for the whole tree,
and under ``torch.compile`` one graph node, so the traced graph does not grow
with the number of parameter tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import optree
import torch

__all__ = [
    "PyTree",
    "Leaves",
    "accum_dtype",
    "foreach_map",
    "leaf_paths",
    "tree_add",
    "tree_add_weighted",
    "tree_cast",
    "tree_device",
    "tree_global_norm",
    "tree_lerp",
    "tree_scale",
    "tree_select",
    "tree_sub",
    "tree_vdot",
    "tree_weighted_sum",
    "tree_zeros_like",
]

PyTree = Any


def accum_dtype(dtype: torch.dtype, override: torch.dtype | None = None) -> torch.dtype:
    """The dtype sums of ``dtype`` values are kept in: ``override``, else at least float32."""
    return override if override is not None else torch.promote_types(dtype, torch.float32)


def tree_device(tree: PyTree) -> torch.device | None:
    """The device of the first leaf, or None for a tree without leaves."""
    leaves = optree.tree_leaves(tree)
    return leaves[0].device if leaves else None


Scalar = float | torch.Tensor


class Leaves:
    """A list of tensors with elementwise arithmetic, one ``torch._foreach_*`` op per operator.

    :func:`foreach_map` hands these to a function written as for one tensor
    (``lambda m, g: m.mul(b1).add(g.mul(1 - b1))``), so an update rule reads as
    its formula and still runs one op per operator for the whole tree. Numbers
    and 0-d tensors broadcast; under ``vmap`` (no batching rules for foreach
    ops) each op runs leaf by leaf.

    Combine with a tensor through the methods (``m.mul(b1)``), not the
    operators: Dynamo sends ``b1 * m`` down its tensor path and cannot trace
    it. Operators between two ``Leaves``, or with a Python number, are fine.
    """

    __slots__ = ("tensors",)

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors

    def _apply(
        self,
        foreach: Callable[..., list[torch.Tensor]],
        single: Callable[..., torch.Tensor],
        *other: Leaves | Scalar,
    ) -> Leaves:
        lists = [o.tensors if isinstance(o, Leaves) else None for o in other]
        tensors = [self.tensors, *(t for t in lists if t is not None)]
        if any(torch._C._functorch.is_batchedtensor(x) for xs in tensors for x in xs):
            return Leaves([single(x, *_pick(other, lists, i)) for i, x in enumerate(self.tensors)])
        return Leaves(foreach(self.tensors, *_pick(other, lists, None)))

    def add(self, other: Leaves | Scalar) -> Leaves:
        """Elementwise ``self + other``."""
        return self._apply(torch._foreach_add, torch.add, other)

    def mul(self, other: Leaves | Scalar) -> Leaves:
        """Elementwise ``self * other``."""
        return self._apply(torch._foreach_mul, torch.mul, other)

    def sub(self, other: Leaves | Scalar) -> Leaves:
        """Elementwise ``self - other``."""
        if isinstance(other, Leaves):
            return self._apply(torch._foreach_sub, torch.sub, other)
        return self.add(-other)

    def div(self, other: Leaves | Scalar) -> Leaves:
        """Elementwise ``self / other``."""
        return self._apply(torch._foreach_div, torch.div, other)

    def __neg__(self) -> Leaves:
        return self._apply(torch._foreach_neg, torch.neg)

    __add__ = __radd__ = add
    __mul__ = __rmul__ = mul
    __sub__ = sub
    __truediv__ = div

    def __rsub__(self, other: float) -> Leaves:
        return (-self).add(other)

    def sqrt(self) -> Leaves:
        """Elementwise square root."""
        return self._apply(torch._foreach_sqrt, torch.sqrt)

    def sign(self) -> Leaves:
        """Elementwise sign."""
        return self._apply(torch._foreach_sign, torch.sign)

    def to_dtypes_of(self, other: Leaves) -> Leaves:
        """Each tensor cast to the dtype of its counterpart in ``other`` (no copy if equal)."""
        return Leaves([x.to(y.dtype) for x, y in zip(self.tensors, other.tensors, strict=True)])


def _pick(other: tuple[Any, ...], lists: list[Any], i: int | None) -> list[Any]:
    """Operands for leaf ``i`` (whole lists for ``i=None``); scalars pass as they are."""
    pairs = zip(other, lists, strict=True)
    return [o if t is None else (t if i is None else t[i]) for o, t in pairs]


def foreach_map(fn: Callable[..., Leaves], tree: PyTree, *rest: PyTree) -> PyTree:
    """``fn`` applied to the leaves of trees shaped like ``tree``, all leaves at once.

    ``fn`` receives one :class:`Leaves` per tree and returns one; write it as
    for single tensors, with methods (``.mul``, ``.add``, ``.sqrt()``, ...).

    >>> foreach_map(lambda m, g: m.mul(0.5) + g, {"a": torch.ones(2)}, {"a": torch.ones(2)})
    {'a': tensor([1.5000, 1.5000])}
    """
    leaves, treedef = optree.tree_flatten(tree)
    if not leaves:
        return tree
    others = [Leaves(treedef.flatten_up_to(other)) for other in rest]
    return optree.tree_unflatten(treedef, fn(Leaves(leaves), *others).tensors)


def tree_add(*trees: PyTree) -> PyTree:
    """Leafwise sum of one or more trees of the same structure.

    >>> tree_add({"w": torch.ones(2)}, {"w": torch.ones(2)})
    {'w': tensor([2., 2.])}
    """
    return foreach_map(lambda *xs: sum(xs[1:], xs[0]), *trees)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    """Leafwise ``a - b``.

    >>> tree_sub({"w": torch.ones(2)}, {"w": torch.tensor([0.5, 2.0])})
    {'w': tensor([ 0.5000, -1.0000])}
    """
    return foreach_map(lambda x, y: x - y, a, b)


def tree_scale(tree: PyTree, factor: float | torch.Tensor) -> PyTree:
    """Every leaf multiplied by ``factor`` (a number or a 0-d tensor), in the leaf's dtype.

    >>> tree_scale([torch.ones(2), None], 0.5)
    [tensor([0.5000, 0.5000]), None]
    """
    return foreach_map(lambda x: x.mul(factor), tree)


def tree_zeros_like(tree: PyTree, *, dtype: torch.dtype | None = None) -> PyTree:
    """Fresh zero tensors shaped like the leaves; ``dtype`` overrides each leaf's dtype.

    >>> tree_zeros_like({"w": torch.ones(2, dtype=torch.bfloat16)}, dtype=torch.float32)
    {'w': tensor([0., 0.])}
    """
    return optree.tree_map(lambda x: torch.zeros_like(x, dtype=dtype), tree)


def tree_cast(tree: PyTree, dtype: torch.dtype | None) -> PyTree:
    """Floating leaves cast to ``dtype``; other leaves (all, if ``dtype`` is None) unchanged."""
    if dtype is None:
        return tree
    return optree.tree_map(lambda x: x.to(dtype) if x.is_floating_point() else x, tree)


def _sum_over_leaves(values: list[torch.Tensor]) -> torch.Tensor:
    return sum(values[1:], values[0]) if values else torch.zeros(())


def tree_vdot(a: PyTree, b: PyTree) -> torch.Tensor:
    """Sum over all leaves of the elementwise products, a 0-d tensor in at least float32.

    >>> tree_vdot({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])})
    tensor(11.)
    """
    products = optree.tree_map(
        lambda x, y: torch.sum(x.to(accum_dtype(x.dtype)) * y.to(accum_dtype(y.dtype))), a, b
    )
    return _sum_over_leaves(optree.tree_leaves(products))


def tree_global_norm(tree: PyTree) -> torch.Tensor:
    """Global L2 norm: the norm of all leaves concatenated, a 0-d tensor in at least float32.

    >>> tree_global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])})
    tensor(5.)
    """
    leaves = optree.tree_leaves(tree)
    if any(torch._C._functorch.is_batchedtensor(x) for x in leaves):  # no foreach under vmap
        return torch.sqrt(tree_vdot(tree, tree))
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for leaf in leaves:
        by_dtype.setdefault(accum_dtype(leaf.dtype), []).append(leaf)
    if not by_dtype:
        return torch.zeros(())
    dtype = functools.reduce(torch.promote_types, by_dtype)
    # One foreach norm per dtype (each leaf reduced in at least float32), then the norm of norms.
    norms = [
        norm.to(dtype)
        for acc, leaves in by_dtype.items()
        for norm in torch._foreach_norm(leaves, 2, dtype=acc)
    ]
    return torch.linalg.vector_norm(torch.stack(norms))


def tree_weighted_sum(
    tree: PyTree, weights: torch.Tensor, *, dtype: torch.dtype | None = None
) -> PyTree:
    """``sum_i weights[i] * leaf[i]`` over the leading axis of every leaf.

    Sums in ``dtype`` (default: at least float32), as one matrix-vector
    product per leaf.

    Args:
        tree: leaves shaped ``(k, ...)``.
        weights: shape ``(k,)``.
        dtype: the summation dtype.

    Returns:
        A tree of leaves shaped ``(...)``.

    >>> g = {"w": torch.tensor([[1.0, 1.0], [3.0, 2.0]])}         # (k=2, d=2)
    >>> tree_weighted_sum(g, torch.tensor([2.0, 0.5]))
    {'w': tensor([3.5000, 3.0000])}
    """

    def weighted(x: torch.Tensor) -> torch.Tensor:
        acc = accum_dtype(x.dtype, dtype)
        return torch.tensordot(weights.to(acc), x.to(acc), dims=1)

    return optree.tree_map(weighted, tree)


def tree_add_weighted(acc: PyTree, tree: PyTree, weights: torch.Tensor) -> PyTree:
    """``acc + sum_i weights[i] * tree[i]``, in ``acc``'s dtypes, for accumulators.

    A 0-d ``weights`` adds one tree scaled by it; a ``(k,)`` ``weights`` adds
    the weighted sum of a stacked chunk whose leaves are shaped ``(k, ...)``.

    >>> tree_add_weighted({"w": torch.ones(2)}, {"w": torch.tensor([1.0, 2.0])}, torch.tensor(3.0))
    {'w': tensor([4., 7.])}
    """
    if weights.ndim == 0:
        return foreach_map(lambda a, x: a + x.to_dtypes_of(a).mul(weights), acc, tree)
    return optree.tree_map(
        lambda a, x: a + torch.tensordot(weights.to(a.dtype), x.to(a.dtype), dims=1), acc, tree
    )


def tree_lerp(start: PyTree, end: PyTree, weight: float | torch.Tensor) -> PyTree:
    """``start + weight * (end - start)``, leafwise: one step of an exponential moving average.

    Weight averaging is ``average = tree_lerp(average, params, 1 - decay)``
    after each optimizer step.

    >>> tree_lerp({"w": torch.zeros(2)}, {"w": torch.ones(2)}, 0.25)
    {'w': tensor([0.2500, 0.2500])}
    """
    return foreach_map(lambda a, b: a + (b - a).mul(weight), start, end)


def tree_select(pred: torch.Tensor, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Leafwise ``torch.where(pred, on_true, on_false)`` for a boolean 0-d ``pred``.

    The result is bit-identical to the chosen tree, so a rejected update leaves
    state exactly as it was.

    >>> tree_select(torch.tensor(False), [torch.ones(1)], [torch.zeros(1)])
    [tensor([0.])]
    """
    return optree.tree_map(lambda a, b: torch.where(pred, a, b), on_true, on_false)


def leaf_paths(tree: PyTree, root: str) -> list[tuple[str, Any]]:
    """``(path, leaf)`` pairs, each path written as code (``batch['x'][0]``), for error messages."""
    accessors, leaves, _ = optree.tree_flatten_with_accessor(tree, none_is_leaf=False)
    return [(a.codify(root), leaf) for a, leaf in zip(accessors, leaves, strict=True)]
