"""The training step: exact metrics, the non-finite guard, schedules per step, mixed precision."""

from __future__ import annotations

import math
import re
from typing import Any

import optree
import pytest
import torch
from conftest import classification_batch, mlp_loss, mlp_params
from torch import nn
from torch.func import grad_and_value

import funcaccum as fa
from funcaccum import optim
from funcaccum.testing import assert_trees_allclose, assert_trees_equal


def test_metrics_report_the_whole_batch_not_the_last_microbatch() -> None:
    params, batch = mlp_params(), classification_batch(19)
    step = fa.train_step(
        mlp_loss,
        optimizer=optim.sgd(0.1),
        accumulation=fa.Accumulation(num_microbatches=4),
    )
    state, metrics = step(step.init(params), batch)
    grads, loss = grad_and_value(mlp_loss)(params, batch)
    torch.testing.assert_close(metrics.loss, loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(metrics.grad_norm, fa.tree.global_norm(grads), rtol=1e-10, atol=0)
    last = {k: v[-4:] for k, v in batch.items()}  # the last microbatch (sizes 5, 5, 5, 4)
    assert abs(metrics.loss - mlp_loss(params, last)) > 1e-3
    assert metrics.weight.item() == 19
    assert metrics.learning_rate.item() == 0.1
    assert not metrics.skipped
    assert_trees_allclose(
        state.params,
        optim.apply_updates(params, fa.tree.scale(grads, -0.1)),
        rtol=1e-10,
        atol=1e-14,
    )


def test_each_step_sees_only_its_own_gradient() -> None:
    """The missing zero_grad: here nothing carries over from one step to the next."""
    params, batch = mlp_params(), classification_batch(19)
    step = fa.train_step(
        mlp_loss,
        optimizer=optim.sgd(0.5),
        accumulation=fa.Accumulation(num_microbatches=4),
    )
    state = step.init(params)
    for _ in range(3):
        before = state.params
        state, metrics = step(state, batch)
        alone = fa.tree.global_norm(torch.func.grad(mlp_loss)(before, batch))
        torch.testing.assert_close(metrics.grad_norm, alone, rtol=1e-10, atol=0)
        expected = optim.apply_updates(
            before, fa.tree.scale(torch.func.grad(mlp_loss)(before, batch), -0.5)
        )
        assert_trees_allclose(state.params, expected, rtol=1e-10, atol=1e-13)


def poisoned(batch: dict) -> dict:
    x = batch["x"].clone()
    x[3, 1] = float("nan")
    return {"x": x, "y": batch["y"]}


def test_a_non_finite_step_changes_nothing_and_is_counted() -> None:
    params, batch = mlp_params(), classification_batch(16)
    step = fa.train_step(
        mlp_loss,
        optimizer=optim.adamw(1e-2),
        accumulation=fa.Accumulation(num_microbatches=4),
    )
    state, _ = step(step.init(params), batch)  # one good step, so the moments are nonzero
    after_nan, metrics = step(state, poisoned(batch))
    assert metrics.skipped
    assert_trees_equal(after_nan.params, state.params)
    assert_trees_equal(after_nan.opt_state, state.opt_state)
    assert (
        after_nan.step.item(),
        after_nan.skipped.item(),
        after_nan.consecutive_skips.item(),
    ) == (1, 1, 1)
    recovered, metrics = step(after_nan, batch)
    assert not metrics.skipped
    assert (
        recovered.step.item(),
        recovered.skipped.item(),
        recovered.consecutive_skips.item(),
    ) == (2, 1, 0)


def test_consecutive_non_finite_steps_stop_the_run() -> None:
    params, batch = mlp_params(), classification_batch(16)
    step = fa.train_step(mlp_loss, optimizer=optim.sgd(0.1), max_consecutive_skips=3)
    state = step.init(params)
    for _ in range(2):
        state, _ = step(state, poisoned(batch))
    with pytest.raises(
        fa.FuncaccumError, match=r"3 consecutive steps had a non-finite loss.*step 0"
    ):
        step(state, poisoned(batch))


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.compile)])
def test_a_non_finite_update_is_skipped_like_a_non_finite_gradient(compile: bool) -> None:
    """A NaN learning rate makes finite gradients into NaN params: the guard covers the update."""
    params, batch = mlp_params(), classification_batch(16)

    def rate(count: torch.Tensor) -> torch.Tensor:  # finite for step 0, NaN after
        return torch.where(count == 0, 0.1, float("nan")).to(torch.float64)

    step = fa.train_step(mlp_loss, optimizer=optim.sgd(rate), max_consecutive_skips=2,
                         compile=compile)  # fmt: skip
    state, _ = step(step.init(params), batch)
    after, metrics = step.step(state, batch)  # the pure step: skipped, nothing changed
    assert metrics.skipped
    assert torch.isfinite(metrics.grad_norm)
    assert_trees_equal(after.params, state.params)
    assert (after.step.item(), after.skipped.item()) == (1, 1)
    # Called, the step names the rate at once (check_skips reads it with the skip count).
    with pytest.raises(fa.FuncaccumError, match=r"learning_rate at optimizer step 1 is nan"):
        step(state, batch)


def test_the_schedule_moves_once_per_optimizer_step_whatever_the_microbatch_count() -> None:
    """The hand-written pitfall: a scheduler stepped per microbatch decays K times too fast."""
    params, batch = mlp_params(), classification_batch(32)
    schedule = optim.exponential_decay(0.1, 1, 0.5)
    rates = {}
    for k in (1, 8):
        step = fa.train_step(
            mlp_loss,
            optimizer=optim.sgd(schedule),
            accumulation=fa.Accumulation(num_microbatches=k),
        )
        state = step.init(params)
        rates[k] = []
        for _ in range(4):
            state, metrics = step(state, batch)
            rates[k].append(metrics.learning_rate.item())
    assert rates[1] == rates[8] == [0.1, 0.05, 0.025, 0.0125]
    # The hand-written mistake, for contrast: torch's scheduler stepped once per microbatch.
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    opt.step()
    for _ in range(8):  # one optimizer step's worth of microbatches
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**8)


def test_aux_reaches_the_metrics() -> None:
    params, batch = mlp_params(), classification_batch(12)

    def loss_fn(params: dict, batch: dict) -> tuple:
        return mlp_loss(params, batch), {"n": batch["y"].shape[0] * torch.ones(())}

    step = fa.train_step(
        loss_fn,
        optimizer=optim.sgd(0.1),
        accumulation=fa.Accumulation(microbatch_size=5, has_aux=True),
    )
    _, metrics = step(step.init(params), batch)
    assert metrics.aux["n"].tolist() == [5.0, 5.0, 2.0]


def train_losses(
    dtype: torch.dtype, compute_dtype: torch.dtype | None, steps: int = 60
) -> list[float]:
    params = mlp_params(dtype, sizes=(5, 32, 3))
    step = fa.train_step(
        mlp_loss,
        optimizer=optim.adam(1e-2),
        compute_dtype=compute_dtype,
        accumulation=fa.Accumulation(num_microbatches=4),
    )
    state = step.init(params)
    teacher = torch.randn(5, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    losses = []
    for i in range(steps):
        x = classification_batch(64, seed=i % 4)["x"]
        batch = {"x": x.to(compute_dtype or dtype), "y": (x @ teacher).argmax(-1)}
        state, metrics = step(state, batch)
        losses.append(metrics.loss.item())
    return losses


def test_bf16_runs_track_the_float32_run() -> None:
    """Documented tolerances (docs/concepts.md), measured on torch 2.11 and 2.13.

    With float32 master weights every loss stays within 0.02 of float32's.
    With the params themselves in bf16 each update is rounded to bf16, and how
    far the run drifts depends on the torch version's bf16 kernels (largest
    difference 0.005 on 2.13, 0.108 on 2.11); it still learns and ends close.
    """
    reference = train_losses(torch.float32, None)
    master = train_losses(torch.float32, torch.bfloat16)  # float32 master weights
    pure = train_losses(torch.bfloat16, None)  # bf16 params, float32 moments and sums
    assert reference[-1] < 0.5 * reference[0]  # it learns
    assert max(abs(a - b) for a, b in zip(master, reference, strict=True)) < 0.02
    assert pure[-1] < 0.5 * pure[0]
    assert abs(pure[-1] - reference[-1]) < 0.05
    assert sum(abs(a - b) for a, b in zip(pure, reference, strict=True)) / len(pure) < 0.05


def test_master_weights_stay_float32_and_moments_float32() -> None:
    step = fa.train_step(mlp_loss, optimizer=optim.adam(1e-2), compute_dtype=torch.bfloat16)
    state = step.init(mlp_params(torch.float32))
    batch = classification_batch(8)
    state, _ = step(state, {"x": batch["x"].bfloat16(), "y": batch["y"]})
    assert state.params["layer0"]["w"].dtype == torch.float32
    assert state.opt_state[0].mu["layer0"]["w"].dtype == torch.float32
    pure = fa.train_step(mlp_loss, optimizer=optim.adam(1e-2))
    state = pure.init(mlp_params(torch.bfloat16))
    state, _ = pure(state, {"x": batch["x"].bfloat16(), "y": batch["y"]})
    assert state.params["layer0"]["w"].dtype == torch.bfloat16
    assert state.opt_state[0].mu["layer0"]["w"].dtype == torch.float32


def test_options_are_checked() -> None:
    with pytest.raises(fa.FuncaccumError, match="GradientTransformation"):
        fa.train_step(mlp_loss, optimizer=torch.optim.SGD)
    with pytest.raises(fa.FuncaccumError, match="max_consecutive_skips must be an int >= 1"):
        fa.train_step(mlp_loss, optimizer=optim.sgd(0.1), max_consecutive_skips=0)
    step = fa.train_step(
        mlp_loss,
        optimizer=optim.sgd(0.1),
        accumulation=fa.Accumulation(num_microbatches=4),
    )
    with pytest.raises(fa.FuncaccumError, match="more than the batch's 3 examples"):
        step(step.init(mlp_params()), classification_batch(3))


def test_a_reducer_reporting_the_steps_own_figures_changes_none_of_them() -> None:
    """Stats travel apart from the step's figures: a reducer cannot stand in for the loss."""
    inner = fa.mean()
    loud = torch.tensor(123.0, dtype=torch.float64)
    names = ("loss", "grad_norm", "weight", "skipped", "learning_rate", "microbatches")

    def finalize(state: fa.extend.MeanState) -> tuple:
        grads, _ = inner.finalize(state)
        return grads, dict.fromkeys(names, loud)

    params, batch = mlp_params(), classification_batch(19)
    metrics = {}
    for name, reducer in (("mean", inner), ("reporting", inner._replace(finalize=finalize))):
        step = fa.train_step(
            mlp_loss,
            optimizer=optim.sgd(0.1),
            accumulation=fa.Accumulation(reducer=reducer, num_microbatches=4),
        )
        _, metrics[name] = step(step.init(params), batch)
    for name in names:
        assert torch.equal(getattr(metrics["reporting"], name), getattr(metrics["mean"], name))
    assert metrics["reporting"].stats["loss"] == 123.0  # reported as given, apart
    logged = metrics["reporting"].to_dict()
    assert logged["loss"] == metrics["mean"].loss
    assert logged["stats.loss"] == 123.0


def test_an_optax_style_three_argument_rule_trains_inside_chain() -> None:
    """optax writes update(updates, state, params=None); chain passes extras by keyword only."""

    def update(updates: dict, state: tuple, params: dict | None = None) -> tuple:
        return fa.tree.scale(updates, -0.1), state  # plain SGD, written as optax writes it

    optax_sgd = optim.GradientTransformation(lambda params: (), update)
    rule = optim.chain(optim.clip_by_global_norm(1e6), optax_sgd)
    params, batch = mlp_params(), classification_batch(16)
    ours = fa.train_step(
        mlp_loss, optimizer=rule, accumulation=fa.Accumulation(num_microbatches=4)
    )
    plain = fa.train_step(
        mlp_loss, optimizer=optim.sgd(0.1), accumulation=fa.Accumulation(num_microbatches=4)
    )
    a, b = ours.init(params), plain.init(params)
    for _ in range(3):
        a, _ = ours(a, batch)
        b, _ = plain(b, batch)
    assert_trees_allclose(a.params, b.params, rtol=1e-12, atol=1e-15)
    # Its own schedule clock cannot be driven by progress: refused, not silently ignored.
    with pytest.raises(fa.FuncaccumError, match="takes no such keyword"):
        fa.train_step(
            mlp_loss,
            optimizer=optax_sgd,
            schedule_clock="progress",
            accumulation=fa.Accumulation(reducer=fa.adaptive()),
        )


def test_float16_is_refused_for_want_of_loss_scaling() -> None:
    """float16 flushes small gradients to zero; without loss scaling the step would apply it."""
    refused = re.escape("compute_dtype=torch.float16 needs loss scaling")
    with pytest.raises(fa.FuncaccumError, match=refused):
        fa.train_step(mlp_loss, optimizer=optim.sgd(0.1), compute_dtype=torch.float16)
    step = fa.train_step(mlp_loss, optimizer=optim.sgd(0.1))
    with pytest.raises(fa.FuncaccumError, match=r"params\['layer0'\]\['b'\] is float16"):
        step.init(mlp_params(torch.float16))


def bn_step(strategy: Any = "scan", compute_dtype: torch.dtype | None = None) -> tuple:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    apply, params, buffers = fa.functional_model(model, has_state=True)

    def loss_fn(params: dict, state: dict, batch: dict) -> tuple:
        logits, state = apply(params, state, batch["x"].to(params["0.weight"].dtype))
        return nn.functional.cross_entropy(logits.float(), batch["y"]), state

    if strategy == "vmap":
        strategy = fa.vmap(model_state=fa.running_stats(model))
    step = fa.train_step(loss_fn, optimizer=optim.sgd(0.1), compute_dtype=compute_dtype,
                         accumulation=fa.Accumulation(num_microbatches=2, has_state=True,
                                                      strategy=strategy))  # fmt: skip
    return step, params, buffers


@pytest.mark.parametrize("strategy", ["scan", "vmap"])
def test_bf16_compute_runs_batch_norm_with_its_state_kept_float32(strategy: str) -> None:
    """The model state is cast for the loss as the params are, and kept in its own dtype."""
    batch = classification_batch(16, dtype=torch.float32)
    runs = {}
    for dtype in (None, torch.bfloat16):
        step, params, buffers = bn_step(strategy, dtype)
        state, metrics = step(step.init(params, model_state=buffers), batch)
        assert not metrics.skipped
        assert all(v.dtype == buffers[k].dtype for k, v in state.model_state.items())
        runs[dtype] = state.model_state["1.running_mean"]
    assert (runs[None] - runs[torch.bfloat16]).abs().max() < 0.02  # bf16 rounding
    assert (runs[None] - buffers["1.running_mean"]).abs().max() > 0.01  # it moved


def test_a_model_state_that_is_not_finite_is_refused_at_init_and_never_kept() -> None:
    step, params, buffers = bn_step()
    with pytest.raises(fa.FuncaccumError, match=r"model_state\['1.running_var'\] holds NaN or Inf"):
        step.init(params, model_state={**buffers, "1.running_var": torch.full((8,), math.inf)})
    state = step.init(params, model_state=buffers)
    huge = {"x": torch.randn(8, 5) * 1e20, "y": torch.zeros(8, dtype=torch.long)}  # var: Inf
    after, metrics = step.step(state, huge)
    assert metrics.skipped
    assert torch.isfinite(metrics.loss)  # the loss alone looked fine
    assert_trees_equal(after.model_state, state.model_state)


@pytest.mark.parametrize(
    ("schedule", "words"),
    [
        (optim.constant_schedule(-0.1), r"learning_rate \(the schedule's value at step 0\) must be >= 0"),  # noqa: E501
        (optim.linear_schedule(0.1, -0.1, 4), "learning_rate at optimizer step 3 is -0.05"),
        (lambda count: torch.where(count < 2, 0.1, math.nan).double(), "step 2 is nan"),
        (lambda count: torch.full((3,), 0.1), "must return a number or a 0-d real tensor"),
    ],
    ids=["negative", "crossing-zero", "nan-later", "a-vector"],
)
def test_a_schedule_that_gives_no_learning_rate_is_refused(schedule: Any, words: str) -> None:
    """sgd(-0.1) was refused, and so is a schedule that gets there (never an ascent step)."""
    step = fa.train_step(mlp_loss, optimizer=optim.sgd(schedule))
    batch = classification_batch(8)
    states = []

    def train() -> None:
        states.append(step.init(mlp_params()))
        for _ in range(5):
            state, metrics = step(states[-1], batch)
            assert metrics.learning_rate >= 0
            states.append(state)

    with pytest.raises(fa.FuncaccumError, match=words):
        train()
    if len(states) > 1:  # refused at a later step: that step, run pure, was skipped
        after, metrics = step.step(states[-1], batch)
        assert metrics.skipped
        assert torch.equal(after.step, states[-1].step)


def test_a_state_another_step_made_is_refused() -> None:
    plain = fa.train_step(mlp_loss, optimizer=optim.sgd(0.1))
    adaptive = fa.train_step(mlp_loss, optimizer=optim.sgd(0.1),
                             accumulation=fa.Accumulation(reducer=fa.adaptive()))  # fmt: skip
    with pytest.raises(fa.FuncaccumError, match=r"reducer_carry is .* carries a AdaptiveCarry"):
        adaptive(plain.init(mlp_params()), classification_batch(8))
    step, params, _ = bn_step()
    no_state = re.escape("has_state=True, and state.model_state holds no")
    with pytest.raises(fa.FuncaccumError, match=no_state):
        step(plain.init(params), classification_batch(8, dtype=torch.float32))
    with pytest.raises(fa.FuncaccumError, match=r"TrainState .* \(the arguments are \(state, batch\)\)"):  # noqa: E501
        plain(classification_batch(8), plain.init(mlp_params()))


@pytest.mark.parametrize(
    ("weight", "words"),
    [
        (lambda b: torch.where(b["y"][0] >= 0, -1.0, 1.0), "summed weight is nan"),  # negative
        (lambda b: torch.zeros(()), "summed weight is 0"),
        (lambda b: torch.full((), math.nan), "summed weight is nan"),
        (lambda b: torch.ones((), dtype=torch.bool), "is a torch.bool tensor"),
        (lambda b: "4", "must be a number or a 0-d real tensor"),
    ],
    ids=["negative", "all-zero", "nan", "bool", "str"],
)
def test_weights_that_make_no_mean_are_refused(weight: Any, words: str) -> None:
    def loss_fn(params: dict, batch: dict) -> tuple:
        return mlp_loss(params, batch), weight(batch)

    accumulation = fa.Accumulation(num_microbatches=2, has_weight=True)
    step = fa.train_step(loss_fn, optimizer=optim.sgd(0.1), accumulation=accumulation)
    with pytest.raises(fa.FuncaccumError, match=words):
        step(step.init(mlp_params()), classification_batch(8))
    with pytest.raises(fa.FuncaccumError, match=words.replace("the step's ", "")):
        fa.accumulate(loss_fn, mlp_params(), classification_batch(8), has_weight=True,
                      num_microbatches=2)  # fmt: skip


def test_updates_not_shaped_like_the_params_are_refused() -> None:
    def update(updates: dict, state: tuple, params: Any = None) -> tuple:
        layer = {**updates["layer0"], "w": updates["layer0"]["w"][None]}
        return {**updates, "layer0": layer}, state

    step = fa.train_step(mlp_loss, optimizer=optim.GradientTransformation(lambda p: (), update))
    with pytest.raises(fa.FuncaccumError, match=r"returned \(1, 5, 16\) for params\['layer0'\]\['w'\]"):  # noqa: E501
        step(step.init(mlp_params()), classification_batch(8))


@pytest.mark.parametrize("rule", [optim.sgd(0.1, momentum=0.9), optim.adamw(0.1), optim.lion(0.1),
                                  optim.adam(optim.cosine_decay_schedule(0.1, 5))])  # fmt: skip
def test_a_0d_param_keeps_its_dtype_and_its_state_the_init_dtypes(rule: Any) -> None:
    """torch promotes a 0-d float32 tensor times a 0-d float64 hyperparameter to float64."""
    params = {"w": torch.zeros(3), "scale": torch.ones(())}  # a learnable 0-d scale

    def loss_fn(params: dict, batch: torch.Tensor) -> torch.Tensor:
        return ((batch @ params["w"]) * params["scale"] - 1).pow(2).mean()

    step = fa.train_step(loss_fn, optimizer=rule)
    fresh = step.init(params)
    state, _ = step(fresh, torch.randn(8, 3))
    state, _ = step(state, torch.randn(8, 3))
    assert [x.dtype for x in optree.tree_leaves(state)] == [
        x.dtype for x in optree.tree_leaves(fresh)
    ]
