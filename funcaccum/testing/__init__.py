"""Tools for unit-testing pure gradient functions.

- tree assertions that name the failing leaf: :func:`assert_trees_allclose`,
  :func:`assert_trees_equal`, :func:`assert_tree_all_finite`,
  :func:`assert_tree_shapes_equal`, :func:`assert_shape`;
- :func:`check_grads`: ``torch.func`` derivatives against finite differences;
- :func:`assert_accumulation_exact`: accumulation gives a loss's full-batch
  gradient, or the message says why not;
- :func:`variants` and :func:`assert_max_compiles`: run a test eagerly,
  compiled and on CUDA, and catch recompiles;
- a pytest plugin (the top-level module ``funcaccum_pytest``, registered on
  install, which loads no torch until a test uses it) with the fixtures
  ``fa_variant`` and ``fa_rng`` and the marker ``compile``.
"""

from ._accumulation import assert_accumulation_exact
from ._asserts import (
    assert_shape,
    assert_tree_all_finite,
    assert_tree_shapes_equal,
    assert_trees_allclose,
    assert_trees_equal,
)
from ._check_grads import check_grads
from ._variants import Variant, assert_max_compiles, variants

__all__ = [
    "Variant",
    "assert_accumulation_exact",
    "assert_max_compiles",
    "assert_shape",
    "assert_tree_all_finite",
    "assert_tree_shapes_equal",
    "assert_trees_allclose",
    "assert_trees_equal",
    "check_grads",
    "variants",
]
