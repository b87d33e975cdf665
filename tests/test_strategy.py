"""The strategy protocol: a user's own strategy and the built-in ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import optree
import pytest
import torch
from conftest import classification_batch, mlp_loss, mlp_params
from test_docs import BLOCK
from torch.func import grad

import funcaccum as fa
from funcaccum.extend import Folder, FoldState, GroupRunner, MicrobatchOutput, Strategy
from funcaccum.testing import assert_trees_allclose


def docs_strategy() -> type:
    """The ``Reversed`` strategy exactly as docs/concepts.md, "Writing a strategy", writes it."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "concepts.md").read_text()
    block = next(b for b in BLOCK.findall(page) if "class Reversed" in b)
    source = block[: block.index("assert isinstance(Reversed()")]
    namespace: dict[str, Any] = {"fa": fa, "torch": torch}
    exec(compile(source, "docs/concepts.md", "exec"), namespace)
    return namespace["Reversed"]


Reversed = docs_strategy()


class PairsUnderVmap(NamedTuple):
    """Two microbatches at a time under vmap, a Python loop over a static count: one body."""

    def build(self, folder: Folder) -> GroupRunner:
        batched = folder.vmap(folder.value_and_grad, (None, None, 0, None), "error")

        def run(params: Any, state: FoldState, group: Any, model_state: Any) -> Any:
            outputs = []
            for start in range(0, group.count, 2):
                pair = optree.tree_map(lambda x, s=start: x[s : s + 2], group.batch)
                grads, out = batched(params, (), pair, group.size)
                state = folder.add(state, grads, out)
                outputs.append(MicrobatchOutput(out.loss, out.weight, out.aux))
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
        fa.train_step(
            mlp_loss,
            optimizer=fa.optim.adamw(1e-2),
            accumulation=fa.Accumulation(num_microbatches=3, strategy=s),
        )
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
    assert isinstance(fa.Accumulation(strategy="vmap").strategy, Strategy)


def test_bad_strategy_options_are_refused() -> None:
    with pytest.raises(fa.FuncaccumError, match="size must be >= 1, got 0"):
        fa.chunked(0)
    with pytest.raises(fa.FuncaccumError, match="randomness must be one of"):
        fa.vmap(randomness="random")
    vmap_with_state = fa.Accumulation(strategy="vmap", has_state=True)
    with pytest.raises(fa.FuncaccumError, match=r"running_stats\(module\).*or strategy=scan\(\)"):
        vmap_with_state.runner(mlp_loss)  # refused when built, before any data
    with pytest.raises(fa.FuncaccumError, match="model_state must be combine"):
        fa.vmap(model_state="batch norm")
    with pytest.raises(fa.FuncaccumError, match="build"):
        fa.Accumulation(strategy=lambda: None)


def test_a_strategy_whose_build_returns_no_runner_is_refused_when_built() -> None:
    class Forgetful(NamedTuple):
        def build(self, folder: Folder) -> GroupRunner:
            return None  # type: ignore[return-value]

    with pytest.raises(fa.FuncaccumError, match=r"Forgetful.build\(folder\) must return run"):
        fa.train_step(
            mlp_loss,
            optimizer=fa.optim.sgd(0.1),
            accumulation=fa.Accumulation(strategy=Forgetful()),
        )


def test_the_accumulation_is_frozen_and_checked_once() -> None:
    acc = fa.Accumulation(num_microbatches=2)
    with pytest.raises(AttributeError):
        acc.num_microbatches = 3  # type: ignore[misc]
    with pytest.raises(fa.FuncaccumError, match="has_aux must be True or False"):
        fa.Accumulation(has_aux=1)
    with pytest.raises(fa.FuncaccumError, match="at most one of"):
        fa.Accumulation(num_microbatches=2, microbatch_size=2)


def _steps(reducer: Any, strategy: Any, compile: Any) -> Any:
    return fa.train_step(
        mlp_loss,
        optimizer=fa.optim.adamw(1e-2),
        accumulation=fa.Accumulation(reducer=reducer, num_microbatches=3, strategy=strategy),
        compile=compile,
    )


@pytest.mark.parametrize(
    "how",
    [
        "eager",
        pytest.param("loss", marks=pytest.mark.compile),
        pytest.param("step.step compiled whole", marks=pytest.mark.compile),
    ],
)
@pytest.mark.parametrize("name", list(REDUCERS))
def test_the_docs_strategy_has_one_body_for_every_mode(name: str, how: str) -> None:
    """The docs' strategy runs eagerly, with compile=True and inside torch.compile(step.step)."""
    params = mlp_params()
    want = _steps(REDUCERS[name](), fa.scan(), False)
    ours = _steps(REDUCERS[name](), Reversed(), how == "loss")
    run = torch.compile(ours.step, fullgraph=True) if how.startswith("step.step") else ours
    a, b = want.init(params), ours.init(params)
    for i in range(2):
        batch = classification_batch(17, seed=i)  # microbatches of 6, 6, 5
        a, want_metrics = want(a, batch)
        b, metrics = run(b, batch)
    assert_trees_allclose(b.params, a.params, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(metrics.loss, want_metrics.loss, rtol=1e-10, atol=0)
    assert metrics.microbatches.item() == 3


class Misfolding(NamedTuple):
    """scan()'s fold, except that it folds only the first ``keep`` microbatches of a group,
    or hands folder.add its gradients through ``change``."""

    keep: int | None = None
    change: Any = None

    def build(self, folder: Folder) -> GroupRunner:
        def run(params: Any, state: FoldState, group: Any, model_state: Any) -> Any:
            losses, weights = [], []
            for i in range(group.count if self.keep is None else self.keep):
                microbatch = optree.tree_map(lambda x, i=i: x[i], group.batch)
                grads, out = folder.value_and_grad(params, model_state, microbatch, group.size)
                state = folder.add(state, self.change(grads) if self.change else grads, out)
                losses.append(out.loss)
                weights.append(out.weight)
            outputs = MicrobatchOutput(torch.stack(losses), torch.stack(weights))
            return state, outputs, model_state

        return run


def test_a_strategy_that_folds_part_of_its_group_is_refused() -> None:
    """Weight 4 of 12 folded, the rest dropped: the count is compared with the plan."""
    accumulation = fa.Accumulation(num_microbatches=3, strategy=Misfolding(1))
    step = fa.train_step(mlp_loss, optimizer=fa.optim.sgd(0.1), accumulation=accumulation)
    state = step.init(mlp_params())
    with pytest.raises(
        fa.FuncaccumError, match="folded 1 microbatches where the batch was planned into 3"
    ):
        step(state, classification_batch(12))
    after, metrics = step.step(state, classification_batch(12))  # pure: the guard skipped it
    assert metrics.skipped
    assert torch.equal(after.params["layer0"]["w"], state.params["layer0"]["w"])
    with pytest.raises(fa.FuncaccumError, match="folded 1 microbatches where"):
        fa.accumulate(mlp_loss, mlp_params(), classification_batch(12), num_microbatches=3,
                      strategy=Misfolding(1))  # fmt: skip
    fa.accumulate(
        mlp_loss, mlp_params(), classification_batch(12), num_microbatches=3, strategy=Misfolding()
    )  # the same strategy, folding everything: accepted


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (
            lambda g: optree.tree_map(lambda x: x[None], g),
            # Summed in place into the fold's own state, it cannot broadcast; out of place (a
            # state from elsewhere, a compiled fold) the state's new layout is named.
            r"folder.add could not fold.*grads\['layer0'\]\['b'\]: \(1, 16\)",
        ),
        (lambda g: {"layer0": g["layer0"]}, r"folder.add could not fold.*'layer1'"),
        (
            lambda g: {**g, "layer0": {**g["layer0"], "w": g["layer0"]["w"][:2]}},
            r"folder.add could not fold.*grads\['layer0'\]\['w'\]: \(2, 16\)",
        ),
    ],
    ids=["extra-leading-dim", "missing-key", "wrong-shape"],
)
def test_gradients_not_shaped_like_the_params_are_refused(change: Any, words: str) -> None:
    """An extra leading axis used to broadcast into the params: (16,) became (1, 16)."""
    with pytest.raises(fa.FuncaccumError, match=words):
        fa.accumulate(mlp_loss, mlp_params(), classification_batch(12), num_microbatches=3,
                      strategy=Misfolding(change=change))  # fmt: skip


def test_a_strategy_class_or_factory_in_place_of_an_instance_is_named() -> None:
    with pytest.raises(fa.FuncaccumError, match=r"got function: call it, scan\(\)"):
        fa.Accumulation(strategy=fa.scan)
    with pytest.raises(fa.FuncaccumError, match=r"got the class Misfolding: make one"):
        fa.Accumulation(strategy=Misfolding)


def test_gradients_with_an_extra_axis_change_a_state_from_elsewhere_and_are_named() -> None:
    """Continuing a caller's fold (not the fold's own state, so summed out of place), the
    reducer state's new layout is refused by name before it reaches an update."""
    accumulation = fa.Accumulation(
        num_microbatches=3,
        strategy=Misfolding(change=lambda g: optree.tree_map(lambda x: x[None], g)),
    )
    runner = accumulation.runner(mlp_loss)
    started = fa.Folded(accumulation.init(mlp_params()))
    with pytest.raises(
        fa.FuncaccumError,
        match=r"changed the reducer state \(state.reducer.grad_sum\['layer0'\]\['b'\]: "
        r"\(\(16,\), torch.float64\) became \(\(1, 16\)",
    ):
        runner.fold(mlp_params(), classification_batch(12), started)
