"""funcaccum/_ghost.py: ghost clipping, its per-layer rules, what it taps and what it refuses."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from test_per_example import CASES, Batch, functional_loss, median_norm, mlp_case
from torch import nn
from torch.nn import functional

import funcaccum as fa
from funcaccum import _ghost
from funcaccum.testing import assert_trees_allclose

# ghost(): equal to the general path, what it taps, chunks, refusals.


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("microbatch_size", [1, 3])
def test_ghost_clipping_equals_the_general_path(case: Callable, microbatch_size: int) -> None:
    model, batch = case()
    loss_fn, params = functional_loss(model)
    reducer = fa.clipped_mean(median_norm(loss_fn, params, batch, microbatch_size))
    general = fa.accumulate(
        loss_fn, params, batch, reducer=reducer, microbatch_size=microbatch_size, strategy="vmap"
    )
    lean = fa.accumulate(
        loss_fn,
        params,
        batch,
        reducer=reducer,
        microbatch_size=microbatch_size,
        strategy=fa.ghost(model),
    )
    assert_trees_allclose(lean.grads, general.grads, rtol=1e-5, atol=1e-6)
    assert_trees_allclose(lean.stats, general.stats, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lean.loss, general.loss)
    assert 0 < general.stats.clip_fraction < 1  # some clipped, some not: the test has teeth


def test_ghost_taps_supported_layers_and_falls_back_for_the_rest() -> None:
    class Scaled(nn.Module):  # a parameter outside any supported layer
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(6, 3)
            self.scale = nn.Parameter(torch.tensor([1.5, -0.5, 2.0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x) * self.scale

    model = Scaled()
    strategy = fa.ghost(model)
    assert strategy.layers == {"layer": ("layer.weight", "layer.bias")}
    assert strategy.fallback == ("scale",)
    g = torch.Generator().manual_seed(4)
    batch = (torch.randn(10, 6, generator=g), torch.randint(3, (10,), generator=g))
    loss_fn, params = functional_loss(model)
    reducer = fa.clipped_mean(0.5)
    lean = fa.accumulate(
        loss_fn, params, batch, reducer=reducer, microbatch_size=1, strategy=strategy
    )
    general = fa.accumulate(
        loss_fn, params, batch, reducer=reducer, microbatch_size=1, strategy="vmap"
    )
    assert_trees_allclose(lean.grads, general.grads, rtol=1e-5, atol=1e-6)


def test_ghost_treats_tied_weights_as_fallback() -> None:
    model = nn.Sequential(nn.Embedding(7, 5), nn.Linear(5, 7, bias=False))
    model[1].weight = model[0].weight
    strategy = fa.ghost(model)
    assert strategy.layers == {}
    assert strategy.fallback == ("0.weight",)
    tokens = torch.randint(7, (8, 4), generator=torch.Generator().manual_seed(5))
    loss_fn, params = functional_loss(model)
    reducer = fa.clipped_mean(0.5)
    lean = fa.accumulate(
        loss_fn, params, (tokens, tokens), reducer=reducer, microbatch_size=1, strategy=strategy
    )
    general = fa.accumulate(
        loss_fn, params, (tokens, tokens), reducer=reducer, microbatch_size=1, strategy="vmap"
    )
    assert_trees_allclose(lean.grads, general.grads, rtol=1e-5, atol=1e-6)


def test_ghost_refuses_what_it_cannot_do() -> None:
    model, batch = mlp_case()
    loss_fn, params = functional_loss(model)
    with pytest.raises(fa.FuncaccumError, match="needs a reducer that clips by norm"):
        fa.accumulate(loss_fn, params, batch, microbatch_size=1, strategy=fa.ghost(model))

    def weighted(params: dict, batch: Batch) -> tuple:
        return loss_fn(params, batch), batch[1].shape[0]

    with pytest.raises(fa.FuncaccumError, match="has_weight, has_aux and has_state must be False"):
        fa.accumulate(
            weighted,
            params,
            batch,
            reducer=fa.clipped_mean(1.0),
            microbatch_size=1,
            strategy=fa.ghost(model),
            has_weight=True,
        )
    twice = nn.Sequential(nn.Linear(4, 4))

    def reuse(params: dict, batch: Batch) -> torch.Tensor:
        apply = fa.functional_model(twice)[0]
        return apply(params, {}, apply(params, {}, batch[0])).pow(2).mean()

    with pytest.raises(fa.FuncaccumError, match="ran twice in one forward"):
        fa.accumulate(
            reuse,
            fa.functional_model(twice)[1],
            (torch.randn(4, 4), torch.zeros(4)),
            reducer=fa.clipped_mean(1.0),
            microbatch_size=1,
            strategy=fa.ghost(twice),
        )


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
    model, loss_fn, _, _ = _ghost_setup()
    clipped = fa.clipped_mean(0.3)
    with pytest.raises(fa.FuncaccumError, match="no aux"):
        fa.Accumulation(reducer=clipped, strategy=fa.ghost(model), has_aux=True).runner(loss_fn)
    with pytest.raises(fa.FuncaccumError, match="clips by norm"):
        fa.train_step(
            loss_fn,
            optimizer=fa.optim.sgd(0.1),
            accumulation=fa.Accumulation(strategy=fa.ghost(model)),
        )
    with pytest.raises(fa.FuncaccumError, match="chunk_size must be >= 1, got 0"):
        fa.ghost(model, chunk_size=0)


def test_ghost_refuses_a_layout_or_params_it_cannot_read() -> None:
    model, loss_fn, params, batch = _ghost_setup()
    clipped = fa.clipped_mean(0.3)
    with pytest.raises(fa.FuncaccumError, match="needs batch leaves with batch_dim=0"):
        fa.Accumulation(reducer=clipped, strategy=fa.ghost(model), batch_dim=1).runner(loss_fn)
    with pytest.raises(fa.FuncaccumError, match="has_state must be False"):
        fa.Accumulation(reducer=clipped, strategy=fa.ghost(model), has_state=True).runner(loss_fn)
    as_list = list(params.values())
    with pytest.raises(fa.FuncaccumError, match="a dict keyed by the module's parameter names"):
        fa.accumulate(
            lambda p, b: loss_fn(dict(zip(params, p, strict=True)), b), as_list, batch,
            reducer=clipped, microbatch_size=1, strategy=fa.ghost(model),
        )  # fmt: skip


def test_ghost_falls_back_for_layers_without_a_rule_and_skips_frozen_ones() -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, groups=2),  # grouped: no rule, the general path
        nn.Flatten(),
        nn.Linear(36, 5),  # tapped
        nn.Linear(5, 4),  # weight frozen: not tapped, its bias takes the general path
        nn.Linear(4, 3),  # frozen: neither
    )
    model[3].weight.requires_grad_(False)
    model[4].requires_grad_(False)
    strategy = fa.ghost(model)
    assert strategy.layers == {"2": ("2.weight", "2.bias")}
    assert strategy.fallback == ("0.weight", "0.bias", "3.bias")


@pytest.mark.parametrize(
    "module",
    [
        pytest.param(nn.Conv2d(2, 4, 3, groups=2), id="conv-groups"),
        pytest.param(nn.Conv2d(2, 2, 3, padding="same"), id="conv-string-padding"),
        pytest.param(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), id="conv-reflect"),
        pytest.param(nn.Conv1d(2, 2, 3), id="conv1d"),
        pytest.param(nn.Embedding(5, 3, max_norm=1.0), id="embedding-max-norm"),
        pytest.param(nn.Embedding(5, 3, sparse=True), id="embedding-sparse"),
        pytest.param(nn.Embedding(5, 3, scale_grad_by_freq=True), id="embedding-freq"),
        pytest.param(nn.LayerNorm(4, elementwise_affine=False), id="layer-norm-no-affine"),
        pytest.param(type("MyLinear", (nn.Linear,), {})(3, 2), id="linear-subclass"),
    ],
)
def test_a_layer_without_a_known_rule_gets_none(module: nn.Module) -> None:
    """A subclass may change forward, so only the exact layer types get a rule."""
    assert _ghost._rule(module) is None


def _per_unit_grads(
    module: nn.Module, x: torch.Tensor, delta: torch.Tensor, count: int
) -> list[dict[str, torch.Tensor]]:
    """Each unit's gradient of ``sum <module(x_u), delta_u>`` by autograd, by parameter name."""
    names, params = zip(*module.named_parameters(), strict=True)
    out = []
    for xu, du in zip(x.chunk(count), delta.chunk(count), strict=True):
        grads = torch.autograd.grad((module(xu) * du).sum(), params)
        out.append(dict(zip(names, grads, strict=True)))
    return out


RULE_CASES = [
    # Linear with a short unit: the ghost identity (length * (in + out) <= in * out).
    pytest.param(lambda: (nn.Linear(8, 8), torch.randn(6, 2, 8)), id="linear-ghost-norm"),
    pytest.param(
        lambda: (nn.Linear(8, 8, bias=False), torch.randn(6, 2, 8)), id="linear-ghost-no-bias"
    ),
    # Linear with a long unit: the direct form.
    pytest.param(lambda: (nn.Linear(3, 2), torch.randn(9, 4, 3)), id="linear-direct"),
    pytest.param(
        lambda: (nn.Embedding(6, 4, padding_idx=0), torch.randint(6, (6, 5))),
        id="embedding-padding-idx",
    ),
    pytest.param(lambda: (nn.Embedding(6, 4), torch.randint(3, (6, 5))), id="embedding-repeats"),
    pytest.param(lambda: (nn.LayerNorm(5), torch.randn(6, 3, 5)), id="layer-norm"),
    pytest.param(
        lambda: (nn.Conv2d(2, 3, 3, padding=1, stride=2), torch.randn(6, 2, 5, 5)), id="conv2d"
    ),
    pytest.param(
        lambda: (nn.Conv2d(2, 3, 2, bias=False, dilation=2), torch.randn(6, 2, 5, 5)),
        id="conv2d-dilated-no-bias",
    ),
]


@pytest.mark.parametrize("make", RULE_CASES)
def test_each_layer_rule_gives_the_per_unit_norms_and_weighted_sum(make: Callable) -> None:
    """From a layer's input and output gradient alone: autograd's per-unit gradients' norms,
    and ``sum_u c_u g_u``, for 3 units of 2 examples each, in float64."""
    torch.manual_seed(0)
    module, x = make()
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():  # non-trivial weights (layer norm starts at ones, zeros)
            p.normal_()
    x = x if not x.is_floating_point() else x.double()
    count = 3
    delta = torch.randn_like(module(x))
    rule = _ghost._rule(module)
    assert rule is not None
    squares, weighted_sum = rule(module, x, delta, count)
    per_unit = _per_unit_grads(module, x, delta, count)
    want = torch.stack([sum(g.square().sum() for g in grads.values()) for grads in per_unit])
    torch.testing.assert_close(squares, want, rtol=1e-12, atol=1e-12)
    assert (want > 0).all()
    coefficients = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    expected = {
        name: sum(c * grads[name] for c, grads in zip(coefficients, per_unit, strict=True))
        for name in per_unit[0]
    }
    assert_trees_allclose(weighted_sum(coefficients), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.compile
def test_ghost_inside_a_step_compiled_whole_is_refused() -> None:
    """Forward hooks and torch.autograd.grad do not trace: the refusal says what to do."""
    model, loss_fn, params, batch = _ghost_setup()
    step = fa.train_step(
        loss_fn,
        optimizer=fa.optim.sgd(0.1),
        accumulation=fa.Accumulation(
            reducer=fa.clipped_mean(0.3), microbatch_size=4, strategy=fa.ghost(model)
        ),
    )
    state = step.init(params)
    step(state, batch)  # eagerly it runs
    torch._dynamo.reset()
    compiled = torch.compile(step.step, fullgraph=True, backend="eager")
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"ghost\(\.\.\.\) runs eagerly"):
        compiled(state, batch)
