"""funcaccum.privacy and the noised clipped_mean: the unit, accounting, Poisson sampling."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import optree
import pytest
import torch
from conftest import (
    classification_batch,
    mlp_loss,
    mlp_params,
    sequence_batch,
    sequence_params,
    token_losses,
)

import funcaccum as fa
from funcaccum import privacy
from funcaccum.testing import assert_trees_allclose, assert_trees_equal

pytest.importorskip("dp_accounting", reason="accounting needs the privacy extra")

ABADI = privacy.Accounting(dataset_size=60000, sample_rate=256 / 60000, delta=1e-5)


def noised(max_norm: float = 0.5, seed: int = 0, **options: object) -> fa.extend.Reducer:
    return fa.clipped_mean(
        max_norm,
        noise_multiplier=1.0,
        denominator=options.pop("denominator", 8),
        generator=torch.Generator().manual_seed(seed),
        **options,  # type: ignore[arg-type]
    )


# The unit and its sensitivity.


@pytest.mark.parametrize(
    ("split", "shown"),
    [
        ({"microbatch_size": 4}, "got microbatch_size=4"),
        ({"num_microbatches": 2}, "got num_microbatches=2"),
        ({}, "got no split"),
    ],
)
def test_microbatches_of_several_examples_are_refused_for_a_per_example_unit(
    split: dict, shown: str
) -> None:
    """With microbatch_size=4 and a mean loss, one example moved the noised sum by 4C."""
    with pytest.raises(fa.FuncaccumError, match=f"microbatch_size=1; {shown}"):
        fa.Accumulation(reducer=noised(), **split)
    fa.Accumulation(reducer=noised(), microbatch_size=1)  # one example per microbatch: fine
    fa.Accumulation(reducer=fa.clipped_mean(0.5), microbatch_size=4)  # no noise: no unit


def token_loss(params: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean over a microbatch's valid tokens, and their count as its weight."""
    mask = batch["mask"].to(params["out"].dtype)
    return (token_losses(params, batch) * mask).sum() / mask.sum(), mask.sum()


def clipped_sum(reducer: fa.extend.Reducer, batch: dict, **options: object) -> dict:
    """The clipped sum the noise is added to (the reducer's state before finalize)."""
    accumulation = fa.Accumulation(reducer=reducer, has_weight=True, **options)
    return accumulation.fold(token_loss, sequence_params(), batch).reducer.clipped_sum


def test_one_weighted_unit_moves_the_clipped_sum_by_at_most_the_sensitivity() -> None:
    """A unit of many tokens is one unit: its weight does not multiply its clipped gradient."""
    max_norm = 0.05  # below every example's gradient norm: each is clipped to exactly C
    reducer = noised(max_norm)
    batch = sequence_batch(9, length=7)
    without = {k: v[:8] for k, v in batch.items()}  # the neighbour: one example removed
    assert batch["mask"][8].sum() > 1  # the example removed has several valid tokens
    big, small = (
        clipped_sum(reducer, batch, microbatch_size=1),
        clipped_sum(reducer, without, microbatch_size=1),
    )
    moved = fa.tree.global_norm(fa.tree.sub(big, small))
    assert reducer.privacy.sensitivity() == max_norm
    torch.testing.assert_close(moved, torch.tensor(max_norm, dtype=moved.dtype))
    # Without noise the weight is kept, as a weighted mean needs: tokens times C.
    plain = fa.clipped_mean(max_norm)
    weighted = fa.tree.global_norm(
        fa.tree.sub(
            clipped_sum(plain, batch, microbatch_size=1),
            clipped_sum(plain, without, microbatch_size=1),
        )
    )
    torch.testing.assert_close(weighted, batch["mask"][8].sum().double() * max_norm)


def test_a_model_state_updated_without_noise_is_refused() -> None:
    with pytest.raises(fa.FuncaccumError, match="running statistics is updated from the data"):
        fa.Accumulation(reducer=noised(), microbatch_size=1, has_state=True)


def test_a_fixed_group_is_one_unit_and_a_cut_group_is_refused() -> None:
    reducer = noised(0.05, unit="microbatch")
    with pytest.raises(fa.FuncaccumError, match="give microbatch_size=m"):
        fa.Accumulation(reducer=reducer, num_microbatches=2)
    batch = sequence_batch(12, length=7)
    without = {k: v[:8] for k, v in batch.items()}  # one group of 4 removed
    moved = fa.tree.global_norm(
        fa.tree.sub(
            clipped_sum(reducer, batch, microbatch_size=4),
            clipped_sum(reducer, without, microbatch_size=4),
        )
    )
    torch.testing.assert_close(moved, torch.tensor(0.05, dtype=moved.dtype))
    with pytest.raises(fa.FuncaccumError, match="holds 10, not a multiple: a group was cut"):
        clipped_sum(reducer, {k: v[:10] for k, v in batch.items()}, microbatch_size=4)


def test_the_mechanism_reports_its_unit_sensitivity_and_noise() -> None:
    mechanism = fa.clipped_mean(
        0.5, noise_multiplier=1.5, denominator=64, unit="microbatch"
    ).privacy
    assert isinstance(mechanism, privacy.GaussianMechanism)
    assert (mechanism.unit, mechanism.denominator) == ("microbatch", 64.0)
    assert mechanism.sensitivity() == 0.5
    assert mechanism.sensitivity("add_or_remove_one") == 0.5
    assert mechanism.sensitivity("replace_one") == 1.0
    assert mechanism.noise_std == 0.75
    assert fa.clipped_mean(0.5).privacy is None
    with pytest.raises(fa.FuncaccumError, match="adjacency must be one of"):
        mechanism.sensitivity("swap")  # type: ignore[arg-type]


def test_noise_needs_a_fixed_denominator_and_accounting_needs_noise() -> None:
    with pytest.raises(fa.FuncaccumError, match="must be a fixed number"):
        fa.clipped_mean(1.0, noise_multiplier=1.0, denominator="weight")
    with pytest.raises(fa.FuncaccumError, match="accounting= keeps a privacy ledger of a noised"):
        fa.clipped_mean(1.0, accounting=ABADI)
    with pytest.raises(fa.FuncaccumError, match="unit must be one of"):
        fa.clipped_mean(1.0, noise_multiplier=1.0, denominator=8, unit="user")  # type: ignore[arg-type]
    with pytest.raises(fa.FuncaccumError, match=r"accounting must be a funcaccum\.privacy"):
        fa.clipped_mean(1.0, noise_multiplier=1.0, accounting=(60000, 0.01, 1e-5))  # type: ignore[arg-type]
    with pytest.raises(fa.FuncaccumError, match="sample_rate must be in"):
        fa.clipped_mean(1.0, noise_multiplier=1.0, accounting=ABADI._replace(sample_rate=0.0))
    with pytest.raises(fa.FuncaccumError, match="delta must be in"):
        fa.clipped_mean(1.0, noise_multiplier=1.0, accounting=ABADI._replace(delta=1.0))
    # The fixed denominator is the accounting's expected batch size unless given.
    assert fa.clipped_mean(1.0, noise_multiplier=1.0, accounting=ABADI).privacy.denominator == 256


# Steps: empty batches, the ledger, skipped steps.


def dp_step(reducer: fa.extend.Reducer, lr: float = 0.1) -> fa.TrainStep:
    return fa.train_step(
        mlp_loss,
        optimizer=fa.optim.sgd(lr),
        accumulation=fa.Accumulation(reducer=reducer, microbatch_size=1),
    )


def test_an_empty_batch_takes_a_noise_only_step() -> None:
    """DP-SGD adds noise on every step: with an empty Poisson batch, noise is the step."""
    sigma, max_norm, denominator, lr = 1.3, 0.5, 8.0, 0.1
    step = dp_step(
        fa.clipped_mean(
            max_norm, noise_multiplier=sigma, denominator=denominator,
            generator=torch.Generator().manual_seed(3), accounting=ABADI,
        ), lr
    )  # fmt: skip
    state = step.init(mlp_params())
    empty = {k: v[:0] for k, v in classification_batch(4).items()}
    new, metrics = step(state, empty)
    assert not metrics.skipped
    assert int(new.step) == 1
    assert int(metrics.weight) == 0
    replay = torch.Generator().manual_seed(3)  # the same draws, leaf by leaf, in tree order
    noise = optree.tree_map(
        lambda p: sigma * max_norm * torch.randn(p.shape, generator=replay, dtype=p.dtype),
        state.params,
    )
    want = fa.tree.sub(state.params, fa.tree.scale(noise, lr / denominator))
    assert_trees_allclose(new.params, want, rtol=0, atol=1e-15)
    assert int(new.reducer_carry.steps) == 1  # an empty step is a step of the mechanism
    # Elsewhere an empty batch is still an error.
    plain = fa.train_step(mlp_loss, optimizer=fa.optim.sgd(lr))
    with pytest.raises(fa.FuncaccumError, match="the batch is empty"):
        plain(plain.init(mlp_params()), empty)


def test_the_ledger_counts_optimizer_steps_skipped_ones_included() -> None:
    """Once per optimizer step: never per microbatch (8 per step here)."""
    reducer = fa.clipped_mean(
        0.5, noise_multiplier=1.0, accounting=ABADI, generator=torch.Generator().manual_seed(0)
    )
    step = dp_step(reducer)
    state = step.init(mlp_params())
    assert state.reducer_carry == ABADI.ledger(1.0)
    for i in range(3):
        state, metrics = step(state, classification_batch(8, seed=i))
        assert int(metrics.microbatches) == 8
    assert isinstance(metrics.stats, privacy.PrivateStats)
    assert_trees_equal(metrics.stats.privacy, state.reducer_carry)
    assert int(state.reducer_carry.steps) == 3
    assert metrics.to_dict()["privacy.steps"] == 3  # logged flat, by dotted name
    bad = classification_batch(8, seed=5)
    bad["x"][2] = float("nan")  # a NaN example: the step is skipped...
    state, metrics = step(state, bad)
    assert bool(metrics.skipped)
    assert int(state.step) == 3
    assert int(state.skipped) == 1
    # ...but its noise was drawn on sampled data, and whether it was skipped is an output.
    assert int(state.reducer_carry.steps) == 4
    assert privacy.epsilon(state.reducer_carry) == pytest.approx(
        privacy.epsilon(ABADI.ledger(1.0, 4)), rel=0, abs=0
    )


def test_resume_with_the_ledger_is_bit_identical_and_epsilon_continues(tmp_path: Path) -> None:
    def make() -> tuple[fa.TrainStep, torch.Generator]:
        generator = torch.Generator().manual_seed(7)
        reducer = fa.clipped_mean(0.5, noise_multiplier=1.1, accounting=ABADI, generator=generator)
        return dp_step(reducer), generator

    step, noise = make()
    state = step.init(mlp_params())
    for i in range(6):
        state, _ = step(state, classification_batch(8, seed=i))
        if i == 2:
            fa.save(tmp_path / "ckpt.pt", state, generators={"noise": noise})
    uninterrupted = state
    step, noise = make()  # a fresh process: the same configuration, a fresh generator
    loaded = fa.load(
        tmp_path / "ckpt.pt", like=step.init(mlp_params()), generators={"noise": noise}
    )
    assert int(loaded.state.reducer_carry.steps) == 3
    assert privacy.epsilon(loaded.state.reducer_carry) == privacy.epsilon(ABADI.ledger(1.1, 3))
    state = loaded.state
    for i in range(loaded.batches_consumed, 6):
        state, _ = step(state, classification_batch(8, seed=i))
    assert_trees_equal(state, uninterrupted)  # params, optimizer state and ledger, bit for bit
    assert privacy.epsilon(state.reducer_carry) == privacy.epsilon(ABADI.ledger(1.1, 6))


def test_a_ledger_stepped_under_another_configuration_is_refused() -> None:
    first = dp_step(fa.clipped_mean(0.5, noise_multiplier=1.1, accounting=ABADI))
    state, _ = first(first.init(mlp_params()), classification_batch(8))
    other = dp_step(fa.clipped_mean(0.5, noise_multiplier=2.0, accounting=ABADI))
    state, _ = other(state, classification_batch(8, seed=1))  # a checkpoint resumed with new sigma
    assert int(state.reducer_carry.steps) == -1
    with pytest.raises(fa.FuncaccumError, match="stepped by a reducer of another sampling rate"):
        privacy.epsilon(state.reducer_carry)
    # delta is what epsilon is reported at, not what was spent: changing it is fine.
    later = dp_step(
        fa.clipped_mean(0.5, noise_multiplier=1.1, accounting=ABADI._replace(delta=1e-6))
    )
    state, _ = first(first.init(mlp_params()), classification_batch(8))
    state, _ = later(state, classification_batch(8, seed=1))
    assert int(state.reducer_carry.steps) == 2
    assert float(state.reducer_carry.delta) == 1e-6


# Accounting.


def test_epsilon_of_the_abadi_mnist_setting() -> None:
    """q = 256/60000, sigma = 1.1, 14062 steps (60 epochs), delta = 1e-5 (Abadi et al. 2016)."""
    ledger = ABADI.ledger(noise_multiplier=1.1, steps=14062)
    assert privacy.epsilon(ledger) == pytest.approx(2.597, abs=1e-3)  # RDP, the default
    assert privacy.epsilon(ledger, accountant="rdp") == privacy.epsilon(ledger)
    assert privacy.epsilon(ledger, accountant="pld") == pytest.approx(2.382, abs=1e-2)
    assert privacy.epsilon(ABADI.ledger(1.1, 0)) == 0.0


def opacus_rdp_epsilon(sample_rate: float, sigma: float, steps: int) -> float:
    pytest.importorskip("opacus", reason="the comparison needs Opacus (the dev extra)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = [(sigma, sample_rate, steps)]  # what `steps` step() calls leave
        return float(accountant.get_epsilon(1e-5))


@pytest.mark.parametrize(
    ("sample_rate", "sigma", "steps"),
    [(256 / 60000, 1.1, 14062), (0.01, 2.0, 1), (64 / 1437, 4.8, 673), (64 / 1437, 1.93, 673)],
)
def test_epsilon_equals_opacus_rdp_accountant(sample_rate: float, sigma: float, steps: int) -> None:
    """The same orders and RDP-to-DP conversion (Balle et al. 2020): equal where the best
    order is an integer or large (here 8.1, 37, 18 and 7.2)."""
    ledger = privacy.Accounting(60000, sample_rate, 1e-5).ledger(sigma, steps)
    want = opacus_rdp_epsilon(sample_rate, sigma, steps)
    assert privacy.epsilon(ledger) == pytest.approx(want, rel=0, abs=1e-6)


@pytest.mark.parametrize(
    ("sample_rate", "sigma", "steps"),
    [(4096 / 50000, 3.0, 1220), (0.05, 0.8, 300), (64 / 1437, 1.03, 673)],
)
def test_epsilon_at_a_small_fractional_order_is_at_most_slightly_above_opacus(
    sample_rate: float, sigma: float, steps: int
) -> None:
    """At a small fractional best order (5.3, 2.7, 3.4) dp-accounting bounds the RDP series with
    the binomial coefficients' absolute values, Opacus sums them signed: dp-accounting's epsilon
    is an upper bound above Opacus's, by 1.6e-6 to 0.4% here; never below it."""
    ledger = privacy.Accounting(60000, sample_rate, 1e-5).ledger(sigma, steps)
    want = opacus_rdp_epsilon(sample_rate, sigma, steps)
    got = privacy.epsilon(ledger)
    assert want <= got <= want * 1.005


def test_calibrated_noise_meets_the_target_and_no_less_noise_would() -> None:
    sigma = privacy.calibrate_noise(3.0, ABADI, steps=14062, tol=1e-3)
    assert privacy.epsilon(ABADI.ledger(sigma, 14062)) <= 3.0
    assert privacy.epsilon(ABADI.ledger(sigma - 2e-3, 14062)) > 3.0
    assert sigma == pytest.approx(1.014, abs=2e-3)  # dp-accounting's RDP; Opacus's gives 1.0156
    with pytest.raises(fa.FuncaccumError, match="steps must be >= 1, got 0"):
        privacy.calibrate_noise(3.0, ABADI, steps=0)


def test_a_capped_batch_is_accounted_as_truncated_poisson_with_pld() -> None:
    """A cap at mean + 4 sd costs little epsilon; at the mean, a lot (dp-accounting PLD)."""
    loose = ABADI._replace(max_batch_size=320).ledger(1.1, 14062)
    assert privacy.epsilon(loose) == pytest.approx(2.409, abs=1e-2)  # 2.382 without a cap
    with pytest.raises(fa.FuncaccumError, match="accounts with its PLD accountant only"):
        privacy.epsilon(loose, accountant="rdp")
    with pytest.raises(fa.FuncaccumError, match="accountant must be one of"):
        privacy.epsilon(loose, accountant="gdp")  # type: ignore[arg-type]
    with pytest.raises(fa.FuncaccumError, match=r"epsilon takes a funcaccum\.privacy\.Privacy"):
        privacy.epsilon(2.0)  # type: ignore[arg-type]


# Poisson sampling.


def test_poisson_batches_vary_include_empty_ones_and_follow_q() -> None:
    sampler = privacy.PoissonSampler(
        200, sample_rate=0.01, steps=2000, generator=torch.Generator().manual_seed(0)
    )
    sizes = torch.tensor([len(batch) for batch in sampler], dtype=torch.float64)
    assert len(sampler) == 2000
    assert (sizes == 0).sum() > 100  # P(empty) = 0.99^200 = 13%
    assert sizes.mean().item() == pytest.approx(2.0, abs=0.15)  # q N, within 5 sd of the mean
    assert sizes.var().item() == pytest.approx(200 * 0.01 * 0.99, rel=0.15)  # binomial
    indices = torch.tensor([i for batch in sampler for i in batch])
    assert indices.min() >= 0
    assert indices.max() < 200
    assert len(privacy.PoissonSampler(1000, sample_rate=0.004)) == 250  # int(1 / q), as Opacus


def test_a_capped_sampler_keeps_a_random_subset_and_accounts_the_cap() -> None:
    sampler = privacy.PoissonSampler(
        100, sample_rate=0.5, steps=200, max_batch_size=45,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    batches = list(sampler)
    assert max(len(b) for b in batches) == 45
    assert min(len(b) for b in batches) < 45
    assert all(len(set(b)) == len(b) for b in batches)  # a subset, no repeats
    assert sampler.accounting(1e-5) == privacy.Accounting(100, 0.5, 1e-5, 45)
    with pytest.raises(fa.FuncaccumError, match="max_batch_size must be in"):
        privacy.PoissonSampler(100, sample_rate=0.5, max_batch_size=0)


def test_ranks_drawing_the_same_seed_share_one_poisson_batch() -> None:
    def batches(rank: int, world: int) -> list[list[int]]:
        sampler = privacy.PoissonSampler(
            50, sample_rate=0.2, steps=20, generator=torch.Generator().manual_seed(4),
            rank=rank, world_size=world,
        )  # fmt: skip
        return list(sampler)

    whole = batches(0, 1)
    shares = [batches(rank, 3) for rank in range(3)]
    for step, batch in enumerate(whole):
        assert sorted(i for share in shares for i in share[step]) == batch


def test_the_loader_collates_an_empty_batch_with_the_right_shapes() -> None:
    data = torch.utils.data.TensorDataset(torch.randn(30, 5), torch.randint(3, (30,)))
    sampler = privacy.PoissonSampler(
        30, sample_rate=0.02, steps=60, generator=torch.Generator().manual_seed(2)
    )
    shapes = [(tuple(x.shape), tuple(y.shape), y.dtype) for x, y in sampler.loader(data)]
    assert ((0, 5), (0,), torch.int64) in shapes  # empty, in the examples' layout
    assert any(x[0] > 0 for x, _, _ in shapes)


def test_dp_sgd_trains_on_poisson_batches_and_run_epoch_reports_epsilon() -> None:
    """The whole loop: Poisson batches (some empty), a noised step, epsilon once per epoch."""
    data = classification_batch(64, seed=3)
    sampler = privacy.PoissonSampler(
        64, sample_rate=1 / 32, generator=torch.Generator().manual_seed(0)
    )
    reducer = fa.clipped_mean(
        1.0, noise_multiplier=1.0, accounting=sampler.accounting(delta=1e-5),
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    step = dp_step(reducer)
    state = step.init(mlp_params())
    loader = [{k: v[torch.tensor(b, dtype=torch.int64)] for k, v in data.items()} for b in sampler]
    assert any(len(b["y"]) == 0 for b in loader)
    state, epoch = fa.run_epoch(step, state, loader)
    assert epoch.steps == len(sampler) == 32
    assert int(state.reducer_carry.steps) == 32
    assert epoch.epsilon == privacy.epsilon(state.reducer_carry)
    assert math.isfinite(float(epoch.loss))  # an empty step adds nothing to the epoch's loss
    plain_step = dp_step(fa.clipped_mean(1.0))
    _, plain = fa.run_epoch(plain_step, plain_step.init(mlp_params()), [data])
    assert plain.epsilon is None


def test_distributed_noise_needs_its_own_generator() -> None:
    """Ranks seeded apart would add different noise: refused before any process group."""
    step = dp_step(fa.clipped_mean(0.5, noise_multiplier=1.0, denominator=8))
    with pytest.raises(fa.FuncaccumError, match="needs its own generator"):
        fa.distributed.DataParallel(step)


def test_token_weighted_dp_step_uses_each_example_once_with_weight_one() -> None:
    """The DP step on a token-weighted loss: the mean of clipped per-example gradients / B."""
    batch = sequence_batch(6, length=7)
    max_norm = 0.05
    reducer = fa.clipped_mean(max_norm, noise_multiplier=1e-30, denominator=6.0)
    got = fa.accumulate(
        token_loss, sequence_params(), batch, reducer=reducer, microbatch_size=1, has_weight=True
    )
    per = fa.microbatch_grads(
        token_loss, sequence_params(), batch, microbatch_size=1, has_weight=True
    )
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per.grads.values()]).norm(dim=0)
    factor = (max_norm / norms).clamp(max=1.0)
    want = {k: torch.einsum("i,i...->...", factor, g) / 6.0 for k, g in per.grads.items()}
    torch.testing.assert_close(got.grads, want, rtol=1e-12, atol=1e-15)


@pytest.mark.compile
def test_noise_from_a_generator_inside_a_compiled_update_is_refused() -> None:
    """torch.compile cannot trace a torch.Generator: the refusal says what to do."""
    step = dp_step(noised())
    state = step.init(mlp_params())
    batch = classification_batch(8)
    step(state, batch)  # eagerly it runs
    torch._dynamo.reset()
    compiled = torch.compile(step.step, fullgraph=True, backend="eager")
    try:
        with pytest.raises(torch._dynamo.exc.Unsupported, match=r"noise from a torch\.Generator"):
            compiled(state, batch)
    finally:
        # The trace stopped inside the scan op's subgraph: leave no half-traced state to the
        # next test that compiles.
        torch._dynamo.reset()
