"""The private machinery behind :mod:`funcaccum.tree`: foreach arithmetic, dtypes, norms.

The public pytree functions and their None policy are in :mod:`funcaccum.tree`;
what is here serves reducers, update rules and error messages.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias, TypeVar

import optree
import torch

__all__ = [
    "PyTree",
    "Leaves",
    "accum_dtype",
    "accumulator_like",
    "foreach_map",
    "leaf_norms",
    "leaf_paths",
    "replicated_value",
    "sum_over_leaves",
    "tree_device",
    "unit_squared_norms",
]

PyTree: TypeAlias = torch.Tensor | tuple[Any, ...] | list[Any] | Mapping[Any, Any] | None
"""A nesting of tuples (NamedTuples included), lists and dicts with tensors at the leaves;
None marks an absent leaf. Typed one level deep: the checker refuses a number, an array or a
module where a tree belongs."""


def accum_dtype(dtype: torch.dtype, override: torch.dtype | None = None) -> torch.dtype:
    """The dtype sums of ``dtype`` values are kept in: ``override``, else at least float32."""
    return override if override is not None else torch.promote_types(dtype, torch.float32)


def accumulator_like(params: PyTree, override: torch.dtype | None = None) -> PyTree:
    """Zeros shaped like ``params``, each in its accumulation dtype (at least float32)."""
    return optree.tree_map(
        lambda x: torch.zeros_like(x, dtype=accum_dtype(x.dtype, override)), params
    )


def sum_over_leaves(values: list[torch.Tensor]) -> torch.Tensor:
    """``values[0] + values[1] + ...`` in that order; a 0-d zero for none."""
    return sum(values[1:], values[0]) if values else torch.zeros(())


def replicated_value(x: torch.Tensor) -> torch.Tensor:
    """A reduction over DTensor leaves (a norm, a dot product) as a plain tensor; others unchanged.

    Over sharded leaves a reduction comes back a DTensor, replicated or a
    pending sum (``Partial``); its full value costs at most one all-reduce,
    and as a plain tensor it mixes with the step's other scalars (counts,
    flags), as one process's would.
    """
    if torch.compiler.is_compiling():  # no DTensor reaches a compiled step
        return x
    dtensor = sys.modules.get("torch.distributed.tensor")  # none exists before it is imported
    if dtensor is not None and isinstance(x, dtensor.DTensor):
        return x.full_tensor()
    return x


def unit_squared_norms(
    grads: PyTree, *, dtype: torch.dtype | None = None, sum_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Each stacked unit's squared global L2 norm: leaves ``(c, ...)`` give a ``(c,)`` tensor.

    Every leaf is squared in ``accum_dtype(leaf.dtype, dtype)`` (at least
    float32) and its squares summed in ``sum_dtype`` (default the same);
    the leaves' sums are then added in order. Pass one tensor for one leaf's
    squared norms. :func:`~funcaccum.clipped_mean` clips by these,
    :func:`~funcaccum.ghost` adds them for the layers whose per-unit gradients
    it forms, and :func:`~funcaccum.adaptive` keeps them per leaf in float64.

    >>> g = torch.Generator().manual_seed(0)
    >>> grads = {"w": torch.randn(4, 3, 2, generator=g, dtype=torch.bfloat16)}  # (c=4, 3, 2)
    >>> squares = unit_squared_norms(grads)                                     # (c,)
    >>> squares.shape, squares.dtype
    (torch.Size([4]), torch.float32)
    >>> torch.allclose(squares, grads["w"].float().flatten(1).norm(dim=1) ** 2)
    True
    """
    squares = [
        torch.sum(
            torch.square(g.reshape(g.shape[0], -1).to(accum_dtype(g.dtype, dtype))),
            dim=1,
            dtype=sum_dtype,
        )
        for g in optree.tree_leaves(grads)
    ]
    return sum_over_leaves(squares)


def leaf_norms(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Each tensor's L2 norm, computed in ``dtype``: one foreach op, or per tensor under vmap."""
    if any(torch._C._functorch.is_batchedtensor(x) for x in tensors):  # no foreach rule
        return [torch.linalg.vector_norm(x, dtype=dtype) for x in tensors]
    return list(torch._foreach_norm(tensors, 2, dtype=dtype))


def _per_tensor(lists: list[list[torch.Tensor]]) -> bool:
    """Whether elementwise ops run leaf by leaf: see :class:`Leaves`."""
    if torch.compiler.is_compiling():
        return True
    return any(torch._C._functorch.is_batchedtensor(x) for xs in lists for x in xs)


def tree_device(tree: PyTree) -> torch.device | None:
    """The device of the first leaf, or None for a tree without leaves."""
    leaves = optree.tree_leaves(tree)
    return leaves[0].device if leaves else None


Tree = TypeVar("Tree", bound=PyTree)

Scalar = float | torch.Tensor


class Leaves:
    """A list of tensors with elementwise arithmetic, one ``torch._foreach_*`` op per operator.

    :func:`foreach_map` hands these to a function written as for one tensor
    (``lambda m, g: m.mul(b1).add(g.mul(1 - b1))``), so an update rule reads as
    its formula and still runs one op per operator for the whole tree. Numbers
    and 0-d tensors broadcast; under ``vmap`` (no batching rules for foreach
    ops) and while compiling each op runs leaf by leaf: inductor fuses those
    the same, and its foreach lowerings round a 0-d float64 operand computed
    in the graph to float32 (``_foreach_add``, ``_foreach_lerp``, ...: torch
    2.13), which a float64 run must not see.

    Combine with a tensor through the methods (``m.mul(b1)``), not the
    operators: Dynamo sends ``b1 * m`` down its tensor path and cannot trace
    it. Operators between two ``Leaves``, or with a Python number, are fine.

    The result of an operation is *fresh*: new tensors that nothing else
    holds. The methods ending in ``_`` (``mul_``, ``add_``, ...) overwrite a
    fresh ``Leaves`` in place, sparing a pass and an allocation, and refuse
    one that wraps a caller's tensors, so a rule cannot write into its inputs.
    """

    __slots__ = ("_scalars", "fresh", "tensors")

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        scalars: tuple[int, ...] | None = None,
        *,
        fresh: bool = False,
    ) -> None:
        self.tensors = list(tensors)
        self._scalars = scalars
        self.fresh = fresh

    @property
    def scalars(self) -> tuple[int, ...]:
        """Where the 0-d leaves are: the only results a 0-d tensor operand can widen (see
        ``_scalar_kept_narrow``). Found once, when an op first has such an operand, and
        passed on to the results."""
        if self._scalars is None:
            self._scalars = tuple(i for i, x in enumerate(self.tensors) if x.ndim == 0)
        return self._scalars

    def _apply(
        self,
        foreach: Callable[..., Any],
        single: Callable[..., Any],
        *other: Leaves | Scalar,
    ) -> Leaves:
        lists = [o.tensors if isinstance(o, Leaves) else None for o in other]
        tensors = [self.tensors, *(t for t in lists if t is not None)]
        if _per_tensor(tensors):
            out = [single(x, *_pick(other, lists, i)) for i, x in enumerate(self.tensors)]
        else:
            out = foreach(self.tensors, *_pick(other, lists, None))
        if any(isinstance(o, torch.Tensor) for o in other) and self.scalars:
            out = _scalar_kept_narrow(out, tensors, self.scalars)
        return Leaves(out, self._scalars, fresh=True)

    def _apply_(
        self, foreach: Callable[..., Any], single: Callable[..., Any], *other: Leaves | Scalar
    ) -> Leaves:
        """The in-place twin of :meth:`_apply`, on fresh tensors only (in place, a 0-d
        operand cannot widen a leaf's dtype)."""
        if not self.fresh:
            raise RuntimeError("an in-place Leaves operation on tensors it does not own")
        lists = [o.tensors if isinstance(o, Leaves) else None for o in other]
        if _per_tensor([self.tensors, *(t for t in lists if t is not None)]):
            for i, x in enumerate(self.tensors):
                single(x, *_pick(other, lists, i))
        else:
            foreach(self.tensors, *_pick(other, lists, None))
        return self

    def add_(self, other: Leaves | Scalar) -> Leaves:
        """``self += other``, in place (a fresh ``Leaves`` only)."""
        return self._apply_(torch._foreach_add_, torch.Tensor.add_, other)

    def mul_(self, other: Leaves | Scalar) -> Leaves:
        """``self *= other``, in place (a fresh ``Leaves`` only)."""
        return self._apply_(torch._foreach_mul_, torch.Tensor.mul_, other)

    def div_(self, other: Leaves | Scalar) -> Leaves:
        """``self /= other``, in place (a fresh ``Leaves`` only)."""
        return self._apply_(torch._foreach_div_, torch.Tensor.div_, other)

    def addmul_(self, other: Leaves, factor: torch.Tensor) -> Leaves:
        """``self += other * factor`` (a 0-d ``factor``), in place (a fresh ``Leaves`` only)."""
        n = len(self.tensors)
        return self._apply_(
            lambda x, y: torch._foreach_addcmul_(x, y, [factor] * n),
            lambda x, y: x.addcmul_(y, factor),
            other,
        )

    def sign_(self) -> Leaves:
        """Elementwise sign, in place (a fresh ``Leaves`` only)."""
        return self._apply_(torch._foreach_sign_, torch.Tensor.sign_)

    def sqrt_(self) -> Leaves:
        """Elementwise square root, in place (a fresh ``Leaves`` only)."""
        return self._apply_(torch._foreach_sqrt_, torch.Tensor.sqrt_)

    def lerp(self, end: Leaves, weight: float | torch.Tensor) -> Leaves:
        """``self + weight * (end - self)``, one op, as ``torch.optim``'s moment updates."""
        w: Any = weight  # the foreach op takes a 0-d tensor too, which its stubs do not say
        return self._apply(
            lambda x, y: torch._foreach_lerp(x, y, w), lambda x, y: torch.lerp(x, y, w), end
        )

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

    def addmul(self, other: Leaves, factor: torch.Tensor) -> Leaves:
        """Elementwise ``self + other * factor`` (a 0-d ``factor``) in one op, not two."""
        n = len(self.tensors)
        out: Sequence[torch.Tensor]
        if _per_tensor([self.tensors, other.tensors]):
            pairs = zip(self.tensors, other.tensors, strict=True)
            out = [torch.addcmul(x, y, factor) for x, y in pairs]
        else:
            out = torch._foreach_addcmul(self.tensors, other.tensors, [factor] * n)
        if self.scalars:
            out = _scalar_kept_narrow(out, [self.tensors, other.tensors], self.scalars)
        return Leaves(out, self.scalars, fresh=True)

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
        pairs = zip(self.tensors, other.tensors, strict=True)
        cast = [x.to(y.dtype) for x, y in pairs]
        # Fresh only where every tensor was copied; a no-op cast hands back the input.
        fresh = self.fresh or all(c is not x for c, x in zip(cast, self.tensors, strict=True))
        return Leaves(cast, self._scalars, fresh=fresh)


def _scalar_kept_narrow(
    out: Sequence[torch.Tensor], operands: list[list[torch.Tensor]], scalars: tuple[int, ...]
) -> list[torch.Tensor]:
    """``out`` with a 0-d scalar tensor's dtype kept out of 0-d leaves' results.

    A float32 tensor times a 0-d float64 hyperparameter is float32, unless the
    tensor is 0-d too: then torch promotes to float64, and a scalar param's
    optimizer state would change dtype at its first update (a checkpoint then
    fits no fresh state, a compiled step recompiles). Such a result is cast
    back to the dtype its tensor operands give, as for every other leaf.
    """
    kept = list(out)
    for i in scalars:
        y = out[i]
        if y.ndim != 0 or not y.is_floating_point():
            continue
        dtypes = [xs[i].dtype for xs in operands]
        want = dtypes[0]
        for dtype in dtypes[1:]:
            want = torch.promote_types(want, dtype)
        if want.is_floating_point and y.dtype != want:
            kept[i] = y.to(want)
    return kept


def _pick(other: tuple[Any, ...], lists: list[Any], i: int | None) -> list[Any]:
    """Operands for leaf ``i`` (whole lists for ``i=None``); scalars pass as they are."""
    pairs = zip(other, lists, strict=True)
    return [o if t is None else (t if i is None else t[i]) for o, t in pairs]


def foreach_map(fn: Callable[..., Leaves], tree: Tree, *rest: PyTree, donate: bool = False) -> Tree:
    """``fn`` applied to the leaves of trees shaped like ``tree``, all leaves at once.

    ``fn`` receives one :class:`Leaves` per tree and returns one; write it as
    for single tensors, with methods (``.mul``, ``.add``, ``.sqrt()``, ...).
    With ``donate`` the caller gives up ``tree``: its leaves come as a fresh
    ``Leaves``, which ``fn`` may overwrite in place (``.mul_``, ``.add_``, ...).

    >>> foreach_map(lambda m, g: m.mul(0.5) + g, {"a": torch.ones(2)}, {"a": torch.ones(2)})
    {'a': tensor([1.5000, 1.5000])}
    """
    leaves, treedef = optree.tree_flatten(tree)
    if not leaves:
        return tree
    others = [Leaves(treedef.flatten_up_to(other)) for other in rest]
    return optree.tree_unflatten(treedef, fn(Leaves(leaves, fresh=donate), *others).tensors)


def leaf_paths(tree: PyTree, root: str) -> list[tuple[str, Any]]:
    """``(path, leaf)`` pairs, each path written as code (``batch['x'][0]``), for error messages."""
    accessors, leaves, _ = optree.tree_flatten_with_accessor(tree, none_is_leaf=False)
    return [(a.codify(root), leaf) for a, leaf in zip(accessors, leaves, strict=True)]
