"""The strategy protocol: a user's own strategy, the built-in ones, layouts, ghost's options."""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import pytest
import torch
from conftest import classification_batch, mlp_loss, mlp_params
from torch import nn
from torch.func import grad
from torch.nn import functional

import funcaccum as fa
from funcaccum.testing import assert_trees_allclose


class Reversed(NamedTuple):
    """Folds a group's microbatches last to first, with plain autograd: a user's strategy."""

    def build(self, folder: fa.Folder) -> fa.GroupRunner:
        def run(params: Any, state: fa.FoldState, group: Any, model_state: Any) -> Any:
            outputs = []
            for i in reversed(range(group.count)):
                microbatch = optree.tree_map(lambda x, i=i: x[i], group.batch)
                grads, out = folder.autograd(params, model_state, microbatch, group.size)
                state = folder.add(state, grads, out)
                model_state = out.model_state
                outputs.insert(0, out._replace(model_state=()))
            stacked = optree.tree_map(lambda *ys: torch.stack(ys), *outputs)
            return state, stacked, model_state

        return run


class PairsUnderVmap(NamedTuple):
    """Two microbatches at a time under torch.func.vmap, through ``folder.grad``."""

    def build(self, folder: fa.Folder) -> fa.GroupRunner:
        batched = torch.func.vmap(folder.grad, in_dims=(None, None, 0, None))

        def run(params: Any, state: fa.FoldState, group: Any, model_state: Any) -> Any:
            outputs = []
            for start in range(0, group.count, 2):
                pair = optree.tree_map(lambda x, s=start: x[s : s + 2], group.batch)
                grads, out = batched(params, (), pair, group.size)
                state = folder.add(state, grads, out)
                outputs.append(out)
            return state, optree.tree_map(lambda *ys: torch.cat(ys), *outputs), model_state

        return run


REDUCERS = {
    "mean": fa.mean,
    "clipped_mean": lambda: fa.clipped_mean(0.05),
    "adaptive": fa.adaptive,
}


@pytest.mark.parametrize("strategy", [Reversed(), PairsUnderVmap()], ids=["reversed", "pairs"])
@pytest.mark.parametrize("name", list(REDUCERS))
def test_a_user_strategy_works_with_every_reducer(strategy: Any, name: str) -> None:
    params, batch = mlp_params(), classification_batch(19)  # microbatches 4, 4, 4, 4, 3
    ours = fa.accumulate(
        mlp_loss, params, batch, reducer=REDUCERS[name](), num_microbatches=5, strategy=strategy
    )
    builtin = fa.accumulate(mlp_loss, params, batch, reducer=REDUCERS[name](), num_microbatches=5)
    assert_trees_allclose(ours.grads, builtin.grads, rtol=1e-12, atol=1e-15)
    assert_trees_allclose(ours.stats, builtin.stats, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.loss, builtin.loss, rtol=1e-12, atol=0)
    if name == "mean":
        assert_trees_allclose(ours.grads, grad(mlp_loss)(params, batch), rtol=1e-10, atol=1e-13)


def test_a_user_strategy_trains() -> None:
    params = mlp_params()
    steps = [
        fa.train_step(mlp_loss, optimizer=fa.optim.adamw(1e-2), num_microbatches=3, strategy=s)
        for s in (Reversed(), fa.scan())
    ]
    states = [step.init(params) for step in steps]
    for i in range(5):
        batch = classification_batch(17, seed=i)
        states = [step(state, batch)[0] for step, state in zip(steps, states, strict=True)]
    assert_trees_allclose(states[0].params, states[1].params, rtol=1e-10, atol=1e-12)


def test_strategy_objects_and_shorthands_agree() -> None:
    params, batch = mlp_params(), classification_batch(13)
    want = grad(mlp_loss)(params, batch)
    for strategy in ("scan", "vmap", fa.scan(), fa.vmap(), fa.chunked(1), fa.chunked(2)):
        got = fa.accumulate(mlp_loss, params, batch, microbatch_size=3, strategy=strategy)
        assert_trees_allclose(got.grads, want, rtol=1e-10, atol=1e-13)
    assert isinstance(fa.Accumulation(strategy="vmap").strategy, fa.Strategy)


def test_bad_strategy_options_are_refused() -> None:
    with pytest.raises(fa.FuncaccumError, match="size must be >= 1, got 0"):
        fa.chunked(0)
    with pytest.raises(fa.FuncaccumError, match="randomness must be one of"):
        fa.vmap(randomness="random")
    with pytest.raises(fa.FuncaccumError, match=r"running_stats\(module\).*or strategy=scan\(\)"):
        fa.Accumulation(strategy="vmap", has_state=True)
    with pytest.raises(fa.FuncaccumError, match="model_state must be combine"):
        fa.vmap(model_state="batch norm")
    with pytest.raises(fa.FuncaccumError, match="build"):
        fa.Accumulation(strategy=lambda: None)


def test_the_accumulation_is_frozen_and_checked_once() -> None:
    acc = fa.Accumulation(num_microbatches=2)
    with pytest.raises(AttributeError):
        acc.num_microbatches = 3  # type: ignore[misc]
    with pytest.raises(fa.FuncaccumError, match="has_aux must be True or False"):
        fa.Accumulation(has_aux=1)
    with pytest.raises(fa.FuncaccumError, match="at most one of"):
        fa.Accumulation(num_microbatches=2, microbatch_size=2)


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


def _ghost_setup() -> tuple:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    apply, params, buffers = fa.functional_model(model)

    def loss_fn(params: dict, batch: tuple) -> torch.Tensor:
        return functional.cross_entropy(apply(params, buffers, batch[0]), batch[1])

    batch = (torch.randn(12, 4, dtype=torch.float64), torch.randint(2, (12,)))
    return model, loss_fn, params, batch


def test_ghost_chunk_size_one_is_one_microbatch_per_pass() -> None:
    model, loss_fn, params, batch = _ghost_setup()
    reducer = fa.clipped_mean(0.3)
    want = fa.accumulate(loss_fn, params, batch, reducer=reducer, microbatch_size=1)
    passes = []
    handle = model[0].register_forward_hook(lambda m, args, out: passes.append(args[0].shape[0]))
    try:
        for chunk_size, sizes in ((1, [1] * 12), (5, [5, 5, 2]), (None, [12])):
            passes.clear()
            got = fa.accumulate(
                loss_fn, params, batch, reducer=reducer, microbatch_size=1,
                strategy=fa.ghost(model, chunk_size=chunk_size),
            )  # fmt: skip
            assert passes == sizes
            # Ghost takes its norms in float32, so the clip factors match to float32 precision.
            assert_trees_allclose(got.grads, want.grads, rtol=1e-5, atol=1e-8)
    finally:
        handle.remove()


def test_ghost_refuses_what_it_cannot_do_with_a_clear_error() -> None:
    model = _ghost_setup()[0]
    clipped = fa.clipped_mean(0.3)
    with pytest.raises(fa.FuncaccumError, match="no aux"):
        fa.Accumulation(reducer=clipped, strategy=fa.ghost(model), has_aux=True)
    with pytest.raises(fa.FuncaccumError, match="clips by norm"):
        fa.Accumulation(strategy=fa.ghost(model))
    with pytest.raises(fa.FuncaccumError, match="chunk_size must be >= 1, got 0"):
        fa.ghost(model, chunk_size=0)
