"""The training step: exact metrics, the non-finite guard, schedules per step, mixed precision."""

from __future__ import annotations

import pytest
import torch
from conftest import classification_batch, mlp_loss, mlp_params
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
