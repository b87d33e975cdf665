"""Pytree utilities and their None policy."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

import funcaccum as fa
from funcaccum._tree import unit_squared_norms
from funcaccum.testing import assert_trees_equal


class Pair(NamedTuple):
    a: torch.Tensor
    b: list


def tree(scale: float = 1.0) -> dict:
    return {
        "p": Pair(torch.tensor([1.0, 2.0]) * scale, [torch.tensor(3.0) * scale, None]),
        "q": (torch.ones(2, 2) * scale,),
    }


def test_add_scale_zeros_keep_structure_and_none() -> None:
    assert_trees_equal(fa.tree.add(tree(), tree(), tree()), tree(3.0))
    assert_trees_equal(fa.tree.scale(tree(), 2.0), tree(2.0))
    zeros = fa.tree.zeros_like(tree(), dtype=torch.float64)
    assert zeros["p"].b[1] is None
    assert zeros["q"][0].dtype == torch.float64
    assert_trees_equal(zeros, fa.tree.cast(tree(0.0), torch.float64))


def test_mismatched_structures_are_refused() -> None:
    with pytest.raises(ValueError, match="Expected an instance of dict"):
        fa.tree.add(tree(), [1.0])


def test_global_norm_and_vdot() -> None:
    t = tree()
    expected = (1 + 4 + 9 + 4) ** 0.5
    assert fa.tree.global_norm(t).item() == pytest.approx(expected)
    assert fa.tree.vdot(t, fa.tree.scale(t, 2.0)).item() == pytest.approx(2 * expected**2)


def test_reductions_of_half_precision_trees_are_float32() -> None:
    t = {"w": torch.full((4096,), 0.01, dtype=torch.bfloat16)}
    norm = fa.tree.global_norm(t)
    assert norm.dtype == torch.float32
    assert norm.item() == pytest.approx(0.01 * 64, rel=1e-2)


def test_weighted_sum_and_add_weighted() -> None:
    stacked = {"w": torch.tensor([[1.0, 2.0], [5.0, 7.0], [3.0, 4.0]])}
    weights = torch.tensor([2.0, 0.0, 0.5])
    assert_trees_equal(fa.tree.weighted_sum(stacked, weights), {"w": torch.tensor([3.5, 6.0])})
    acc = {"w": torch.ones(2, dtype=torch.float64)}
    chunk = fa.tree.add_weighted(acc, stacked, weights)
    single = fa.tree.add_weighted(acc, {"w": stacked["w"][0]}, weights[0])
    assert_trees_equal(chunk, {"w": torch.tensor([4.5, 7.0], dtype=torch.float64)})
    assert_trees_equal(single, {"w": torch.tensor([3.0, 5.0], dtype=torch.float64)})


def test_select_is_bit_exact() -> None:
    on_true, on_false = tree(), tree(7.0)
    assert_trees_equal(fa.tree.select(torch.tensor(True), on_true, on_false), on_true)
    assert_trees_equal(fa.tree.select(torch.tensor(False), on_true, on_false), on_false)


def test_the_module_is_the_one_spelling() -> None:
    assert fa.tree.__all__ == sorted(fa.tree.__all__)
    assert not [name for name in fa.__all__ if name.startswith("tree_")]


def test_sub_is_add_of_the_negation_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = ({"w": torch.randn(3, 4, generator=g), "none": None} for _ in range(2))
    assert_trees_equal(fa.tree.sub(a, b), fa.tree.add(a, fa.tree.scale(b, -1.0)))


def test_unit_squared_norms_of_a_stacked_mixed_dtype_tree() -> None:
    g = torch.Generator().manual_seed(0)
    grads = {
        "w": torch.randn(5, 3, 2, generator=g, dtype=torch.bfloat16),  # (c, 3, 2)
        "b": torch.randn(5, 3, generator=g, dtype=torch.float64),  # (c, 3)
        "frozen": None,
    }
    squares = unit_squared_norms(grads)
    assert squares.shape == (5,)
    assert squares.dtype == torch.float64  # float32 from bf16, promoted by the float64 leaf
    want = grads["w"].double().flatten(1).square().sum(1) + grads["b"].square().sum(1)
    torch.testing.assert_close(squares, want)
    # One leaf, squared in float32 and summed in float64 (as the adaptive reducer keeps it).
    leaf = unit_squared_norms(grads["w"], sum_dtype=torch.float64)
    assert leaf.dtype == torch.float64
    torch.testing.assert_close(leaf, grads["w"].float().flatten(1).square().double().sum(1))
