"""Each bad input raises FuncaccumError naming what was wrong and what was expected."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import classification_batch, mlp_loss, mlp_params

import funcaccum as fa
from funcaccum.testing import assert_trees_allclose, assert_trees_equal


@pytest.mark.parametrize(
    ("batch", "options", "message"),
    [
        (
            {"x": torch.zeros(8, 5), "y": torch.zeros(7, dtype=torch.long)},
            {"num_microbatches": 2},
            "batch['x']: (8, 5), batch['y']: (7,)",
        ),
        ({"x": torch.zeros(8, 5), "y": 3}, {"num_microbatches": 2}, "batch['y'] is a int"),
        (
            {"x": torch.zeros(8, 5), "y": torch.tensor(1)},
            {"num_microbatches": 2},
            "batch['y'] is a 0-d tensor",
        ),
        (
            {"x": torch.zeros(0, 5), "y": torch.zeros(0, dtype=torch.long)},
            {"num_microbatches": 1},
            "empty",
        ),
        ({}, {"num_microbatches": 1}, "no tensor leaves"),
        (classification_batch(8), {"num_microbatches": 0}, "num_microbatches must be >= 1, got 0"),
        (
            classification_batch(8),
            {"num_microbatches": 9},
            "num_microbatches=9 is more than the batch's 8",
        ),
        (classification_batch(8), {"num_microbatches": 2.0}, "num_microbatches must be an int"),
        (classification_batch(8), {"microbatch_size": 0}, "microbatch_size must be >= 1"),
        (classification_batch(8), {"num_microbatches": 2, "microbatch_size": 4}, "at most one of"),
        (classification_batch(8), {"strategy": "loop"}, "strategy must be a Strategy"),
        (classification_batch(8), {"strategy": "chunked"}, "use chunked(size)"),
        (classification_batch(8), {"strategy": object()}, "the Strategy protocol"),
        (classification_batch(8), {"reducer": "mean"}, "reducer must be a funcaccum Reducer"),
    ],
)
def test_bad_input_raises_a_clear_error(batch: Any, options: dict, message: str) -> None:
    with pytest.raises(fa.FuncaccumError, match=re.escape(message)):
        fa.accumulate(mlp_loss, mlp_params(), batch, **options)


def test_errors_are_value_errors() -> None:
    assert issubclass(fa.FuncaccumError, ValueError)


def test_a_loss_that_is_not_a_scalar_is_refused() -> None:
    def per_example(params: dict, batch: dict) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(
            batch["x"] @ params["layer0"]["w"][:, :3], batch["y"], reduction="none"
        )

    with pytest.raises(
        fa.FuncaccumError, match=re.escape("must return a 0-d tensor") + ".*got \\(4,\\)"
    ):
        fa.accumulate(per_example, mlp_params(), classification_batch(8), num_microbatches=2)


def test_a_pair_without_a_flag_is_refused_with_a_hint() -> None:
    def with_count(params: dict, batch: dict) -> tuple:
        return mlp_loss(params, batch), batch["y"].shape[0]

    with pytest.raises(fa.FuncaccumError, match="has_weight=True"):
        fa.accumulate(with_count, mlp_params(), classification_batch(8), num_microbatches=2)
    with pytest.raises(fa.FuncaccumError, match="with has_weight=True, loss_fn must return a pair"):
        fa.accumulate(mlp_loss, mlp_params(), classification_batch(8), has_weight=True)


def test_a_weight_that_is_not_a_scalar_is_refused() -> None:
    def bad_weight(params: dict, batch: dict) -> tuple:
        return mlp_loss(params, batch), torch.ones(2)

    with pytest.raises(fa.FuncaccumError, match="weight loss_fn returns must be 0-d"):
        fa.accumulate(bad_weight, mlp_params(), classification_batch(8), has_weight=True)


def test_clipped_mean_needs_a_positive_threshold() -> None:
    with pytest.raises(fa.FuncaccumError, match="max_norm must be > 0"):
        fa.clipped_mean(0.0)


@pytest.mark.parametrize("denominator", [0, -4, 0.0, float("nan"), float("inf"), True, "count"])
@pytest.mark.parametrize(
    "make", [fa.mean, lambda **options: fa.clipped_mean(1.0, **options)], ids=["mean", "clipped"]
)
def test_a_denominator_that_is_not_a_positive_number_is_refused(
    make: Callable[..., fa.extend.Reducer], denominator: Any
) -> None:
    """A negative divisor would flip every step, a zero one divide by zero: refused up front."""
    with pytest.raises(fa.FuncaccumError, match="denominator must be a number or 'weight'"):
        make(denominator=denominator)


def test_every_mean_reducer_takes_the_same_denominators() -> None:
    params, batch = mlp_params(), classification_batch(12)
    for make in (fa.mean, lambda **options: fa.clipped_mean(1e9, **options)):
        by_weight = fa.accumulate(mlp_loss, params, batch, reducer=make(), num_microbatches=3)
        named = fa.accumulate(
            mlp_loss, params, batch, reducer=make(denominator="weight"), num_microbatches=3
        )
        fixed = fa.accumulate(
            mlp_loss, params, batch, reducer=make(denominator=24), num_microbatches=3
        )
        assert_trees_equal(named.grads, by_weight.grads)
        assert_trees_allclose(fixed.grads, fa.tree.scale(by_weight.grads, 0.5), rtol=1e-12, atol=0)


def test_batch_norm_in_training_mode_is_refused() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    with pytest.raises(
        fa.FuncaccumError, match=r"batch norm in training mode at \['1'\].*module.eval\(\)"
    ):
        fa.functional_model(model)
    fa.functional_model(model.eval())


@pytest.mark.parametrize("strategy", ["scan", "vmap"])
def test_a_detached_or_integer_loss_is_refused_not_a_zero_gradient(strategy: str) -> None:
    """Either would give all-zero gradients with no word; both are refused, on every path."""

    def detached(params: dict, batch: dict) -> torch.Tensor:
        return mlp_loss(params, batch).detach()

    def integer(params: dict, batch: dict) -> torch.Tensor:
        return (mlp_loss(params, batch) * 100).long()

    batch = classification_batch(8)
    with pytest.raises(fa.FuncaccumError, match="does not depend on the params"):
        fa.accumulate(detached, mlp_params(), batch, num_microbatches=2, strategy=strategy)
    with pytest.raises(fa.FuncaccumError, match=re.escape("returned a torch.int64 loss")):
        fa.accumulate(integer, mlp_params(), batch, num_microbatches=2, strategy=strategy)


def test_compute_dtype_must_be_a_floating_torch_dtype() -> None:
    message = r"compute_dtype must be .*'bfloat16'.*torch\.bfloat16"
    with pytest.raises(fa.FuncaccumError, match=message):
        fa.train_step(mlp_loss, optimizer=fa.optim.sgd(0.1), compute_dtype="bfloat16")
