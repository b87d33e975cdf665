"""Assertions on pytrees of tensors, with the failing leaf's path in the message."""

from __future__ import annotations

from typing import Any

import einops
import optree
import torch

from .._tree import PyTree, leaf_paths

__all__ = [
    "assert_shape",
    "assert_tree_all_finite",
    "assert_tree_shapes_equal",
    "assert_trees_allclose",
    "assert_trees_equal",
]


def _paired_leaves(actual: PyTree, expected: PyTree) -> list[tuple[str, Any, Any]]:
    """Leaves of two trees side by side, after checking the structures match."""
    actual_def, expected_def = optree.tree_structure(actual), optree.tree_structure(expected)
    if actual_def != expected_def:
        raise AssertionError(
            f"tree structures differ:\n  actual:   {actual_def}\n  expected: {expected_def}"
        )
    expected_leaves = optree.tree_leaves(expected)
    return [
        (path, leaf, other)
        for (path, leaf), other in zip(leaf_paths(actual, "tree"), expected_leaves, strict=True)
    ]


def _errors(actual: torch.Tensor, expected: torch.Tensor) -> str:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape or a.numel() == 0:
        return ""
    diff = (a - e).abs()
    rel = diff / e.abs()
    return (
        f"max abs error {diff.max().item():.3e}, "
        f"max rel error {rel.nan_to_num(nan=0.0).max().item():.3e}"
    )


def assert_trees_allclose(
    actual: PyTree,
    expected: PyTree,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    equal_nan: bool = False,
    check_dtype: bool = True,
) -> None:
    """Assert two pytrees have the same structure and close leaves.

    Structure is compared first; then each leaf through
    :func:`torch.testing.assert_close` (``rtol``/``atol`` default to its
    per-dtype values, and pass both or neither). On failure the message names
    the leaf's path and its max absolute and relative error.

    Raises:
        AssertionError: structures differ, or a leaf differs.

    Example:
        >>> a = {"w": torch.tensor([1.0, 2.0])}
        >>> assert_trees_allclose(a, {"w": torch.tensor([1.0, 2.0 + 1e-9])})
        >>> assert_trees_allclose(a, {"w": torch.tensor([1.0, 2.1])})
        Traceback (most recent call last):
        ...
        AssertionError: leaf tree['w'] differs: max abs error 1.000e-01, max rel error 4.762e-02 ...
    """
    for path, a, e in _paired_leaves(actual, expected):
        try:
            torch.testing.assert_close(
                a, e, rtol=rtol, atol=atol, equal_nan=equal_nan, check_dtype=check_dtype
            )
        except AssertionError as error:
            detail = str(error).replace("\n", "\n  ")
            raise AssertionError(f"leaf {path} differs: {_errors(a, e)}\n  {detail}") from None


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(x: torch.Tensor) -> torch.Tensor:
    """Each element's bits as an integer of the same width."""
    return x.detach().reshape(-1).contiguous().view(_SAME_WIDTH_INT[x.element_size()])


def assert_trees_equal(actual: PyTree, expected: PyTree) -> None:
    """Assert two pytrees are bit-identical: structure, shapes, dtypes and every bit of every leaf.

    NaN equals NaN here when the bits agree, so it can check that a rejected
    update left state exactly as it was.

    Example:
        >>> t = [torch.tensor([1.0, float("nan")])]
        >>> assert_trees_equal(t, [t[0].clone()])
        >>> assert_trees_equal(t, [torch.tensor([1.0, 0.0])])
        Traceback (most recent call last):
        ...
        AssertionError: leaf tree[0] differs in 1 of 2 elements ...
    """
    for path, a, e in _paired_leaves(actual, expected):
        if a.shape != e.shape or a.dtype != e.dtype:
            raise AssertionError(
                f"leaf {path}: actual {a.dtype}{tuple(a.shape)}, expected {e.dtype}{tuple(e.shape)}"
            )
        unequal = int((_bits(a) != _bits(e)).sum())
        if unequal:
            raise AssertionError(
                f"leaf {path} differs in {unequal} of {a.numel()} elements "
                f"(bitwise); {_errors(a, e)}"
            )


def assert_tree_all_finite(tree: PyTree) -> None:
    """Assert every leaf is free of NaN and Inf.

    Example:
        >>> assert_tree_all_finite({"w": torch.tensor([1.0, float("inf")])})
        Traceback (most recent call last):
        ...
        AssertionError: leaf tree['w'] has 1 non-finite of 2 elements (0 NaN, 1 Inf), first at (1,)
    """
    for path, leaf in leaf_paths(tree, "tree"):
        bad = ~torch.isfinite(leaf)
        if bad.any():
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise AssertionError(
                f"leaf {path} has {int(bad.sum())} non-finite of {leaf.numel()} elements "
                f"({int(leaf.isnan().sum())} NaN, {int(leaf.isinf().sum())} Inf), first at {first}"
            )


def assert_tree_shapes_equal(actual: PyTree, expected: PyTree) -> None:
    """Assert two pytrees have the same structure and leaf shapes.

    Example:
        >>> assert_tree_shapes_equal([torch.ones(2, 3)], [torch.zeros(3, 2)])
        Traceback (most recent call last):
        ...
        AssertionError: leaf tree[0] has shape (2, 3), expected (3, 2)
    """
    for path, a, e in _paired_leaves(actual, expected):
        if a.shape != e.shape:
            raise AssertionError(
                f"leaf {path} has shape {tuple(a.shape)}, expected {tuple(e.shape)}"
            )


def assert_shape(x: torch.Tensor, pattern: str, **sizes: int) -> dict[str, int]:
    """Assert ``x`` matches an einops shape pattern with the given axis sizes.

    Returns:
        Every named axis's size, from :func:`einops.parse_shape`.

    Example:
        >>> grads = torch.zeros(4, 8, 3)
        >>> assert_shape(grads, "k b d", k=4, d=3)
        {'k': 4, 'b': 8, 'd': 3}
        >>> assert_shape(grads, "k b d", k=2)
        Traceback (most recent call last):
        ...
        AssertionError: shape (4, 8, 3) does not match 'k b d' with k=2: k is 4
    """
    wanted = ", ".join(f"{k}={v}" for k, v in sizes.items())
    try:
        parsed = einops.parse_shape(x, pattern)
    except (einops.EinopsError, RuntimeError) as error:  # einops raises both, by version
        raise AssertionError(
            f"shape {tuple(x.shape)} does not match {pattern!r}: {error}"
        ) from None
    wrong = [
        f"{name} is {parsed.get(name)}" for name, size in sizes.items() if parsed.get(name) != size
    ]
    if wrong:
        raise AssertionError(
            f"shape {tuple(x.shape)} does not match {pattern!r} with {wanted}: {', '.join(wrong)}"
        )
    return parsed
