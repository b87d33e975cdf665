"""funcaccum/_microbatch.py: the plan, the split, batch sizes and layouts."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad

import funcaccum as fa
from funcaccum._microbatch import (
    MicrobatchGroup,
    batch_dims,
    batch_size,
    plan_microbatches,
    split_microbatches,
    to_layout,
)
from funcaccum.testing import assert_trees_allclose

PROPERTY = settings(max_examples=25, deadline=None)


@st.composite
def splits(draw: st.DrawFn, max_n: int = 24) -> tuple[int, dict[str, int]]:
    """A batch size N and one way to split it: a microbatch count or a microbatch size."""
    n = draw(st.integers(1, max_n))
    if draw(st.booleans()):
        return n, {"num_microbatches": draw(st.integers(1, n))}
    return n, {"microbatch_size": draw(st.integers(1, n + 3))}


# The plan covers every example exactly once, with at most two sizes.


@settings(max_examples=200, deadline=None)
@given(split=splits(max_n=300))
def test_plan_covers_every_example_once(split):
    n, how = split
    plan = fa.extend.plan_microbatches(n, **how)
    assert 1 <= len(plan) <= 2
    assert all(count >= 1 and size >= 1 for count, size in plan)
    assert len({size for _, size in plan}) == len(plan)  # two groups, two sizes
    assert sum(count * size for count, size in plan) == n
    if "num_microbatches" in how:
        assert sum(count for count, _ in plan) == how["num_microbatches"]
        assert max(s for _, s in plan) - min(s for _, s in plan) <= 1
    else:
        m = min(how["microbatch_size"], n)
        assert plan[0][1] == m
        assert sum(count for count, _ in plan) == math.ceil(n / m)


@PROPERTY
@given(split=splits(max_n=60))
def test_split_puts_every_example_in_one_microbatch_in_order(split):
    n, how = split
    batch = {"i": torch.arange(n), "x": torch.arange(2 * n).view(n, 2)}
    groups = fa.split_microbatches(batch, **how)
    assert [(g.count, g.size) for g in groups] == list(fa.extend.plan_microbatches(n, **how))
    assert torch.equal(torch.cat([g.batch["i"].reshape(-1) for g in groups]), batch["i"])
    assert torch.equal(torch.cat([g.batch["x"].reshape(-1, 2) for g in groups]), batch["x"])


@PROPERTY
@given(n=st.integers(1, 50), extra=st.integers(1, 50))
def test_plan_refuses_more_microbatches_than_examples(n, extra):
    with pytest.raises(fa.FuncaccumError):
        fa.extend.plan_microbatches(n, num_microbatches=n + extra)


@PROPERTY
@given(
    n=st.one_of(
        st.floats(allow_nan=True),
        st.booleans(),
        st.text(max_size=5),
        st.integers(max_value=0),
        st.none(),
    )
)
def test_plan_refuses_a_non_int_or_empty_batch_size(n):
    with pytest.raises(fa.FuncaccumError):
        fa.extend.plan_microbatches(n, num_microbatches=1)


@settings(database=None, deadline=None, max_examples=60)
@given(st.integers(-5, 50) | st.floats(allow_nan=True) | st.none() | st.text(max_size=3))
def test_plan_microbatches_accepts_exactly_positive_ints(num_examples: Any) -> None:
    if isinstance(num_examples, int) and num_examples >= 1:
        plan = fa.extend.plan_microbatches(num_examples, num_microbatches=1)
        assert plan == ((1, num_examples),)
    else:
        with pytest.raises(fa.FuncaccumError, match=r"num_examples|empty"):
            fa.extend.plan_microbatches(num_examples, num_microbatches=1)


@pytest.mark.parametrize(
    ("n", "how", "plan"),
    [
        (10, {"num_microbatches": 4}, ((2, 3), (2, 2))),  # the first N % K hold one more
        (12, {"num_microbatches": 4}, ((4, 3),)),  # even: one group, no empty one
        (10, {"num_microbatches": 10}, ((10, 1),)),
        (10, {"microbatch_size": 4}, ((2, 4), (1, 2))),  # the last one partial
        (12, {"microbatch_size": 4}, ((3, 4),)),
        (10, {"microbatch_size": 25}, ((1, 10),)),  # larger than the batch: the whole batch
    ],
)
def test_plan_by_hand(n: int, how: dict, plan: tuple) -> None:
    assert plan_microbatches(n, **how) == plan


def test_plan_takes_exactly_one_of_count_and_size() -> None:
    with pytest.raises(fa.FuncaccumError, match="exactly one of num_microbatches and microbatch"):
        plan_microbatches(10)
    with pytest.raises(fa.FuncaccumError, match="exactly one of num_microbatches and microbatch"):
        plan_microbatches(10, num_microbatches=2, microbatch_size=5)
    with pytest.raises(fa.FuncaccumError, match="the batch is empty"):
        plan_microbatches(0, num_microbatches=1)


# Splitting and layouts.


def test_split_groups_are_views_of_the_batch() -> None:
    """No copy: every group shares the batch's storage, shaped (count, size, ...)."""
    batch = {"x": torch.randn(10, 3, dtype=torch.float64), "y": torch.arange(10)}
    groups = split_microbatches(batch, num_microbatches=4)
    assert [type(g) for g in groups] == [MicrobatchGroup, MicrobatchGroup]
    assert [(g.count, g.size, tuple(g.batch["x"].shape)) for g in groups] == [
        (2, 3, (2, 3, 3)),
        (2, 2, (2, 2, 3)),
    ]
    for g in groups:
        for name in batch:
            assert g.batch[name].untyped_storage().data_ptr() == (
                batch[name].untyped_storage().data_ptr()
            )
    assert groups[1].batch["y"].tolist() == [[6, 7], [8, 9]]


def test_batch_size_reads_each_leafs_batch_dim() -> None:
    tokens, lengths = torch.zeros(5, 12, 3), torch.zeros(12)  # (T, N, d), (N,)
    assert batch_size({"x": torch.zeros(7, 2), "y": torch.zeros(7)}) == 7
    assert batch_size((tokens, lengths), (1, 0)) == 12
    assert batch_size(tokens, -2) == 12  # a negative dim counts from the end
    assert batch_size({"a": tokens, "b": {"c": tokens, "d": tokens}}, {"a": 1, "b": 1}) == 12
    with pytest.raises(fa.FuncaccumError, match=r"disagree on the leading.*pass batch_dim=1"):
        batch_size((tokens, lengths))


def test_batch_dims_broadcasts_a_prefix_and_refuses_another_tree() -> None:
    batch = {"a": (torch.zeros(2, 3), torch.zeros(2, 3)), "b": torch.zeros(3)}
    assert batch_dims(batch, 1) == {"a": (1, 1), "b": 1}
    assert batch_dims(batch, {"a": 1, "b": 0}) == {"a": (1, 1), "b": 0}
    assert batch_dims(batch, {"a": (0, 1), "b": 0}) == {"a": (0, 1), "b": 0}
    with pytest.raises(fa.FuncaccumError, match="batch_dim must be an int or a pytree prefix"):
        batch_dims(batch, {"a": 1})
    with pytest.raises(fa.FuncaccumError, match="batch_dim must be an int or a pytree prefix"):
        batch_dims(batch, (1, 0))


def test_to_layout_gives_a_split_microbatch_its_own_layout_back() -> None:
    tokens = torch.arange(5 * 12 * 3).view(5, 12, 3)  # (T, N, d)
    lengths = torch.arange(12)
    groups = split_microbatches((tokens, lengths), num_microbatches=4, batch_dim=(1, 0))
    assert groups[0].batch[0].shape == (4, 3, 5, 3)  # (k, m, T, d): examples leading
    for k in range(4):
        microbatch = to_layout((groups[0].batch[0][k], groups[0].batch[1][k]), (1, 0))
        assert torch.equal(microbatch[0], tokens[:, 3 * k : 3 * k + 3])  # (T, m, d) again
        assert torch.equal(microbatch[1], lengths[3 * k : 3 * k + 3])
    leading = {"x": torch.zeros(3, 2)}
    assert to_layout(leading, 0) is leading


def test_sequence_first_batches_take_an_explicit_batch_dim() -> None:
    """A (T, N) leaf split along N, given back to the loss in its own layout."""
    torch.manual_seed(0)
    tokens = torch.randn(5, 12, 3, dtype=torch.float64)  # (T, N, d)
    lengths = torch.randint(1, 6, (12,)).to(torch.float64)  # (N,)
    params = {"w": torch.randn(3, dtype=torch.float64)}

    def loss_fn(params: dict, batch: tuple) -> torch.Tensor:
        tokens, lengths = batch  # (T, m, d), (m,)
        assert tokens.shape[0] == 5  # the loss sees time first, as it wrote it
        return torch.mean(torch.tanh(tokens @ params["w"]).sum(0) / lengths)

    want = grad(loss_fn)(params, (tokens, lengths))
    for strategy in ("scan", "vmap"):
        got = fa.accumulate(
            loss_fn, params, (tokens, lengths), num_microbatches=4, strategy=strategy,
            batch_dim=(1, 0),
        )  # fmt: skip
        assert_trees_allclose(got.grads, want, rtol=1e-10, atol=1e-13)
    # Without it the leaves disagree on the leading dimension, and the error says what to do.
    with pytest.raises(fa.FuncaccumError, match=r"batch\[0\]: \(5, 12, 3\).*pass batch_dim=1"):
        fa.accumulate(loss_fn, params, (tokens, lengths), num_microbatches=4)
    # An explicit layout the leaves disagree with is refused, naming each leaf.
    with pytest.raises(fa.FuncaccumError, match=r"disagree on their batch dimensions.*batch\[1\]"):
        fa.accumulate(loss_fn, params, (tokens, lengths[:5]), num_microbatches=4, batch_dim=(1, 0))
    with pytest.raises(fa.FuncaccumError, match="has no batch dimension 1"):
        fa.accumulate(loss_fn, params, (tokens, lengths), num_microbatches=4, batch_dim=1)
