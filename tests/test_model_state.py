"""funcaccum/_model_state.py: batch norm's running statistics from side-by-side microbatches."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional

import funcaccum as fa
from funcaccum import _model_state
from funcaccum.testing import assert_trees_allclose


def test_running_stats_closed_form_equals_the_sequential_update() -> None:
    """Chunks of 2 of 5 microbatches (2, 2, 1), over three steps: the loop's statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.3)).double()
    apply, params, buffers = fa.functional_model(model, has_state=True)

    def loss_fn(params: dict, state: dict, batch: torch.Tensor) -> tuple:
        out, state = apply(params, state, batch)
        return out.pow(2).mean(), state

    loop = fa.Accumulation(num_microbatches=5, has_state=True)
    side = fa.Accumulation(
        num_microbatches=5,
        has_state=True,
        strategy=fa.chunked(2, model_state=fa.running_stats(model)),
    )
    state = buffers
    for seed in range(3):
        batch = torch.randn(
            17, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
        want = loop.runner(loss_fn).fold(params, batch, model_state=state).model_state
        got = side.runner(loss_fn).fold(params, batch, model_state=state).model_state
        assert_trees_allclose(got, want, rtol=1e-12, atol=1e-14)
        state = want
    assert int(state["1.num_batches_tracked"]) == 15
    with pytest.raises(fa.FuncaccumError, match="momentum=None"):
        fa.running_stats(nn.BatchNorm1d(4, momentum=None))


@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0])
def test_the_ema_closed_form_equals_the_recurrence(momentum: float) -> None:
    """``r_k = (1-m) r_(k-1) + m mu_k`` in order, from K updates each made from ``r_0``."""
    g = torch.Generator().manual_seed(0)
    old = torch.randn(3, 4, generator=g, dtype=torch.float64)
    means = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)  # mu_k, K = 5
    a = 1 - momentum
    stacked = a * old + momentum * means  # each microbatch alone, from old
    want = old
    for mu in means:
        want = a * want + momentum * mu
    torch.testing.assert_close(
        _model_state._ema(old, stacked, momentum), want, rtol=1e-12, atol=1e-14
    )
    # One microbatch is the update itself; float32 in, float32 out (the sums run in float64).
    torch.testing.assert_close(_model_state._ema(old, stacked[:1], momentum), stacked[0])
    assert _model_state._ema(old.float(), stacked.float(), momentum).dtype == torch.float32


def test_combine_equals_batch_norm_run_microbatch_after_microbatch() -> None:
    """Direct on a BatchNorm2d: K states each from the old one, combined, are the loop's."""
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(3, momentum=0.2).double()
    combine = fa.running_stats(norm)
    x = torch.randn(4, 2, 3, 5, 5, dtype=torch.float64) * 2 + 1  # K = 4 microbatches of 2
    norm.running_mean.add_(0.3)  # a state that is not the initial one
    old = {name: b.clone() for name, b in norm.named_buffers()}
    sides = []
    for xk in x:
        sides.append({name: b.clone() for name, b in old.items()})
        functional.batch_norm(
            xk, sides[-1]["running_mean"], sides[-1]["running_var"], training=True, momentum=0.2
        )
        sides[-1]["num_batches_tracked"] += 1
    for xk in x:  # the loop: the module's own update, in order
        norm(xk)
    stacked = {name: torch.stack([s[name] for s in sides]) for name in old}
    assert_trees_allclose(combine(old, stacked), dict(norm.named_buffers()), rtol=1e-12, atol=1e-14)
    assert int(combine(old, stacked)["num_batches_tracked"]) == 4


def test_running_stats_names_the_buffers_and_refuses_a_state_it_does_not_know() -> None:
    model = nn.Sequential(
        nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Sequential(nn.BatchNorm1d(3, momentum=0.5))
    )
    combine = fa.running_stats(model)
    old = {name: b.clone() for name, b in model.named_buffers()}
    assert set(old) == {
        f"{prefix}.{kind}"
        for prefix in ("1", "2.0")
        for kind in ("running_mean", "running_var", "num_batches_tracked")
    }
    stacked = {name: torch.stack([b, b]) for name, b in old.items()}
    assert set(combine(old, stacked)) == set(old)
    message = r"running_stats\(Sequential\) combines the buffers"
    with pytest.raises(fa.FuncaccumError, match=message):
        combine({"running_mean": old["1.running_mean"]}, stacked)


def test_batch_norm_without_running_statistics_has_nothing_to_combine() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3, track_running_stats=False))
    assert fa.running_stats(model)({}, {}) == {}
