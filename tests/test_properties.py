"""Property-based tests: exactness of any split, merge algebra, refusals."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from conftest import (
    classification_batch,
    mlp_loss,
    mlp_params,
    sequence_batch,
    sequence_params,
    token_weighted_loss,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from test_microbatch import splits
from torch.func import grad

import funcaccum as fa
from funcaccum.testing import assert_trees_allclose

PROPERTY = settings(max_examples=25, deadline=None)

PARAMS = mlp_params(sizes=(5, 8, 3))
SEQ_PARAMS = sequence_params()


STRATEGIES = st.sampled_from(["scan", "vmap"])


# 1. Any split of any batch gives the full-batch gradient.


@PROPERTY
@given(split=splits(), strategy=STRATEGIES, seed=st.integers(0, 2**16))
def test_any_split_gives_full_batch_gradient(split, strategy, seed):
    n, how = split
    batch = classification_batch(n, seed=seed)
    result = fa.accumulate(mlp_loss, PARAMS, batch, strategy=strategy, **how)
    assert_trees_allclose(result.grads, grad(mlp_loss)(PARAMS, batch), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.loss, mlp_loss(PARAMS, batch), rtol=1e-10, atol=1e-12)
    assert result.weight.item() == n


@PROPERTY
@given(split=splits(), strategy=STRATEGIES, seed=st.integers(0, 2**16))
def test_any_split_gives_full_batch_token_weighted_gradient(split, strategy, seed):
    n, how = split
    batch = sequence_batch(n, seed=seed)
    assert bool(batch["mask"].any(dim=1).all())  # every row has a valid token

    def full_loss(params, batch):
        return token_weighted_loss(params, batch)[0]

    result = fa.accumulate(
        token_weighted_loss, SEQ_PARAMS, batch, strategy=strategy, has_weight=True, **how
    )
    expected = grad(full_loss)(SEQ_PARAMS, batch)
    assert_trees_allclose(result.grads, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.loss, full_loss(SEQ_PARAMS, batch), rtol=1e-10, atol=1e-12)
    assert result.weight.item() == batch["mask"].sum().item()


# 2. merge is associative and commutative, and merging parts equals folding the whole.

REDUCERS = {
    "mean": lambda max_norm: fa.mean(),
    "clipped_mean": lambda max_norm: fa.clipped_mean(max_norm),
    "adaptive": lambda max_norm: fa.adaptive(),
}


def _close(actual, expected, rtol):
    assert_trees_allclose(actual, expected, rtol=rtol, atol=rtol, equal_nan=True)


@pytest.mark.parametrize("name", list(REDUCERS))
@PROPERTY
@given(
    size=st.integers(1, 3),
    counts=st.tuples(*[st.integers(1, 3)] * 3),
    remainder=st.integers(0, 2),
    max_norm=st.floats(0.01, 2.0),
    seed=st.integers(0, 2**16),
)
def test_merge_is_associative_and_commutative(name, size, counts, remainder, max_norm, seed):
    reducer = REDUCERS[name](max_norm)
    # Chunks of whole microbatches of `size` (the last one may end with a partial one), so
    # folding the whole batch with microbatch_size=size makes the same microbatches.
    remainder = min(remainder, size - 1)
    bounds = [0]
    for count in counts:
        bounds.append(bounds[-1] + count * size)
    bounds[-1] += remainder
    batch = classification_batch(bounds[-1], seed=seed)
    acc = fa.Accumulation(reducer=reducer, microbatch_size=size)
    a, b, c = (
        acc.fold(mlp_loss, PARAMS, {k: v[lo:hi] for k, v in batch.items()})
        for lo, hi in pairwise(bounds)
    )
    merge = acc.merge

    _close(merge(merge(a, b), c), merge(a, merge(b, c)), 1e-12)
    _close(merge(a, b), merge(b, a), 1e-12)
    _close(merge(merge(a, b), c), merge(c, merge(b, a)), 1e-12)

    whole = acc.fold(mlp_loss, PARAMS, batch)
    parts = acc.finalize(merge(merge(a, b), c))
    expected = acc.finalize(whole)
    _close(parts.grads, expected.grads, 1e-10)
    _close(parts.loss, expected.loss, 1e-10)
    _close(parts.weight, expected.weight, 1e-10)
    assert type(parts.stats) is type(expected.stats)
    for key, value in expected.stats._asdict().items():
        if value.dtype == torch.bool:
            continue  # a threshold test may flip on rounding; the statistics it reads are compared
        _close(getattr(parts.stats, key), value, 1e-10)


# 3. Bad inputs stay refused.

NOT_NUMBERS = st.one_of(st.booleans(), st.text(max_size=5), st.none(), st.just([0.1]))
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
NEGATIVE = st.floats(max_value=-1e-300, allow_nan=False, allow_infinity=False)


@PROPERTY
@given(lr=st.one_of(NEGATIVE, NON_FINITE, NOT_NUMBERS))
def test_sgd_refuses_a_bad_learning_rate(lr):
    # learning_rate=0 is accepted (low=0 inclusive): it is not drawn.
    with pytest.raises(fa.FuncaccumError):
        fa.optim.sgd(lr)


@PROPERTY
@given(
    b1=st.one_of(
        NEGATIVE,
        st.floats(min_value=1.0, allow_nan=False),  # 1.0 and above, +inf included
        NON_FINITE,
        NOT_NUMBERS,
    )
)
def test_adamw_refuses_a_bad_b1(b1):
    with pytest.raises(fa.FuncaccumError):
        fa.optim.adamw(1e-3, b1=b1)


@PROPERTY
@given(max_norm=st.one_of(NEGATIVE, st.sampled_from([0.0, -0.0, 0]), NON_FINITE, NOT_NUMBERS))
def test_clipped_mean_refuses_a_bad_max_norm(max_norm):
    with pytest.raises(fa.FuncaccumError):
        fa.clipped_mean(max_norm)
