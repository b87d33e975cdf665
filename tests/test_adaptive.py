"""The adaptive-step reducer: exact algebra, unbiased statistics, limits, and the controllers."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import sequence_batch, sequence_params, token_weighted_loss
from torch.func import grad

import funcaccum as fa
from funcaccum.testing import assert_trees_allclose

STRATEGIES = [
    pytest.param({"strategy": "vmap"}, id="vmap"),
    pytest.param({"strategy": "scan"}, id="scan"),
    pytest.param({"strategy": fa.chunked(3)}, id="chunked3"),
]
RAW = ("noise_trace", "grad_sq", "noise_scale", "step_scale", "efficiency", "suggested_k", "ready")


def quadratic_loss(params: dict, batch: torch.Tensor) -> torch.Tensor:
    """0.5 |w - x|^2: per-example gradient w - x, so G = w - mu and Sigma = Cov(x)."""
    return 0.5 * torch.sum((params["w"] - batch) ** 2, dim=-1).mean()


def token_stats(**options: object) -> fa.Accumulated:
    """Unequal microbatch weights: token counts."""
    return fa.accumulate(
        token_weighted_loss, sequence_params(), sequence_batch(13), reducer=fa.adaptive(),
        num_microbatches=6, has_weight=True, **options,
    )  # fmt: skip


@pytest.mark.parametrize("options", STRATEGIES)
def test_every_strategy_gives_the_same_statistics(options: dict) -> None:
    reference = token_stats(strategy="scan")
    result = token_stats(**options)
    assert_trees_allclose(
        {k: getattr(result.stats, k) for k in RAW},
        {k: getattr(reference.stats, k) for k in RAW},
        rtol=1e-12,
        atol=1e-12,
    )
    exact = fa.accumulate(
        token_weighted_loss,
        sequence_params(),
        sequence_batch(13),
        num_microbatches=6,
        has_weight=True,
    )
    assert_trees_allclose(
        result.grads, exact.grads, rtol=1e-12, atol=1e-15
    )  # the gradient is mean's


def test_merged_parts_and_permuted_microbatches_give_the_same_statistics() -> None:
    params, batch = sequence_params(), sequence_batch(12)
    acc = fa.Accumulation(reducer=fa.adaptive(), microbatch_size=2, has_weight=True)

    def fold(part: dict) -> fa.extend.FoldState:
        return acc.fold(token_weighted_loss, params, part)

    whole = acc.finalize(fold(batch))
    merged = acc.finalize(
        acc.merge(
            fold({k: v[:6] for k, v in batch.items()}), fold({k: v[6:] for k, v in batch.items()})
        )
    )
    order = torch.tensor([4, 1, 5, 0, 3, 2])  # permute whole microbatches of 2
    permuted = {k: v.view(6, 2, *v.shape[1:])[order].flatten(0, 1) for k, v in batch.items()}
    shuffled = acc.finalize(fold(permuted))
    for other in (merged, shuffled):
        assert_trees_allclose(
            {k: getattr(other.stats, k) for k in RAW},
            {k: getattr(whole.stats, k) for k in RAW},
            rtol=1e-12,
            atol=1e-12,
        )
        assert_trees_allclose(other.grads, whole.grads, rtol=1e-12, atol=1e-15)


def test_monte_carlo_estimates_are_unbiased_and_the_naive_ones_are_not() -> None:
    """4000 replicates of a quadratic with known answers, microbatches of sizes 1, 2, 3, 5, 9."""
    replicates, sizes, d = 4000, (1, 2, 3, 5, 9), 4
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([0.3, -0.2, 0.1, 0.25], dtype=torch.float64)
    scales = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)  # Sigma = diag(scales^2)
    true_trace, w = float((scales**2).sum()), torch.zeros(d, dtype=torch.float64)
    true_grad_sq = float(((w - mu) ** 2).sum())
    x = mu + scales * torch.randn(replicates, sum(sizes), d, generator=g, dtype=torch.float64)
    reducer = fa.adaptive()

    def estimates(sample: torch.Tensor) -> torch.Tensor:
        state, start = reducer.init({"w": w}), 0
        for size in sizes:
            unit = sample[start : start + size]
            state = reducer.update(
                state, grad(quadratic_loss)({"w": w}, unit), torch.tensor(float(size))
            )
            start += size
        trace, grad_sq = fa.extend.noise_statistics(state)
        k, n = len(sizes), sum(sizes)
        scatter = trace * (k - 1)
        return torch.stack([trace, grad_sq, scatter / k, grad_sq + trace / n])

    trace, grad_sq, trace_over_k, mean_sq = torch.vmap(estimates)(x).unbind(-1)

    def z_score(samples: torch.Tensor, truth: float) -> float:
        return abs(samples.mean().item() - truth) / (samples.std().item() / math.sqrt(replicates))

    assert z_score(trace, true_trace) < 4
    assert z_score(grad_sq, true_grad_sq) < 4
    assert z_score(trace_over_k, true_trace) > 4  # Q / k is biased by (k - 1) / k
    assert z_score(mean_sq, true_grad_sq) > 4  # |g_bar|^2 is biased by tr(Sigma) / n


def test_scaling_the_loss_leaves_noise_scale_and_step_scale_unchanged() -> None:
    params, batch = (
        {"w": torch.zeros(3, dtype=torch.float64)},
        torch.randn(40, 3, dtype=torch.float64) + 1,
    )

    def scaled(params: dict, batch: torch.Tensor) -> torch.Tensor:
        return 7.5 * quadratic_loss(params, batch)

    plain = fa.accumulate(
        quadratic_loss, params, batch, reducer=fa.adaptive(), num_microbatches=8
    ).stats
    scaled_stats = fa.accumulate(
        scaled, params, batch, reducer=fa.adaptive(), num_microbatches=8
    ).stats
    for key in ("noise_scale", "step_scale", "suggested_k"):
        torch.testing.assert_close(
            getattr(scaled_stats, key), getattr(plain, key), rtol=1e-10, atol=0
        )
    torch.testing.assert_close(
        scaled_stats.noise_trace, 7.5**2 * plain.noise_trace, rtol=1e-10, atol=0
    )


def test_no_noise_gives_step_scale_one_and_no_gradient_gives_n_over_base() -> None:
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    identical = torch.ones(32, 3, dtype=torch.float64)  # Sigma = 0
    stats = fa.accumulate(
        quadratic_loss, params, identical, reducer=fa.adaptive(), num_microbatches=8
    ).stats
    assert stats.step_scale.item() == pytest.approx(1.0, abs=1e-12)
    half = torch.randn(16, 3, dtype=torch.float64)
    centred = torch.cat([half, -half])  # the batch mean is exactly w: G = 0 in the sample
    reducer = fa.adaptive(base_batch_size=2.0)
    stats = fa.accumulate(
        quadratic_loss, params, centred, reducer=reducer, num_microbatches=8
    ).stats
    assert stats.step_scale.item() == pytest.approx(32 / 2.0, rel=1e-12)
    assert stats.suggested_k.item() == 64  # no gradient signal: the most microbatches


def test_step_scale_stays_between_one_and_n_over_base() -> None:
    g = torch.Generator().manual_seed(1)
    params = {"w": torch.zeros(5, dtype=torch.float64)}
    for trial in range(50):
        shift = torch.randn(5, generator=g, dtype=torch.float64) * trial / 25
        batch = torch.randn(48, 5, generator=g, dtype=torch.float64) * (1 + trial % 3) + shift
        reducer = fa.adaptive(base_batch_size=4.0)
        r = fa.accumulate(
            quadratic_loss, params, batch, reducer=reducer, num_microbatches=12
        ).stats.step_scale
        assert 1 - 1e-12 <= r.item() <= 48 / 4.0 + 1e-12


def isotropic_stream(steps: int, n: int, d: int, g: torch.Generator) -> list[torch.Tensor]:
    """x ~ N(mu, I_d) with |mu| = 1 and w = 0: tr(Sigma) = d, |G|^2 = 1, B = d."""
    mu = torch.full((d,), 1 / math.sqrt(d), dtype=torch.float64)
    return [mu + torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(steps)]


def test_suggested_k_reaches_the_norm_test_fixed_point() -> None:
    """B = 16, per-example microbatches, theta = 0.5: the answer is ceil(16 / 0.25) = 64."""
    d, k = 16, 64
    reducer = fa.adaptive(theta=0.5, k_max=128, decay=0.9999)
    step = fa.train_step(
        quadratic_loss,
        optimizer=fa.optim.sgd(0.0),
        accumulation=fa.Accumulation(reducer=reducer, num_microbatches=k, strategy="vmap"),
    )  # a zero learning rate holds the params at a fixed point
    state = step.init({"w": torch.zeros(d, dtype=torch.float64)})
    for batch in isotropic_stream(600, k, d, torch.Generator().manual_seed(2)):
        state, metrics = step(state, batch)
    assert metrics.stats.noise_scale.item() == pytest.approx(16.0, rel=0.1)
    assert metrics.stats.suggested_k.item() == pytest.approx(64, rel=0.1)


def test_the_predictive_controller_settles_on_the_suggested_k() -> None:
    """B = 18, microbatches of 4, theta = 1: ceil(18 / 4) = 5 microbatches per step."""
    d, m = 18, 4
    step = fa.train_step(
        quadratic_loss,
        optimizer=fa.optim.sgd(0.0),
        accumulation=fa.Accumulation(reducer=fa.adaptive(k_max=16)),
    )
    runner = fa.AdaptiveBatching(step)
    state = step.init({"w": torch.zeros(d, dtype=torch.float64)})
    microbatches = iter(isotropic_stream(3000, m, d, torch.Generator().manual_seed(3)))
    ks = []
    for _ in range(300):
        state, metrics = runner(state, microbatches)
        ks.append(int(metrics.microbatches))
    assert ks[0] == 2  # k_min until there are statistics
    assert ks[-50:] == [5] * 50


def test_the_sequential_controller_stops_when_ready_or_at_k_max() -> None:
    step = fa.train_step(
        quadratic_loss,
        optimizer=fa.optim.sgd(0.0),
        accumulation=fa.Accumulation(reducer=fa.adaptive(theta=0.5, k_max=12)),
    )
    runner = fa.AdaptiveBatching(step, controller="sequential")
    state = step.init({"w": torch.zeros(8, dtype=torch.float64)})
    microbatches = iter(isotropic_stream(2000, 4, 8, torch.Generator().manual_seed(4)))
    for _ in range(40):
        state, metrics = runner(state, microbatches)
        assert 2 <= metrics.microbatches <= 12
        assert bool(metrics.stats.ready) or metrics.microbatches == 12


def test_adaptive_batching_stops_after_too_many_non_finite_steps() -> None:
    step = fa.train_step(
        quadratic_loss,
        optimizer=fa.optim.sgd(0.1),
        max_consecutive_skips=2,
        accumulation=fa.Accumulation(reducer=fa.adaptive(k_max=2)),
    )
    runner = fa.AdaptiveBatching(step)
    start = step.init({"w": torch.zeros(2, dtype=torch.float64)})
    poisoned = iter(torch.full((10, 3, 2), torch.nan, dtype=torch.float64))
    state, metrics = runner(start, poisoned)
    assert bool(metrics.skipped)
    assert torch.equal(state.params["w"], start.params["w"])
    with pytest.raises(fa.FuncaccumError, match="2 consecutive steps had a non-finite loss"):
        runner(state, poisoned)


def test_a_short_iterator_gives_a_partial_last_step_then_stops() -> None:
    reducer = fa.adaptive(k_min=3, k_max=3)
    step = fa.train_step(
        quadratic_loss,
        optimizer=fa.optim.sgd(0.1),
        accumulation=fa.Accumulation(reducer=reducer),
    )
    runner = fa.AdaptiveBatching(step)
    state = step.init({"w": torch.zeros(2, dtype=torch.float64)})
    microbatches = iter(torch.randn(4, 5, 2, dtype=torch.float64))
    state, metrics = runner(state, microbatches)
    assert int(metrics.microbatches) == 3
    state, metrics = runner(state, microbatches)
    assert int(metrics.microbatches) == 1
    assert metrics.weight.item() == 5
    with pytest.raises(fa.FuncaccumError, match="iterator is exhausted"):
        runner(state, microbatches)


def test_train_step_multiplies_the_step_scale_into_the_update() -> None:
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    batch = torch.randn(64, 3, dtype=torch.float64) * 2 + 1
    step = fa.train_step(
        quadratic_loss,
        optimizer=fa.optim.sgd(0.1),
        accumulation=fa.Accumulation(reducer=fa.adaptive(), num_microbatches=8),
    )
    state, metrics = step(step.init(params), batch)
    g = grad(quadratic_loss)(params, batch)["w"]
    r = metrics.stats.step_scale
    assert r.item() > 1
    torch.testing.assert_close(state.params["w"], -0.1 * r * g, rtol=1e-12, atol=1e-15)
    assert metrics.stats.progress.item() == 0
    assert state.reducer_carry.progress.item() == pytest.approx(r.item())


def test_a_schedule_can_run_on_progress() -> None:
    schedule = fa.optim.linear_schedule(1.0, 0.0, 100)
    step = fa.train_step(
        quadratic_loss,
        optimizer=fa.optim.sgd(schedule),
        schedule_clock="progress",
        accumulation=fa.Accumulation(reducer=fa.adaptive(), num_microbatches=8),
    )  # fmt: skip
    state = step.init({"w": torch.zeros(3, dtype=torch.float64)})
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        state, metrics = step(state, torch.randn(64, 3, generator=g, dtype=torch.float64) * 3 + 1)
        assert metrics.learning_rate.item() == pytest.approx(
            schedule(metrics.stats.progress).item()
        )
    assert state.reducer_carry.progress.item() > 5  # tau outruns the step count when r > 1
    # Refused when the step is built, not at its first call.
    with pytest.raises(fa.FuncaccumError, match="needs a reducer whose carry controls progress"):
        fa.train_step(quadratic_loss, optimizer=fa.optim.sgd(schedule), schedule_clock="progress")


def test_a_statistic_named_like_a_control_field_changes_nothing() -> None:
    """Stats are reported only: a reducer reporting step_scale=100 does not scale the step."""
    inner = fa.mean()

    def finalize(state: fa.extend.MeanState) -> tuple:
        grads, _ = inner.finalize(state)
        loud = torch.tensor(100.0, dtype=torch.float64)
        return grads, {"step_scale": loud, "progress": loud, "suggested_k": loud}

    reporting = inner._replace(finalize=finalize)
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    batch = torch.randn(16, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    runs = []
    for reducer in (inner, reporting):
        step = fa.train_step(
            quadratic_loss,
            optimizer=fa.optim.sgd(0.1),
            accumulation=fa.Accumulation(reducer=reducer, num_microbatches=4),
        )
        state = step.init(params)
        for _ in range(3):
            state, metrics = step(state, batch)
        runs.append((state.params, metrics))
    assert runs[1][1].stats["step_scale"].item() == 100.0  # reported as given ...
    assert torch.equal(runs[0][0]["w"], runs[1][0]["w"])  # ... and the step is mean's, bit for bit
    assert torch.isfinite(runs[1][0]["w"]).all()
    assert runs[1][0]["w"].abs().sum() > 0


def test_options_are_checked() -> None:
    with pytest.raises(fa.FuncaccumError, match="theta must be > 0"):
        fa.adaptive(theta=0)
    with pytest.raises(fa.FuncaccumError, match="2 <= k_min <= k_max"):
        fa.adaptive(k_min=1)
    with pytest.raises(fa.FuncaccumError, match="decay must be in"):
        fa.adaptive(decay=1.0)
    with pytest.raises(fa.FuncaccumError, match="reducer=adaptive"):
        fa.AdaptiveBatching(fa.train_step(quadratic_loss, optimizer=fa.optim.sgd(0.1)))
