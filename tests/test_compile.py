"""Every strategy compiles whole (fullgraph) and matches eager."""

from __future__ import annotations

import pytest
import torch
from conftest import classification_batch, mlp_loss, mlp_params

import funcaccum as fa
from funcaccum.testing import assert_trees_allclose

pytestmark = pytest.mark.compile

STRATEGIES = [
    pytest.param({"strategy": "vmap"}, id="vmap"),
    pytest.param({"strategy": "scan"}, id="scan"),
    pytest.param({"strategy": fa.chunked(3)}, id="chunked3"),
]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    torch._dynamo.reset()


def on(device: str, tree: dict) -> dict:
    return {k: on(device, v) if isinstance(v, dict) else v.to(device) for k, v in tree.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", STRATEGIES)
def test_strategy_compiles_whole_and_matches_eager(options: dict, device: str) -> None:
    params = on(device, mlp_params(torch.float32))
    reducer = fa.clipped_mean(0.5)

    def step(params: dict, batch: dict) -> fa.Accumulated:
        return fa.accumulate(
            mlp_loss, params, batch, reducer=reducer, num_microbatches=7, **options
        )

    compiled = torch.compile(step, fullgraph=True)
    for seed in (1, 2):  # a second batch reuses the graph
        batch = on(device, classification_batch(23, torch.float32, seed=seed))
        got, want = compiled(params, batch), step(params, batch)
        assert_trees_allclose(got.grads, want.grads, rtol=1e-4, atol=1e-6)
        assert_trees_allclose(got.stats, want.stats, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got.loss, want.loss)


@pytest.mark.parametrize("compile_update", [False, True], ids=["loss", "loss-and-update"])
@pytest.mark.parametrize("device", DEVICES)
def test_train_step_compiles_matches_eager_and_never_recompiles(
    device: str, compile_update: bool
) -> None:
    """Every compiled piece is one fullgraph graph, reused step after step."""
    params = on(device, mlp_params(torch.float32))
    schedule = fa.optim.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 20)
    eager = fa.train_step(mlp_loss, optimizer=fa.optim.adamw(schedule), num_microbatches=4)
    compiled = fa.train_step(
        mlp_loss, optimizer=fa.optim.adamw(schedule), num_microbatches=4, compile=True,
        compile_update=compile_update,
    )  # fmt: skip
    eager_state, state = eager.init(params), compiled.init(params)
    batches = [on(device, classification_batch(24, torch.float32, seed=s)) for s in range(3)]
    state, metrics = compiled(state, batches[0])  # the one compile
    eager_state, _ = eager(eager_state, batches[0])
    rates = [metrics["learning_rate"].item()]
    with torch.compiler.set_stance("fail_on_recompile"):
        for i in range(1, 10):
            if i == 5:  # a hand-set hyperparameter is a new tensor value, not a new graph
                state = state._replace(
                    opt_state=fa.optim.set_hyperparams(state.opt_state, weight_decay=0.5)
                )
                eager_state = eager_state._replace(
                    opt_state=fa.optim.set_hyperparams(eager_state.opt_state, weight_decay=0.5)
                )
            state, metrics = compiled(state, batches[i % 3])
            eager_state, _ = eager(eager_state, batches[i % 3])
            rates.append(metrics["learning_rate"].item())
    assert len(set(rates)) == 10  # the learning rate changed at every step
    assert_trees_allclose(state.params, eager_state.params, rtol=1e-4, atol=1e-6)
    assert state.step.item() == 10
    # The guard is live: a new batch shape would need a new graph, and is refused.
    with (
        torch.compiler.set_stance("fail_on_recompile"),
        pytest.raises(RuntimeError, match="recompile"),
    ):
        compiled(state, on(device, classification_batch(28, torch.float32)))


@pytest.mark.parametrize("device", DEVICES)
def test_a_train_step_compiles_whole_as_docs_say(device: str) -> None:
    """``torch.compile(step.step, fullgraph=True)``, called first: one graph, the eager steps."""
    params = on(device, mlp_params(torch.float32))
    step = fa.train_step(
        mlp_loss, optimizer=fa.optim.adamw(1e-2), reducer=fa.clipped_mean(0.5),
        num_microbatches=5, max_consecutive_skips=None,
    )  # fmt: skip
    compiled = torch.compile(step.step, fullgraph=True)
    got = want = step.init(params)
    for seed in range(3):
        batch = on(device, classification_batch(23, torch.float32, seed=seed))
        # The first call compiles; the next ones reuse that graph.
        with torch.compiler.set_stance("fail_on_recompile" if seed else "default"):
            got, got_metrics = compiled(got, batch)
        want, want_metrics = step.step(want, batch)
    assert_trees_allclose(got.params, want.params, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_metrics["loss"], want_metrics["loss"])
    assert int(got.step) == 3
