"""funcaccum/_ghost.py: ghost clipping, its per-layer rules, what it taps and what it refuses."""

from __future__ import annotations

import copy
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

    with pytest.raises(fa.FuncaccumError, match="how the loss's weight splits among the examples"):
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
        for index, (chunk_size, sizes) in enumerate(((1, [1] * 12), (5, [5, 5, 2]), (None, [12]))):
            passes.clear()
            got = fa.accumulate(
                loss_fn, params, batch, reducer=reducer, microbatch_size=1,
                strategy=fa.ghost(model, chunk_size=chunk_size),
            )  # fmt: skip
            # The loss is checked once per module and loss, on the first group's first 3 units
            # (docs: ghost checks its loss): together (with grad), then one by one.
            assert passes == [*([3, 1, 1, 1] if index == 0 else []), *sizes]
            # Ghost takes its norms in float32, so the clip factors match to float32 precision.
            assert_trees_allclose(got.grads, want.grads, rtol=1e-5, atol=1e-8)
    finally:
        handle.remove()


def test_ghost_refuses_what_it_cannot_do_with_a_clear_error() -> None:
    model, loss_fn, _, _ = _ghost_setup()
    clipped = fa.clipped_mean(0.3)
    with pytest.raises(fa.FuncaccumError, match="without aux or model state"):
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
    # Linear with one row per unit (an MLP): |d|^2 |x|^2.
    pytest.param(lambda: (nn.Linear(5, 3), torch.randn(3, 5)), id="linear-one-row"),
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


# Token-mean losses, shared position embeddings, and what ghost refuses.


class TinyGPT(nn.Module):
    """Token and shared position embeddings, causal sdpa attention, a layer norm, a head."""

    def __init__(self, vocab: int = 11, dim: int = 8, context: int = 6) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.qkv, self.norm, self.head = (
            nn.Linear(dim, 3 * dim),
            nn.LayerNorm(dim),
            nn.Linear(dim, vocab),
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Positions looked up once for the whole batch, (t,): GPT-2's and nanoGPT's way.
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = x + functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(self.norm(x))


def token_batch(n: int = 7, length: int = 6) -> dict[str, torch.Tensor]:
    """Right-padded sequences of different lengths; padding is -100 in the labels."""
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(11, (n, length), generator=g)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    labels = ids.roll(-1, 1).masked_fill(torch.arange(length) >= lengths[:, None], -100)
    return {"ids": ids, "labels": labels}


def token_mean_loss(model: nn.Module) -> tuple[Callable, Callable, dict]:
    """The mean over valid tokens, as Hugging Face's labels= loss; and with its token count."""
    torch.manual_seed(0)
    model = model.double()
    apply, params, buffers = fa.functional_model(model)

    def plain(params: dict, batch: dict) -> torch.Tensor:
        logits = apply(params, buffers, batch["ids"])
        return functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    def weighted(params: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return plain(params, batch), (batch["labels"] != -100).sum()

    return plain, weighted, params


def valid_tokens(batch: dict) -> torch.Tensor:
    return (batch["labels"] != -100).sum(1)


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_ghost_on_a_token_mean_loss_equals_scan(noise: float) -> None:
    """Each unit's gradient is of its own token mean, whatever the other units' lengths."""
    model = TinyGPT()
    _, weighted, params = token_mean_loss(model)
    strategy = fa.ghost(model, example_weights=valid_tokens)
    assert "positions" in strategy.layers
    assert strategy.fallback == ()
    batch = token_batch()
    results = {}
    for name, how in (("scan", "scan"), ("ghost", strategy)):
        reducer = fa.clipped_mean(
            2.0, noise_multiplier=noise, denominator=7 if noise else None,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        results[name] = fa.accumulate(
            weighted, params, batch, reducer=reducer, microbatch_size=1, strategy=how,
            has_weight=True,
        )  # fmt: skip
    assert_trees_allclose(results["ghost"].grads, results["scan"].grads, rtol=0, atol=1e-12)
    assert_trees_allclose(results["ghost"].stats, results["scan"].stats, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(results["ghost"].loss, results["scan"].loss, rtol=1e-13, atol=0)
    assert 0 < results["scan"].stats.clip_fraction < 1


def test_ghost_refuses_a_token_mean_loss_it_cannot_split() -> None:
    """A mean over the chunk's tokens is not the mean of the units' own losses: refused."""
    model = TinyGPT()
    plain, _, params = token_mean_loss(model)
    with pytest.raises(fa.FuncaccumError, match="a mean over tokens, not over examples"):
        fa.accumulate(
            plain, params, token_batch(), reducer=fa.clipped_mean(0.3), microbatch_size=1,
            strategy=fa.ghost(model),
        )  # fmt: skip


def test_ghost_refuses_example_weights_that_do_not_match_the_loss() -> None:
    model = TinyGPT()
    plain, weighted, params = token_mean_loss(model)
    reducer = fa.clipped_mean(0.3)
    with pytest.raises(fa.FuncaccumError, match="is for a weighted loss: pass has_weight=True"):
        fa.accumulate(
            plain, params, token_batch(), reducer=reducer, microbatch_size=1,
            strategy=fa.ghost(model, example_weights=valid_tokens),
        )  # fmt: skip
    with pytest.raises(fa.FuncaccumError, match=r"the loss returned weight .* sum to"):
        fa.accumulate(
            weighted, params, token_batch(), reducer=reducer, microbatch_size=1, has_weight=True,
            strategy=fa.ghost(model, example_weights=lambda b: torch.ones(b["ids"].shape[0])),
        )  # fmt: skip
    with pytest.raises(fa.FuncaccumError, match=r"one weight per example, shape \(3,\)"):
        fa.accumulate(
            weighted, params, token_batch(), reducer=reducer, microbatch_size=1, has_weight=True,
            strategy=fa.ghost(model, example_weights=lambda b: b["labels"]),
        )  # fmt: skip


def test_ghost_refuses_a_module_the_loss_does_not_run() -> None:
    """Another module of the same architecture: its hooks never fire (zero gradient before)."""
    model, loss_fn, params, batch = _ghost_setup()
    twin = copy.deepcopy(model)
    with pytest.raises(fa.FuncaccumError, match="none of the layers of the module given"):
        fa.accumulate(
            loss_fn, params, batch, reducer=fa.clipped_mean(0.3), microbatch_size=1,
            strategy=fa.ghost(twin),
        )  # fmt: skip


def test_ghost_refuses_an_l2_penalty_on_the_params() -> None:
    """The penalty's gradient does not pass through the layers' outputs: missing from norms."""
    model, loss_fn, params, batch = _ghost_setup()

    def penalised(params: dict, batch: tuple) -> torch.Tensor:
        return loss_fn(params, batch) + 1e-2 * sum((p**2).sum() for p in params.values())

    with pytest.raises(fa.FuncaccumError, match=r"uses the parameter '\d.\w+' outside its layer"):
        fa.accumulate(
            penalised, params, batch, reducer=fa.clipped_mean(0.3), microbatch_size=1,
            strategy=fa.ghost(model),
        )  # fmt: skip


def test_ghost_explains_a_vmap_failure_in_its_general_path() -> None:
    """Parameters outside the tapped layers take per-unit gradients under vmap; a model vmap
    cannot batch (a data-dependent branch, as sdpa's mask check) gets the hint, not vmap's raw
    error."""

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 2)
            self.scale = nn.Parameter(torch.ones(2))  # no layer: the general path

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.layer(x) * self.scale
            return out if bool(out.sum() > -1e9) else -out  # data-dependent control flow

    model = Branchy()
    apply, params, buffers = fa.functional_model(model)

    def loss_fn(params: dict, batch: tuple) -> torch.Tensor:
        return functional.cross_entropy(apply(params, buffers, batch[0]), batch[1])

    batch = (torch.randn(6, 4), torch.randint(2, (6,)))
    hint = r"(?s)\(scale\) under torch.func.vmap.*strategy=scan"
    with pytest.raises(fa.FuncaccumError, match=hint):
        fa.accumulate(
            loss_fn, params, batch, reducer=fa.clipped_mean(0.3), microbatch_size=1,
            strategy=fa.ghost(model),
        )  # fmt: skip


def test_ghost_probes_a_layer_whose_output_is_changed_in_place() -> None:
    """ReLU(inplace=True) rewrites the Linear's output: its gradient is then taken by a probe."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)).double()
    apply, params, buffers = fa.functional_model(model)

    def loss_fn(params: dict, batch: tuple) -> torch.Tensor:
        return functional.cross_entropy(apply(params, buffers, batch[0]), batch[1])

    g = torch.Generator().manual_seed(1)
    batch = (
        torch.randn(10, 4, generator=g, dtype=torch.float64),
        torch.randint(3, (10,), generator=g),
    )
    reducer = fa.clipped_mean(1.3)
    want = fa.accumulate(loss_fn, params, batch, reducer=reducer, microbatch_size=1)
    got = fa.accumulate(
        loss_fn, params, batch, reducer=reducer, microbatch_size=1, strategy=fa.ghost(model)
    )
    assert_trees_allclose(got.grads, want.grads, rtol=1e-12, atol=1e-14)
    assert 0 < want.stats.clip_fraction < 1
