"""funcaccum/_compile.py (check_compile, compiled, traced); every strategy compiled whole."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import classification_batch, mlp_loss, mlp_params

import funcaccum as fa
from funcaccum import _compile
from funcaccum.testing import assert_trees_allclose, assert_trees_equal

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


@pytest.mark.compile
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


@pytest.mark.compile
@pytest.mark.parametrize("mode", ["loss", "loss+update", "step"])
@pytest.mark.parametrize("device", DEVICES)
def test_train_step_compiles_matches_eager_and_never_recompiles(device: str, mode: str) -> None:
    """Every compiled piece is one fullgraph graph, reused step after step."""
    params = on(device, mlp_params(torch.float32))
    schedule = fa.optim.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 20)
    eager = fa.train_step(
        mlp_loss,
        optimizer=fa.optim.adamw(schedule),
        accumulation=fa.Accumulation(num_microbatches=4),
    )
    compiled = fa.train_step(
        mlp_loss,
        optimizer=fa.optim.adamw(schedule),
        compile=mode,
        accumulation=fa.Accumulation(num_microbatches=4),
    )  # fmt: skip
    eager_state, state = eager.init(params), compiled.init(params)
    batches = [on(device, classification_batch(24, torch.float32, seed=s)) for s in range(3)]
    state, metrics = compiled(state, batches[0])  # the one compile
    eager_state, _ = eager(eager_state, batches[0])
    rates = [metrics.learning_rate.item()]
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
            rates.append(metrics.learning_rate.item())
    assert len(set(rates)) == 10  # the learning rate changed at every step
    assert_trees_allclose(state.params, eager_state.params, rtol=1e-4, atol=1e-6)
    assert state.step.item() == 10
    # The guard is live: a new batch shape would need a new graph, and is refused.
    with (
        torch.compiler.set_stance("fail_on_recompile"),
        pytest.raises(RuntimeError, match="recompile"),
    ):
        compiled(state, on(device, classification_batch(28, torch.float32)))


@pytest.mark.compile
@pytest.mark.parametrize("device", DEVICES)
def test_a_train_step_compiles_whole_as_docs_say(device: str) -> None:
    """``torch.compile(step.step, fullgraph=True)``, called first: one graph, the eager steps."""
    params = on(device, mlp_params(torch.float32))
    step = fa.train_step(
        mlp_loss,
        optimizer=fa.optim.adamw(1e-2),
        max_consecutive_skips=None,
        accumulation=fa.Accumulation(reducer=fa.clipped_mean(0.5), num_microbatches=5),
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
    torch.testing.assert_close(got_metrics.loss, want_metrics.loss)
    assert int(got.step) == 3


# _compile: the one compile setting, the one compiled wrapper, the one trace question.


@pytest.mark.parametrize(
    ("compile", "mode"),
    [(False, None), (True, "loss"), ("loss", "loss"), ("loss+update", "loss+update"),
     ("step", "step")],
)  # fmt: skip
def test_check_compile_names_the_mode(compile: object, mode: str | None) -> None:
    assert _compile.check_compile(compile) == mode


@pytest.mark.parametrize(
    "compile", [None, 0, 1, "", "Loss", "whole", "inductor", "loss+step", ("loss",)]
)
def test_check_compile_refuses_anything_else(compile: object) -> None:
    """0 and 1 are not False and True: a flag is a bool, a mode one of the three names."""
    with pytest.raises(fa.FuncaccumError, match=r"compile must be False, True \(= 'loss'\)"):
        _compile.check_compile(compile)


def test_compiled_disabled_is_the_function_itself() -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    assert _compile.compiled(fn, False) is fn
    wrapped = _compile.compiled(fn)  # torch.compile wraps lazily: nothing compiles yet
    assert wrapped is not fn
    assert wrapped.__wrapped__ is fn
    assert wrapped.__name__ == "fn"


@pytest.mark.compile
def test_compiled_runs_one_graph_and_inside_a_trace_the_plain_function() -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * 2

    wrapped = _compile.compiled(fn)
    x = torch.randn(4, dtype=torch.float64)
    torch.testing.assert_close(wrapped(x), fn(x), rtol=1e-15, atol=0)
    with torch.compiler.set_stance("fail_on_recompile"):
        torch.testing.assert_close(wrapped(x + 1), fn(x + 1), rtol=1e-15, atol=0)

    def outer(x: torch.Tensor) -> torch.Tensor:
        return wrapped(x) + 1

    torch.testing.assert_close(
        torch.compile(outer, fullgraph=True, backend="eager")(x), fn(x) + 1, rtol=1e-15, atol=0
    )

    def breaks(x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        return x * 2

    torch.testing.assert_close(breaks(x), x * 2)
    with pytest.raises(torch._dynamo.exc.Unsupported):  # one whole graph, or an error
        _compile.compiled(breaks)(x)


def test_traced_is_false_eagerly_and_true_under_torch_func() -> None:
    seen = []

    def probe(x: torch.Tensor) -> torch.Tensor:
        seen.append(_compile.traced())
        return x.sum()

    probe(torch.ones(2))
    torch.func.vmap(probe)(torch.ones(3, 2))
    torch.func.grad(probe)(torch.ones(2))
    assert seen == [False, True, True]
    assert not _compile.traced()  # and False again once the transforms are done


@pytest.mark.compile
def test_traced_is_true_inside_torch_compile() -> None:
    def probe(x: torch.Tensor) -> torch.Tensor:
        return x + 1 if _compile.traced() else x - 1

    x = torch.zeros(2)
    assert torch.equal(probe(x), x - 1)
    assert torch.equal(torch.compile(probe, fullgraph=True, backend="eager")(x), x + 1)


@pytest.mark.compile
@pytest.mark.subprocess
def test_compiled_training_repeats_bit_for_bit_in_fresh_processes_and_on_resume(
    tmp_path: Path,
) -> None:
    """compile=True on the CPU: two fresh processes, and a resume, give the same bits.

    The first process compiles into an empty cache and the second finds its
    graphs there, as a new machine and a restarted job do.
    """
    worker = Path(__file__).resolve().parent / "_compiled_worker.py"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    for phase in ("first", "second"):
        done = subprocess.run(
            [sys.executable, str(worker), phase, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            env=env,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    uninterrupted = fa.load(tmp_path / "uninterrupted.pt", restore_rng=False).state
    for other in ("again", "resumed"):
        repeated = fa.load(tmp_path / f"{other}.pt", restore_rng=False).state
        assert_trees_equal(repeated, uninterrupted)


class _Block(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm, self.linear = torch.nn.LayerNorm(d), torch.nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(self.norm(x)))


class _Stack(torch.nn.Module):
    def __init__(self, d: int = 8, depth: int = 4) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Block(d) for _ in range(depth))
        self.head = torch.nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x).squeeze(-1)


@pytest.mark.compile
def test_compile_regions_compiles_a_block_once_for_all_its_siblings() -> None:
    """compile="regions": blocks share a graph, steps match eager, the module stays as it was."""
    torch.manual_seed(0)
    model = _Stack()
    apply, params, buffers = fa.functional_model(model)

    def loss_fn(params: dict, batch: tuple) -> torch.Tensor:
        return ((apply(params, buffers, batch[0]) - batch[1]) ** 2).mean()

    def make(compile: object) -> fa.TrainStep:
        return fa.train_step(
            loss_fn,
            optimizer=fa.optim.adamw(1e-2),
            accumulation=fa.Accumulation(num_microbatches=4),
            compile=compile,
        )

    eager, regions = make(False), make("regions")
    a, b = eager.init(params), regions.init(params)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for i in range(3):
        batch = (torch.randn(32, 8, generator=torch.Generator().manual_seed(i)), torch.randn(32))
        a, _ = eager(a, batch)
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
            b, _ = regions(b, batch)
    # Four blocks, one traced block graph (a second for the first block, whose input needs
    # no gradient); no more for later steps, whose tensors are new.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs <= 2
    assert_trees_allclose(b.params, a.params, rtol=1e-5, atol=1e-6)
    assert all(block._compiled_call_impl is None for block in model.blocks)
