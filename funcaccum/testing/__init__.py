"""Tools for unit-testing pure gradient functions: tree assertions, gradient
checks, accumulation checks, and eager/compiled variants."""

from ._asserts import (
    assert_shape,
    assert_tree_all_finite,
    assert_tree_shapes_equal,
    assert_trees_allclose,
    assert_trees_equal,
)

__all__ = [
    "assert_shape",
    "assert_tree_all_finite",
    "assert_tree_shapes_equal",
    "assert_trees_allclose",
    "assert_trees_equal",
]
