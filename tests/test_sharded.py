"""FullyShardedStep: FSDP2 on gloo, 1, 2 and 4 processes, against one process in float64."""

from __future__ import annotations

from typing import Any

import optree
import pytest
import torch
import torch.distributed as dist
from _sharded_worker import (
    LR,
    MODES,
    REDUCERS,
    SPLITS,
    TokenModel,
    accumulation,
    configs,
    launch,
    local_batch,
    reference_model,
    token_loss,
)
from torch import nn

import funcaccum as fa
from funcaccum.testing import assert_trees_allclose, assert_trees_equal

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    # torch 2.13's FSDP2 warns whenever a wrapped Linear gets a 3-d input (its output is a
    # view), in case the caller writes into it in place; nothing here does.
    pytest.mark.filterwarnings("ignore:FSDP2-wrapped module .* returned a view tensor"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    """Every configuration on 2 and 4 processes (one launch each), and the bytes on 1."""
    out = tmp_path_factory.mktemp("sharded")
    return {
        1: launch("bytes", 1, out),
        2: launch("main", 2, out),
        4: launch("main", 4, out),
    }


def one_process(config: dict[str, Any], world: int) -> tuple[fa.TrainState, list[Any]]:
    """The same steps in one process: microbatch ``i`` of every rank together is one unit."""
    apply, params, buffers = fa.functional_model(reference_model())

    def loss_fn(params: dict, batch: dict) -> Any:
        return token_loss(lambda x: apply(params, buffers, x), batch)

    step = fa.train_step(
        loss_fn,
        optimizer=fa.optim.adamw(LR),
        accumulation=fa.Accumulation(reducer=REDUCERS[config["reducer"]](), has_weight=True),
    )
    state, history = step.init(params), []
    for i, sizes in enumerate(SPLITS[world]):
        per_rank = []
        for rank, size in enumerate(sizes):
            local = local_batch(i, rank, sizes)
            groups = fa.split_microbatches(local, **config["split"]) if size else []
            per_rank.append(
                [
                    optree.tree_map(lambda x, j=j: x[j], g.batch)
                    for g in groups
                    for j in range(g.count)
                ]
            )
        folded = None
        for unit in range(max(len(m) for m in per_rank)):
            parts = [m[unit] for m in per_rank if unit < len(m)]
            folded = step.fold(state, optree.tree_map(lambda *xs: torch.cat(xs), *parts), folded)
        state, metrics = step.apply(state, folded)
        history.append(metrics)
    return state, history


@pytest.mark.parametrize("world", [2, 4])
def test_every_reducer_and_sync_mode_matches_one_process(runs: dict, world: int) -> None:
    """Token-weighted, uneven ranks and an empty rank, K in {1, 3}: 5 AdamW steps to 1e-10."""
    results = runs[world][0]["runs"]
    assert len(results) == len(configs(world)) == 18
    clipped_some = False
    for config in configs(world):
        got = results[config["name"]]
        state, history = one_process(config, world)
        assert_trees_allclose(got["params"], state.params, rtol=0, atol=1e-10)
        for mine, theirs in zip(got["metrics"], history, strict=True):
            assert not mine.skipped
            torch.testing.assert_close(mine.loss, theirs.loss, rtol=1e-12, atol=0)
            torch.testing.assert_close(mine.weight, theirs.weight, rtol=0, atol=0)
            torch.testing.assert_close(mine.grad_norm, theirs.grad_norm, rtol=1e-10, atol=0)
            assert mine.microbatches == theirs.microbatches
            mine_stats, their_stats = mine.stats._asdict(), theirs.stats._asdict()
            if config["reducer"] == "adaptive" and theirs.stats.units < 2:
                # One unit: tr(Sigma) is 0/0, its sign the rounding's; the step ignores it.
                for undefined in ("noise_trace", "grad_sq", "ready"):
                    del mine_stats[undefined], their_stats[undefined]
            assert_trees_allclose(mine_stats, their_stats, rtol=1e-9, atol=1e-12, equal_nan=True)
            if config["reducer"] == "clipped_mean":
                clipped_some |= 0 < theirs.stats.clip_fraction < 1
    assert clipped_some  # the clip bites on some units and not on others


@pytest.mark.parametrize("world", [2, 4])
def test_replicated_values_are_bit_identical_across_ranks(runs: dict, world: int) -> None:
    """Every leaf of the state that is not a shard, and every metric, on every rank."""
    first = runs[world][0]["runs"]
    for other in runs[world][1:]:
        for name, run in first.items():
            assert run["replicated"], name
            assert_trees_equal(other["runs"][name]["replicated"], run["replicated"])


def test_collectives_per_step_for_each_mode(runs: dict) -> None:
    """K = 3 on 2 and 4 ranks, 3 FSDP units (two Linears and the root's own scale).

    FSDP2: all-gathers, 3 per forward and 2 per backward (the root stays gathered
    between them), or 3 per step with gather="step"; reduce-scatters, 3 per
    microbatch or 3 per step with sync="step". funcaccum: one all-reduce to close
    the fold (weights, loss sums, adaptive's squared norms), clipped_mean one per
    microbatch (its norm), and the update's global norms, one scalar all-reduce
    each: the gradient's, and the guard's over the update and the params together
    (adaptive: one more, its |g|^2).
    """
    k = 3
    for world in (2, 4):
        counts = runs[world][0]["collectives"]
        assert len(counts) == sum(len(modes) for modes in MODES.values())
        for name, per_step in counts.items():
            reducer, _, sync, gather = name.split("-")
            expected = {
                "dist.all_gather_single": 3.0 if gather == "step" else k * (3 + 2.0),
                "dist.reduce_scatter_single": 3.0 if sync == "step" else k * 3.0,
                "dist.all_reduce": 1.0 + (k if reducer == "clipped_mean" else 0),
                "funcol.all_reduce": 2.0 + (reducer == "adaptive"),
            }
            assert per_step == expected, name
        # Every rank took part in the same collectives.
        for other in runs[world][1:]:
            assert other["collectives"] == counts


def test_sharded_state_bytes_fall_as_one_over_world_size(runs: dict) -> None:
    """Params, gradient sums and AdamW's moments: 1/N of one process's on each rank."""
    full = runs[1][0]["bytes"]
    assert full["params"] == full["full_params"]
    scalars = full["opt_state"] - 2 * full["params"]  # AdamW's count and hyperparameters
    for world in (2, 4):
        for rank in runs[world]:
            mine = rank["bytes"]
            assert mine["params"] * world == full["params"]
            assert mine["grads"] - mine["params"] == full["grads"] - full["params"]  # a scalar
            assert mine["opt_state"] == 2 * mine["params"] + scalars
            assert mine["peak_rss_kib"] > 0


def sharded_token_model(mesh: Any) -> TokenModel:
    from torch.distributed.fsdp import fully_shard

    model = reference_model()
    fully_shard(model.inp, mesh=mesh)
    fully_shard(model.out, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def make(mesh: Any, **options: Any) -> fa.distributed.FullyShardedStep:
    kwargs = {"optimizer": fa.optim.adamw(LR), "accumulation": accumulation("mean", {})}
    return fa.distributed.FullyShardedStep(
        sharded_token_model(mesh), token_loss, **(kwargs | options)
    )


def test_a_step_is_a_function_of_the_state_and_leaves_the_module_trained(
    one_process_group: Any,
) -> None:
    clipped = accumulation("clipped_mean", {"num_microbatches": 2})
    sharded = make(one_process_group, accumulation=clipped)
    first = sharded.init()
    kept = optree.tree_map(torch.clone, first)
    second, _ = sharded(first, local_batch(0, 0, [6]))
    third, metrics = sharded(second, local_batch(1, 0, [6]))
    assert int(third.step) == 2
    assert not metrics.skipped
    held = {n: p.detach().full_tensor() for n, p in sharded.module.named_parameters()}
    assert_trees_equal(held, {n: p.full_tensor() for n, p in third.params.items()})
    # An older state goes into the module before its step: the same step, the same bits.
    again, _ = sharded(first, local_batch(0, 0, [6]))
    assert_trees_equal(again, second)
    assert_trees_equal(first, kept)  # the caller's state was not written


def test_aux_outputs_are_this_ranks_own_stacked_by_microbatch(one_process_group: Any) -> None:
    def with_aux(module: nn.Module, batch: dict) -> Any:
        loss, count = token_loss(module, batch)
        return (loss, count), {"tokens": count}

    options = fa.Accumulation(num_microbatches=3, has_weight=True, has_aux=True)
    sharded = fa.distributed.FullyShardedStep(
        sharded_token_model(one_process_group),
        with_aux,
        optimizer=fa.optim.sgd(0.1),
        accumulation=options,
    )
    _, metrics = sharded(sharded.init(), local_batch(0, 0, [7]))
    groups = fa.split_microbatches(local_batch(0, 0, [7]), num_microbatches=3)
    counts = torch.stack([g.batch["mask"][j].sum() for g in groups for j in range(g.count)])
    assert torch.equal(metrics.aux["tokens"], counts)  # sizes 3, 2, 2: one per microbatch
    assert metrics.weight == counts.sum()


def test_refuses_what_it_cannot_run_exactly(one_process_group: Any) -> None:
    mesh = one_process_group
    with pytest.raises(fa.FuncaccumError, match="sharded with FSDP2 at its root"):
        fa.distributed.FullyShardedStep(reference_model(), token_loss, optimizer=fa.optim.sgd(0.1))
    for reducer in ("clipped_mean", "adaptive"):
        with pytest.raises(fa.FuncaccumError, match=rf"{reducer}\(\) needs each microbatch"):
            make(mesh, accumulation=accumulation(reducer, {}), sync="step")
    with pytest.raises(fa.FuncaccumError, match="sync must be 'microbatch' or 'step'"):
        make(mesh, sync="layer")
    with pytest.raises(fa.FuncaccumError, match="the strategy must be scan"):
        make(mesh, accumulation=fa.Accumulation(strategy="vmap", has_weight=True))
    with pytest.raises(fa.FuncaccumError, match="has_state"):
        make(mesh, accumulation=fa.Accumulation(has_state=True))
    total = fa.mean()._replace(init=lambda params: {"sum": fa.tree.zeros_like(params)})
    with pytest.raises(fa.FuncaccumError, match="built-in reducers"):
        make(mesh, accumulation=fa.Accumulation(reducer=total))
    sharded = make(mesh)
    state = sharded.init()
    with pytest.raises(fa.FuncaccumError, match=r"zero-length slice of a batch \(batch\[0:0\]\)"):
        sharded(state, None)
    plain = state._replace(params={n: p.full_tensor() for n, p in state.params.items()})
    with pytest.raises(
        fa.FuncaccumError,
        match=r"state.params\['scale'\] is a torch.float64 Tensor .* placed whole",
    ):
        sharded(plain, local_batch(0, 0, [4]))


@pytest.mark.parametrize("generator", [None, torch.Generator().manual_seed(0)])
def test_refuses_noise_on_gradient_shards(one_process_group: Any, generator: Any) -> None:
    """On a CPU mesh DTensor would draw every rank's shard from that rank's own generator."""
    noisy = fa.clipped_mean(
        1.0, noise_multiplier=1.0, denominator=2.0, unit="microbatch", generator=generator
    )
    accumulation = fa.Accumulation(reducer=noisy, has_weight=True, microbatch_size=2)
    sharded = make(one_process_group, accumulation=accumulation)
    said = "drew random numbers" if generator is None else "combined a whole tensor"
    with pytest.raises(fa.FuncaccumError, match=said):
        sharded(sharded.init(), local_batch(0, 0, [4]))


def test_refuses_batch_norm_in_training_and_a_loss_that_skips_the_module(
    one_process_group: Any,
) -> None:
    from torch.distributed.fsdp import fully_shard

    class Normed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear, self.norm = nn.Linear(4, 4).double(), nn.BatchNorm1d(4).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.linear(x)) * 1.0

    model = Normed()
    fully_shard(model, mesh=one_process_group)
    with pytest.raises(fa.FuncaccumError, match="batch norm in training mode"):
        fa.distributed.FullyShardedStep(model, token_loss, optimizer=fa.optim.sgd(0.1))
    model.eval()
    fa.distributed.FullyShardedStep(model, token_loss, optimizer=fa.optim.sgd(0.1))

    def detached(module: nn.Module, batch: dict) -> torch.Tensor:
        return batch["x"].sum()

    sharded = fa.distributed.FullyShardedStep(
        sharded_token_model(one_process_group), detached, optimizer=fa.optim.sgd(0.1)
    )
    with pytest.raises(fa.FuncaccumError, match="does not depend on the module's params"):
        sharded(sharded.init(), local_batch(0, 0, [4]))


def test_needs_an_initialised_process_group() -> None:
    with pytest.raises(fa.FuncaccumError, match="init_process_group"):
        fa.distributed.FullyShardedStep(reference_model(), token_loss, optimizer=fa.optim.sgd(0.1))
