"""A transformation applied to some params only: decay masks, parameter groups."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch  # noqa: F401  (the doctests' namespace)

from .._errors import FuncaccumError
from .._tree import PyTree
from .._validate import check_state, describe
from ._base import GradientTransformation, with_checks, with_extra_args_support

__all__ = [
    "Mask",
    "MaskedState",
    "decay_mask",
    "leaf_labels",
    "masked",
    "select_leaves",
]

Mask = PyTree | Callable[[PyTree], PyTree]
"""Which params a rule acts on: a pytree of bools, or a callable that gives one from the params."""


class MaskedState(NamedTuple):
    """State of :func:`masked`.

    Example:
        >>> from funcaccum import optim
        >>> rule = optim.masked(optim.trace(0.9), {"w": True, "b": False})
        >>> state = rule.init({"w": torch.zeros(2), "b": torch.zeros(2)})
        >>> state.inner_state.trace                      # b is masked out: no buffer for it
        {'w': tensor([0., 0.]), 'b': None}
    """

    inner_state: Any  # the inner rule's state, over the masked-in leaves (None elsewhere)


def decay_mask(params: PyTree) -> PyTree:
    """True for params with at least two dimensions: the usual weight-decay mask.

    Matrices, convolution kernels and embeddings are decayed; biases and the
    scales of LayerNorm or RMSNorm (one dimension) are not, as torch recipes
    arrange with two parameter groups.

    Example:
        >>> from funcaccum import optim
        >>> optim.decay_mask({"weight": torch.zeros(3, 2), "bias": torch.zeros(3)})
        {'weight': True, 'bias': False}
    """
    return optree.tree_map(lambda p: p.ndim >= 2, params)


def _path_mismatch(tree: PyTree, given: PyTree, name: str, root: str) -> str:
    """Which paths of ``tree`` the pytree ``given`` lacks, and which it has in excess."""
    wanted = [
        (a.path, a.codify(root))
        for a in optree.tree_flatten_with_accessor(tree, none_is_leaf=True)[0]
    ]
    have = [
        (a.path, a.codify(name))
        for a in optree.tree_flatten_with_accessor(given, none_is_leaf=True)[0]
    ]
    missing = [code for path, code in wanted if not any(path[: len(p)] == p for p, _ in have)]
    extra = [code for p, code in have if not any(path[: len(p)] == p for path, _ in wanted)]
    parts = (
        [f"{', '.join(missing[:3])} {'has' if len(missing) == 1 else 'have'} no entry in {name}"]
        if missing
        else []
    )
    if extra:
        parts.append(f"{', '.join(extra[:3])} {'names' if len(extra) == 1 else 'name'} no param")
    if not parts:  # the same paths in different containers (a list for a tuple, say)
        parts.append(
            f"its containers differ: {optree.tree_structure(given, none_is_leaf=True)} "
            f"against {optree.tree_structure(tree, none_is_leaf=True)}"
        )
    return "; ".join(parts)


def leaf_labels(
    tree: PyTree,
    given: Any,
    *,
    name: str,
    accepts: Callable[[Any], bool],
    expected: str,
    root: str = "params",
) -> PyTree:
    """Check ``given`` against ``tree``'s leaves; return it (a callable's result, if callable).

    ``given`` is a pytree shaped like ``tree`` or a prefix of it, or a
    callable that returns one given ``tree``; each leaf of ``tree`` takes the
    entry at its path or at the nearest enclosing one. Entries at ``tree``'s None
    leaves (absent params) are not checked. Errors name the path: a param with
    no entry, an entry with no param, or an entry ``accepts`` refuses
    (``expected`` says what it should be).

    Example:
        >>> params = {"layer": {"w": torch.zeros(2, 2), "b": torch.zeros(2)}, "out": torch.zeros(2)}
        >>> leaf_labels(params, {"layer": True, "out": False}, name="mask",
        ...             accepts=lambda m: isinstance(m, bool), expected="True or False")
        {'layer': True, 'out': False}
        >>> leaf_labels(params, {"layer": 1, "out": False}, name="mask",
        ...             accepts=lambda m: isinstance(m, bool), expected="True or False")
        Traceback (most recent call last):
        ...
        funcaccum._errors.FuncaccumError: mask gives 1 for params['layer']['b']; ...
    """
    entries = given(tree) if callable(given) else given
    try:
        full = optree.tree_broadcast_prefix(entries, tree, none_is_leaf=True)
    except ValueError as error:
        raise FuncaccumError(
            f"{name} does not match {root}: {_path_mismatch(tree, entries, name, root)}"
        ) from error
    leaves, treespec = optree.tree_flatten(tree, none_is_leaf=True)
    accessors = treespec.accessors()
    for accessor, leaf, entry in zip(accessors, leaves, treespec.flatten_up_to(full), strict=True):
        if leaf is not None and not accepts(entry):
            raise FuncaccumError(
                f"{name} gives {describe(entry)} for {accessor.codify(root)}; "
                f"each entry must be {expected}"
            )
    return entries


def select_leaves(tree: PyTree, chosen: PyTree, keep: Callable[[Any], bool]) -> PyTree:
    """``tree`` with None (an absent leaf) wherever ``keep(chosen entry)`` is False.

    ``chosen`` is a pytree of entries shaped like ``tree`` or a prefix of it
    (a mask, or labels); a whole subtree left out becomes a single None.

    >>> select_leaves({"w": torch.ones(1), "b": torch.ones(1)}, {"w": True, "b": False}, bool)
    {'w': tensor([1.]), 'b': None}
    """
    return optree.tree_map(lambda c, x: x if keep(c) else None, chosen, tree, none_is_leaf=True)


def _is_flag(entry: Any) -> bool:
    return isinstance(entry, bool) or type(entry).__name__ == "bool_"  # numpy's bool too


def masked(inner: GradientTransformation, mask: Mask) -> GradientTransformation:
    """Apply ``inner`` to the params ``mask`` marks True; pass the other updates through unchanged.

    The mask is a pytree of bools with the params' structure, or a prefix of
    it (one bool for a whole subtree), or a callable that returns one: it is
    called with the params at ``init`` and with the params (the updates, if
    ``update`` gets no params) at each update, so it should depend on the
    tree's keys and shapes only, as :func:`decay_mask` does. ``inner`` sees
    the masked-out leaves as None (absent), so its state covers the
    masked-in leaves only and a global quantity it computes (a clipping norm)
    is over them alone.

    Raises:
        FuncaccumError: at ``init``, a mask whose structure differs from the
            params' (the message names the paths), or an entry that is not a bool.

    Example:
        >>> from funcaccum import optim
        >>> rule = optim.masked(optim.add_decayed_weights(0.5), optim.decay_mask)
        >>> params = {"w": torch.ones(1, 2), "b": torch.ones(2)}
        >>> grads = {"w": torch.zeros(1, 2), "b": torch.zeros(2)}
        >>> rule.update(grads, rule.init(params), params)[0]        # only w is decayed
        {'w': tensor([[0.5000, 0.5000]]), 'b': tensor([0., 0.])}
    """
    if not isinstance(inner, GradientTransformation):
        raise FuncaccumError(
            f"masked's inner must be a GradientTransformation, got {describe(inner)}"
        )
    if not callable(mask) and not optree.tree_leaves(mask, none_is_leaf=True):
        raise FuncaccumError(f"mask must be a pytree of bools or a callable, got {describe(mask)}")
    inner = with_extra_args_support(inner)

    def init(params: PyTree) -> MaskedState:
        # The same (unbroadcast) tree that update selects with, so the structures agree.
        flags = leaf_labels(params, mask, name="mask", accepts=_is_flag, expected="True or False")
        return MaskedState(inner.init(select_leaves(params, flags, bool)))

    def update(
        updates: PyTree,
        state: MaskedState,
        params: PyTree = None,
        **extra_args: Any,
    ) -> tuple[PyTree, MaskedState]:
        flags = mask(updates if params is None else params) if callable(mask) else mask
        inner_updates, inner_state = inner.update(
            select_leaves(updates, flags, bool),
            state.inner_state,
            None if params is None else select_leaves(params, flags, bool),
            **extra_args,
        )
        updates = optree.tree_map(
            lambda keep, new, old: new if keep else old,
            flags,
            inner_updates,
            updates,
            none_is_leaf=True,
        )
        return updates, MaskedState(inner_state)

    return with_checks(
        GradientTransformation(init, update),
        lambda state: check_state(state, MaskedState, owner="masked()"),
        owner="masked()",
    )
