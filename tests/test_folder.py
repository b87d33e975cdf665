"""funcaccum/_folder.py: the pieces a strategy folds with, each eager or traced as it runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import pytest
import torch
from conftest import (
    classification_batch,
    mlp_loss,
    mlp_params,
    sequence_batch,
    sequence_params,
    token_weighted_loss,
)
from torch.func import grad

import funcaccum as fa
from funcaccum import _fold
from funcaccum._fold import FoldState, LossSpec, MicrobatchOutput
from funcaccum._folder import Folder
from funcaccum.testing import assert_trees_allclose


def spied(folder: Folder) -> dict[str, int]:
    """Count the calls of the folder's two gradient paths, autograd and torch.func."""
    calls = {"autograd": 0, "func": 0}

    def count(name: str, fn: Callable) -> Callable:
        def call(*args: Any) -> Any:
            calls[name] += 1
            return fn(*args)

        return call

    folder._by_autograd = count("autograd", folder._by_autograd)
    folder._by_func = count("func", folder._by_func)
    return calls


def microbatches(count: int = 3, size: int = 4) -> dict[str, torch.Tensor]:
    """``count`` microbatches of ``size`` examples, stacked: leaves ``(count, size, ...)``."""
    return {k: v.view(count, size, *v.shape[1:]) for k, v in classification_batch(12).items()}


def take(stacked: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k: v[i] for k, v in stacked.items()}


# value_and_grad: autograd eagerly, torch.func inside a trace, the same numbers.


def test_value_and_grad_eagerly_is_autograd_and_exact() -> None:
    folder = Folder(mlp_loss, fa.mean(), LossSpec())
    calls = spied(folder)
    params, microbatch = mlp_params(), take(microbatches(), 1)
    grads, out = folder.value_and_grad(params, (), microbatch, 4)
    assert calls == {"autograd": 1, "func": 0}
    assert_trees_allclose(grads, grad(mlp_loss)(params, microbatch), rtol=1e-13, atol=1e-15)
    assert isinstance(out, MicrobatchOutput)
    torch.testing.assert_close(out.loss, mlp_loss(params, microbatch), rtol=1e-15, atol=0)
    assert not out.loss.requires_grad
    assert out.weight.item() == 4  # example count without has_weight
    assert (out.aux, out.model_state) == ((), ())
    assert all(not p.requires_grad for layer in params.values() for p in layer.values())


def test_value_and_grad_under_vmap_is_torch_func_and_equals_eager() -> None:
    folder = Folder(mlp_loss, fa.mean(), LossSpec())
    calls = spied(folder)
    params, stacked = mlp_params(), microbatches()
    batched = torch.func.vmap(folder.value_and_grad, in_dims=(None, None, 0, None))
    grads, out = batched(params, (), stacked, 4)
    assert calls == {"autograd": 0, "func": 1}
    for i in range(3):
        want, want_out = folder.value_and_grad(params, (), take(stacked, i), 4)
        assert_trees_allclose({n: {k: g[i] for k, g in d.items()} for n, d in grads.items()},
                              want, rtol=1e-13, atol=1e-15)  # fmt: skip
        torch.testing.assert_close(out.loss[i], want_out.loss, rtol=1e-15, atol=0)
    assert calls == {"autograd": 3, "func": 1}
    assert out.weight.tolist() == [4, 4, 4]


@pytest.mark.compile
def test_value_and_grad_inside_torch_compile_is_torch_func_and_equals_eager() -> None:
    torch._dynamo.reset()
    folder = Folder(mlp_loss, fa.mean(), LossSpec())
    calls = spied(folder)
    params, microbatch = mlp_params(), take(microbatches(), 2)

    def run(params: dict, microbatch: dict) -> tuple:
        return folder.value_and_grad(params, (), microbatch, 4)

    grads, out = torch.compile(run, fullgraph=True, backend="eager")(params, microbatch)
    assert calls == {"autograd": 0, "func": 1}
    assert_trees_allclose(grads, grad(mlp_loss)(params, microbatch), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(out.loss, mlp_loss(params, microbatch), rtol=1e-15, atol=0)


def test_value_and_grad_reads_what_the_spec_declares() -> None:
    """has_state, has_aux and has_weight: (((loss, weight), aux), new_state), in that nesting."""
    params, batch = sequence_params(), sequence_batch(4)

    def loss_fn(params: dict, state: dict, batch: dict) -> tuple:
        loss, weight = token_weighted_loss(params, batch)
        new_state = {"seen": state["seen"] + params["out"].sum() * 0 + 1}  # a graph to detach
        return ((loss, weight), {"tokens": weight}), new_state

    spec = LossSpec(has_aux=True, has_weight=True, has_state=True)
    folder = Folder(loss_fn, fa.mean(), spec)
    for how in ("eager", "vmap"):
        if how == "eager":
            grads, out = folder.value_and_grad(params, {"seen": torch.tensor(2.0)}, batch, 4)
        else:
            stacked = {k: v.unsqueeze(0) for k, v in batch.items()}
            grads, out = torch.func.vmap(folder.value_and_grad, in_dims=(None, None, 0, None))(
                params, {"seen": torch.tensor(2.0)}, stacked, 4
            )
            grads, out = optree.tree_map(lambda x: x[0], (grads, out))
        want = grad(lambda p: token_weighted_loss(p, batch)[0])(params)
        assert_trees_allclose(grads, want, rtol=1e-13, atol=1e-15)
        assert out.weight.item() == batch["mask"].sum().item()
        assert out.aux["tokens"].item() == batch["mask"].sum().item()
        assert out.model_state["seen"].item() == 3.0
        assert not out.model_state["seen"].requires_grad


def test_value_and_grad_gives_the_loss_its_own_layout() -> None:
    """With batch_dim=1 the microbatch arrives examples first, the loss sees time first."""
    seen = []

    def loss_fn(params: dict, batch: torch.Tensor) -> torch.Tensor:  # batch: (T, m)
        seen.append(tuple(batch.shape))
        return (batch * params["w"][:, None]).mean()

    folder = Folder(loss_fn, fa.mean(), LossSpec(batch_dim=1))
    params = {"w": torch.arange(5.0, dtype=torch.float64)}
    microbatch = torch.ones(3, 5, dtype=torch.float64)  # (m, T), as split
    grads, _ = folder.value_and_grad(params, (), microbatch, 3)
    assert seen == [(5, 3)]
    torch.testing.assert_close(grads["w"], torch.full((5,), 1 / 5, dtype=torch.float64))


# loop: a Python loop eagerly, the scan op inside torch.compile.


def _body(carry: tuple, x: torch.Tensor) -> tuple[tuple, torch.Tensor]:
    total, counts = carry
    return (total + x.sum(), {"n": counts["n"] + 1, "last": x.clone()}), x * 2 + total


def _loop(xs: torch.Tensor) -> tuple:
    folder = Folder(mlp_loss, fa.mean(), LossSpec())
    zeros = torch.zeros(3, dtype=xs.dtype)
    carry = (zeros[0].clone(), {"n": zeros[1].clone(), "last": torch.zeros_like(xs[0])})
    return folder.loop(_body, carry, xs)


def test_loop_eagerly_is_a_python_loop() -> None:
    xs = torch.arange(8, dtype=torch.float64).view(4, 2)
    (total, counts), ys = _loop(xs)
    want_total, want_ys = torch.zeros((), dtype=torch.float64), []
    for x in xs:
        want_ys.append(x * 2 + want_total)
        want_total = want_total + x.sum()
    torch.testing.assert_close(total, want_total, rtol=0, atol=0)
    torch.testing.assert_close(ys, torch.stack(want_ys), rtol=0, atol=0)
    assert counts["n"].item() == 4
    assert torch.equal(counts["last"], xs[-1])


@pytest.mark.compile
def test_loop_inside_torch_compile_equals_eager() -> None:
    """The scan op, its carry a flattened tuple of a tensor and a dict: the eager results."""
    torch._dynamo.reset()
    xs = torch.randn(5, 2, dtype=torch.float64)
    got = torch.compile(_loop, fullgraph=True, backend="eager")(xs)
    assert_trees_allclose(got, _loop(xs), rtol=1e-15, atol=0)


# vmap: its failures say what to do.


def test_vmap_names_randomness_when_the_loss_draws() -> None:
    folder = Folder(mlp_loss, fa.mean(), LossSpec())

    def dropout(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(x, p=0.5, training=True).sum()

    x = torch.ones(4, 6, dtype=torch.float64)
    with pytest.raises(fa.FuncaccumError, match=r"random numbers \(dropout\?\) under vmap"):
        folder.vmap(dropout, (0,), "error")(x)
    with pytest.raises(fa.FuncaccumError, match=r"randomness='different'.*randomness='same'"):
        folder.vmap(dropout, (0,), "error")(x)
    torch.manual_seed(0)
    different = folder.vmap(dropout, (0,), "different")(x)
    same = folder.vmap(dropout, (0,), "same")(x)
    assert len(set(different.tolist())) > 1
    assert len(set(same.tolist())) == 1


def test_vmap_names_the_way_out_when_the_loss_cannot_be_batched() -> None:
    folder = Folder(mlp_loss, fa.mean(), LossSpec())

    def data_dependent(x: torch.Tensor) -> torch.Tensor:
        return x.sum() if x.sum().item() > 0 else -x.sum()

    with pytest.raises(fa.FuncaccumError, match=r"(?s)failed under torch.func.vmap.*scan\(\)"):
        folder.vmap(data_dependent, (0,), "error")(torch.ones(3, 2))


# require_eager: refused inside a trace only.


def test_require_eager_raises_inside_a_trace_and_not_eagerly() -> None:
    folder = Folder(mlp_loss, fa.mean(), LossSpec())

    def hooked(x: torch.Tensor) -> torch.Tensor:
        folder.require_eager("my strategy", "use scan()")
        return x * 2

    torch.testing.assert_close(hooked(torch.ones(2)), torch.full((2,), 2.0))
    with pytest.raises(fa.FuncaccumError, match=r"my strategy runs eagerly; use scan\(\)"):
        torch.func.vmap(hooked)(torch.ones(3, 2))
    with pytest.raises(fa.FuncaccumError, match="my strategy runs eagerly"):
        torch.func.grad(lambda x: hooked(x).sum())(torch.ones(2))


@pytest.mark.compile
def test_require_eager_refuses_inside_torch_compile() -> None:
    torch._dynamo.reset()
    folder = Folder(mlp_loss, fa.mean(), LossSpec())

    def hooked(x: torch.Tensor) -> torch.Tensor:
        folder.require_eager("my strategy", "use scan()")
        return x * 2

    with pytest.raises(torch._dynamo.exc.Unsupported, match="my strategy runs eagerly"):
        torch.compile(hooked, fullgraph=True, backend="eager")(torch.ones(2))


# add, add_by_norms, compile: the fold with the folder's reducer and spec.


def test_add_masks_by_the_spec_and_equals_the_fold() -> None:
    params = sequence_params()
    grads = optree.tree_map(lambda p: torch.stack([p, torch.full_like(p, torch.nan)]), params)
    out = MicrobatchOutput(
        torch.tensor([2.0, float("nan")], dtype=torch.float64),
        torch.tensor([3.0, 0.0], dtype=torch.float64),
    )
    reducer = fa.mean()
    folder = Folder(token_weighted_loss, reducer, LossSpec(has_weight=True))
    state = folder.add(_fold.init(reducer, params), grads, out)
    assert isinstance(state, FoldState)
    want = _fold.add(reducer, _fold.init(reducer, params), grads, out, has_weight=True)
    assert_trees_allclose(state, want, rtol=0, atol=0)
    assert_trees_allclose(state.reducer.grad_sum, fa.tree.scale(params, 3.0), rtol=1e-15, atol=0)
    assert state.loss_sum.item() == 6.0


def test_add_by_norms_needs_a_reducer_that_clips_by_norm() -> None:
    params = mlp_params()
    folder = Folder(mlp_loss, fa.mean(), LossSpec())
    ones = torch.ones(2, dtype=torch.float64)
    with pytest.raises(fa.FuncaccumError, match="needs a reducer that clips by norm"):
        folder.add_by_norms(
            _fold.init(folder.reducer, params), ones, ones, lambda c: params, ones.sum()
        )
    clipped = Folder(mlp_loss, fa.clipped_mean(1e9), LossSpec())
    state = clipped.add_by_norms(
        _fold.init(clipped.reducer, params), ones, ones, lambda c: fa.tree.scale(params, 7.0),
        ones.sum(),
    )  # fmt: skip
    assert state.weight_sum.item() == 2.0
    assert state.microbatches.item() == 2
    assert_trees_allclose(state.reducer.clipped_sum, fa.tree.scale(params, 7.0), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("mode", "compiles"),
    [(None, False), ("step", False), ("loss", True), ("loss+update", True)],
)
def test_compile_compiles_a_piece_only_when_the_step_compiles_its_loss(
    mode: Any, compiles: bool
) -> None:
    """Wrapping only (nothing runs): the plain function eagerly and for "step"."""
    folder = Folder(mlp_loss, fa.mean(), LossSpec(), compile=mode)

    def piece(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    wrapped = folder.compile(piece)
    assert (wrapped is not piece) == compiles
    assert wrapped.__wrapped__ is piece if compiles else wrapped is piece


def _counted(reducer: fa.extend.Reducer, calls: dict[str, int]) -> fa.extend.Reducer:
    """``reducer`` counting how often each of its two fold paths runs."""

    def count(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return call

    assert reducer.by_sum is not None
    by_sum = reducer.by_sum._replace(update=count("by_sum", reducer.by_sum.update))
    return reducer._replace(update=count("update", reducer.update), by_sum=by_sum)


@pytest.mark.parametrize("name", ["mean", "adaptive"])
def test_fold_in_order_sums_by_autograd_and_equals_each_gradient_folded(name: str) -> None:
    """scan()'s eager fold: autograd's sum (and hooked squared norms) give the same state."""
    make = {"mean": fa.mean, "adaptive": fa.adaptive}[name]
    params, batch = mlp_params(), classification_batch(23)  # float64; groups 6, 6, 6 and 5
    calls: dict[str, int] = {}
    summed = fa.Accumulation(reducer=_counted(make(), calls), num_microbatches=4)
    each = fa.Accumulation(reducer=make()._replace(by_sum=None), num_microbatches=4)
    got = summed.finalize(summed.fold(mlp_loss, params, batch))
    want = each.finalize(each.fold(mlp_loss, params, batch))
    assert calls == {"by_sum": 2}  # one call per group of equal-size microbatches
    assert_trees_allclose(got.grads, want.grads, rtol=1e-12, atol=1e-15)
    assert_trees_allclose(got.stats, want.stats, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-13, atol=0)


def test_fold_in_order_folds_each_gradient_where_a_sum_would_lose_precision() -> None:
    """Per-microbatch weights, or float32 params with float64 sums: each gradient is folded."""
    calls: dict[str, int] = {}
    weighted = fa.Accumulation(
        reducer=_counted(fa.mean(), calls), num_microbatches=3, has_weight=True
    )
    weighted.fold(token_weighted_loss, sequence_params(), sequence_batch(9))
    assert calls == {"update": 3}
    calls.clear()
    wide = fa.Accumulation(
        reducer=_counted(fa.mean(accum_dtype=torch.float64), calls), num_microbatches=3
    )
    wide.fold(mlp_loss, mlp_params(torch.float32), classification_batch(9, torch.float32))
    assert calls == {"update": 3}
