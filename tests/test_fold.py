"""funcaccum/_fold.py: FoldState and its operations, init, add, add by norms, merge, finalize."""

from __future__ import annotations

import pytest
import torch

import funcaccum as fa
from funcaccum import _fold
from funcaccum._fold import Accumulated, Folded, FoldState, LossSpec, MicrobatchOutput
from funcaccum.testing import assert_trees_allclose

F64 = torch.float64


def params() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(3, dtype=F64), "b": torch.zeros((), dtype=F64)}


def stacked_grads(count: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(count, 3, generator=g, dtype=F64),
        "b": torch.randn(count, generator=g, dtype=F64),
    }


def output(loss: list[float] | float, weight: list[float] | float) -> MicrobatchOutput:
    return MicrobatchOutput(torch.tensor(loss, dtype=F64), torch.tensor(weight, dtype=F64))


def test_the_records_default_to_nothing() -> None:
    assert LossSpec() == (False, False, False, 0)
    out = MicrobatchOutput(torch.tensor(1.0), torch.tensor(2.0))
    assert out.aux == ()  # "no aux" and "no state" as trees of no tensors, as vmap needs
    assert out.model_state == ()
    state = _fold.init(fa.mean(), params())
    assert Folded(state) == (state, (), None)
    assert Accumulated._fields == ("grads", "loss", "weight", "stats", "aux")


def test_init_is_zero_sums_in_the_weight_dtype_never_aliased() -> None:
    state = _fold.init(fa.mean(), params())
    assert isinstance(state, FoldState)
    scalars = (state.loss_sum, state.weight_sum, state.microbatches)
    assert all(t.dtype == F64 and t.shape == () and t.item() == 0 for t in scalars)
    assert len({t.data_ptr() for t in scalars}) == 3  # scan refuses aliased carries
    assert_trees_allclose(state.reducer.grad_sum, params(), rtol=0, atol=0)
    # Low-precision params: sums in float32.
    low = _fold.init(fa.mean(), {"w": torch.zeros(2, dtype=torch.bfloat16)})
    assert low.weight_sum.dtype == low.loss_sum.dtype == torch.float32


def test_add_sums_weighted_losses_weights_and_gradients() -> None:
    reducer = fa.mean()
    grads = stacked_grads(2)
    state = _fold.init(reducer, params())
    state = _fold.add(reducer, state, {k: v[0] for k, v in grads.items()}, output(0.5, 3.0))
    state = _fold.add(reducer, state, {k: v[1] for k, v in grads.items()}, output(2.0, 1.0))
    assert state.loss_sum.item() == 3.0 * 0.5 + 1.0 * 2.0
    assert state.weight_sum.item() == 4.0
    want = {k: 3.0 * v[0] + 1.0 * v[1] for k, v in grads.items()}
    assert_trees_allclose(state.reducer.grad_sum, want, rtol=1e-15, atol=0)


def test_add_takes_a_stacked_chunk_as_its_microbatches_one_by_one() -> None:
    reducer = fa.clipped_mean(0.8)
    grads, out = stacked_grads(3), output([0.5, 1.5, 2.5], [2.0, 1.0, 4.0])
    chunk = _fold.add(reducer, _fold.init(reducer, params()), grads, out)
    one_by_one = _fold.init(reducer, params())
    for i in range(3):
        one = MicrobatchOutput(out.loss[i], out.weight[i])
        one_by_one = _fold.add(reducer, one_by_one, {k: v[i] for k, v in grads.items()}, one)
    assert_trees_allclose(chunk, one_by_one, rtol=1e-14, atol=1e-15)


def test_the_microbatch_counter_counts_0d_and_stacked_weights() -> None:
    reducer = fa.mean()
    state = _fold.init(reducer, params())
    state = _fold.add(reducer, state, stacked_grads(1, 1), output([1.0], [2.0]))  # (1,)
    assert state.microbatches.item() == 1
    one = {k: v[0] for k, v in stacked_grads(1).items()}
    state = _fold.add(reducer, state, one, output(1.0, 2.0))  # 0-d: one microbatch
    assert state.microbatches.item() == 2
    state = _fold.add(reducer, state, stacked_grads(5), output([1.0] * 5, [2.0] * 5))
    assert state.microbatches.item() == 7
    assert state.microbatches.dtype == state.weight_sum.dtype  # merges in the same collective
    # An integer weight (an example count) is summed in the state's dtype.
    state = _fold.add(reducer, state, one, MicrobatchOutput(torch.tensor(1.0), torch.tensor(3)))
    assert state.weight_sum.dtype == F64
    assert state.weight_sum.item() == 2 + 2 + 10 + 3


@pytest.mark.parametrize("reducer", [fa.mean(), fa.clipped_mean(0.8)], ids=["mean", "clipped"])
def test_a_zero_weight_microbatch_adds_nothing_even_when_nan(reducer: fa.extend.Reducer) -> None:
    """With has_weight, an all-padding microbatch (loss and gradient 0/0) leaves the sums."""
    grads = stacked_grads(3)
    grads["w"][1] = torch.nan  # the middle microbatch: all padding
    grads["b"][1] = torch.nan
    out = output([0.5, float("nan"), 2.5], [2.0, 0.0, 4.0])
    state = _fold.add(reducer, _fold.init(reducer, params()), grads, out, has_weight=True)
    kept = {k: v[[0, 2]] for k, v in grads.items()}
    want = _fold.add(reducer, _fold.init(reducer, params()), kept, output([0.5, 2.5], [2.0, 4.0]))
    assert_trees_allclose(state.reducer, want.reducer, rtol=1e-15, atol=0)
    assert state.loss_sum.item() == 2.0 * 0.5 + 4.0 * 2.5
    assert state.weight_sum.item() == 6.0
    assert state.microbatches.item() == 3  # it was folded, though it weighs nothing
    # A single microbatch of weight zero, 0-d: the state is unchanged but for the counter.
    nan = {k: torch.full_like(v[0], torch.nan) for k, v in grads.items()}
    after = _fold.add(reducer, want, nan, output(float("nan"), 0.0), has_weight=True)
    assert_trees_allclose(after._replace(microbatches=want.microbatches), want, rtol=0, atol=0)
    assert after.microbatches.item() == 3


def test_merge_is_the_sum_of_the_sums() -> None:
    reducer = fa.clipped_mean(0.8)
    empty = _fold.init(reducer, params())
    a = _fold.add(reducer, empty, stacked_grads(2, 1), output([1.0, 2.0], [1.0, 3.0]))
    b = _fold.add(reducer, empty, stacked_grads(3, 2), output([4.0, 5.0, 6.0], [2.0, 2.0, 1.0]))
    merged = _fold.merge(reducer, a, b)
    assert merged.loss_sum.item() == a.loss_sum.item() + b.loss_sum.item() == 7 + 24
    assert merged.weight_sum.item() == 9.0
    assert merged.microbatches.item() == 5
    assert_trees_allclose(
        merged.reducer.clipped_sum,
        fa.tree.add(a.reducer.clipped_sum, b.reducer.clipped_sum),
        rtol=1e-15,
        atol=0,
    )
    assert merged.reducer.norm_max.value == max(a.reducer.norm_max.value, b.reducer.norm_max.value)
    assert_trees_allclose(_fold.merge(reducer, b, a), merged, rtol=1e-15, atol=0)
    assert_trees_allclose(_fold.merge(reducer, a, empty), a, rtol=0, atol=0)


def test_finalize_divides_once_by_the_summed_weight() -> None:
    """The weighted mean of two partial states, not the mean of their means."""
    reducer = fa.mean()
    grads = stacked_grads(2)
    parts = [
        _fold.add(reducer, _fold.init(reducer, params()), {k: v[i] for k, v in grads.items()}, o)
        for i, o in enumerate([output(1.0, 1.0), output(5.0, 3.0)])
    ]
    aux = {"accuracy": torch.tensor([0.5, 1.0])}
    result = _fold.finalize(reducer, _fold.merge(reducer, *parts), aux)
    assert isinstance(result, Accumulated)
    assert result.loss.item() == (1.0 * 1.0 + 3.0 * 5.0) / 4 == 4.0  # the mean of means is 3
    assert result.weight.item() == 4.0
    want = {k: (1.0 * v[0] + 3.0 * v[1]) / 4 for k, v in grads.items()}
    assert_trees_allclose(result.grads, want, rtol=1e-15, atol=0)
    assert result.aux is aux
    assert _fold.finalize(reducer, parts[0]).aux is None


def test_add_by_norms_equals_add_with_the_gradients() -> None:
    """A strategy that knows only norms and a weighted sum folds what the gradients fold."""
    reducer = fa.clipped_mean(0.8)
    grads = stacked_grads(4)
    out = output([0.5, 1.0, 1.5, 2.0], [1.0, 2.0, 1.0, 3.0])
    norms = torch.sqrt(sum(v.reshape(4, -1).square().sum(1) for v in grads.values()))
    assert (norms > 0.8).any()  # some clipped, some not
    assert (norms < 0.8).any()

    def weighted_sum(coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: torch.einsum("c,c...->...", coefficients, v) for k, v in grads.items()}

    loss_sum = (out.weight * out.loss).sum()
    by_norms = _fold.add_by_norms(
        reducer, _fold.init(reducer, params()), norms, out.weight, weighted_sum, loss_sum
    )
    by_grads = _fold.add(reducer, _fold.init(reducer, params()), grads, out)
    assert_trees_allclose(by_norms, by_grads, rtol=1e-14, atol=1e-15)
    assert by_norms.microbatches.item() == 4


def test_add_by_norms_refuses_a_reducer_that_does_not_clip_by_norm() -> None:
    reducer = fa.mean()
    assert reducer.update_by_norms is None
    with pytest.raises(fa.FuncaccumError, match=r"needs a reducer that clips by norm"):
        _fold.add_by_norms(
            reducer,
            _fold.init(reducer, params()),
            torch.ones(2, dtype=F64),
            torch.ones(2, dtype=F64),
            lambda c: params(),
            torch.tensor(1.0, dtype=F64),
        )
