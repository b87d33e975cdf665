"""Decay masks and parameter groups follow torch.optim's parameter groups."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import mlp_params
from torch import nn

import funcaccum as fa
from funcaccum import optim
from funcaccum.testing import assert_trees_allclose, assert_trees_equal

STEPS = 50
TOL = {"rtol": 1e-10, "atol": 1e-12}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 3)).double()


def make_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(6, 3, generator=g, dtype=torch.float64)
    batches = []
    for _ in range(5):
        x = torch.randn(24, 6, generator=g, dtype=torch.float64)
        batches.append((x, (x @ teacher).argmax(-1)))
    return batches


def torch_run(
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    at_half: Callable[[torch.optim.Optimizer], None] | None = None,
) -> dict[str, torch.Tensor]:
    model, batches = make_model(), make_batches()
    opt = make_optimizer(model)
    for step in range(STEPS):
        if step == STEPS // 2 and at_half is not None:
            at_half(opt)
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


def funcaccum_run(
    rule: optim.GradientTransformation, at_half: Callable[[Any], Any] | None = None
) -> dict[str, torch.Tensor]:
    model, batches = make_model(), make_batches()
    apply, params, buffers = fa.functional_model(model)

    def loss_fn(params: dict, batch: tuple) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(apply(params, buffers, x), y)

    step = fa.train_step(loss_fn, optimizer=rule, accumulation=fa.Accumulation(num_microbatches=3))
    state = step.init(params)
    for i in range(STEPS):
        if i == STEPS // 2 and at_half is not None:
            state = state._replace(opt_state=at_half(state.opt_state))
        state, _ = step(state, batches[i % len(batches)])
    return state.params


def two_groups(model: nn.Module, **decayed: Any) -> list[dict[str, Any]]:
    """torch's usual split: matrices decay, biases and norm scales do not."""
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.ndim >= 2], **decayed},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


MASKED = [
    pytest.param(
        lambda m: torch.optim.AdamW(two_groups(m, weight_decay=0.1), lr=3e-3),
        lambda: optim.adamw(3e-3, weight_decay=0.1, mask=optim.decay_mask),
        lambda: optim.adamw(3e-3, weight_decay=0.1),
        id="adamw",
    ),
    pytest.param(
        lambda m: torch.optim.Adam(two_groups(m, weight_decay=0.05), lr=3e-3),
        lambda: optim.adam(3e-3, weight_decay=0.05, mask=optim.decay_mask),
        lambda: optim.adam(3e-3, weight_decay=0.05),
        id="adam-l2",
    ),
    pytest.param(
        lambda m: torch.optim.SGD(two_groups(m, weight_decay=0.05), lr=0.05, momentum=0.9),
        lambda: optim.sgd(0.05, momentum=0.9, weight_decay=0.05, mask=optim.decay_mask),
        lambda: optim.sgd(0.05, momentum=0.9, weight_decay=0.05),
        id="sgd",
    ),
]


@pytest.mark.parametrize(("torch_rule", "rule", "unmasked"), MASKED)
def test_a_decay_mask_follows_torch_with_two_parameter_groups(
    torch_rule: Callable, rule: Callable, unmasked: Callable
) -> None:
    expected = torch_run(torch_rule)
    got = funcaccum_run(rule())
    assert_trees_allclose(got, expected, **TOL)
    # The mask is what makes the match: without it the biases drift away.
    everything = funcaccum_run(unmasked())
    assert not torch.allclose(everything["0.bias"], expected["0.bias"], **TOL)


def head_or_body(params: dict[str, Any]) -> dict[str, str]:
    """The last layer ("3.weight", "3.bias") is the head."""
    return {name: "head" if name.startswith("3.") else "body" for name in params}


def by_layer(model: nn.Module, head: dict, body: dict) -> list[dict[str, Any]]:
    return [
        {"params": list(model[0].parameters()) + list(model[2].parameters()), **body},
        {"params": list(model[3].parameters()), **head},
    ]


def half_head_rate(opt_state: optim.MultiTransformState) -> optim.MultiTransformState:
    """Change one group's hyperparameter: that group's state, replaced."""
    head = opt_state.inner_states["head"]
    rate = optim.get_hyperparams(head)["learning_rate"]
    head = optim.set_hyperparams(head, learning_rate=rate / 2)
    return opt_state._replace(inner_states={**opt_state.inner_states, "head": head})


def torch_half_head_rate(opt: torch.optim.Optimizer) -> None:
    opt.param_groups[1]["lr"] /= 2


GROUPS = [
    pytest.param(
        lambda m: torch.optim.SGD(
            by_layer(m, head={"lr": 0.2}, body={"lr": 0.02}), lr=0.1, momentum=0.9
        ),
        lambda: optim.multi_transform(
            {"head": optim.sgd(0.2, momentum=0.9), "body": optim.sgd(0.02, momentum=0.9)},
            head_or_body,
        ),
        id="sgd",
    ),
    pytest.param(
        lambda m: torch.optim.AdamW(
            by_layer(m, head={"lr": 1e-2, "weight_decay": 0.0}, body={"lr": 1e-3}),
            lr=5e-3,
            weight_decay=0.1,
        ),
        lambda: optim.multi_transform(
            {
                "head": optim.adamw(1e-2, weight_decay=0.0),
                "body": optim.adamw(1e-3, weight_decay=0.1),
            },
            head_or_body,
        ),
        id="adamw",
    ),
]


@pytest.mark.parametrize(("torch_rule", "rule"), GROUPS)
def test_multi_transform_follows_torch_parameter_groups(
    torch_rule: Callable, rule: Callable
) -> None:
    assert_trees_allclose(funcaccum_run(rule()), torch_run(torch_rule), **TOL)


@pytest.mark.parametrize(("torch_rule", "rule"), GROUPS)
def test_one_groups_rate_changes_as_in_torch(torch_rule: Callable, rule: Callable) -> None:
    expected = torch_run(torch_rule, at_half=torch_half_head_rate)
    assert_trees_allclose(funcaccum_run(rule(), at_half=half_head_rate), expected, **TOL)


def test_two_groups_that_differ_in_decay_equal_a_decay_mask() -> None:
    params, grads = mlp_params(), mlp_params(seed=1)
    by_groups = optim.multi_transform(
        {"decay": optim.adamw(1e-3, weight_decay=0.1), "none": optim.adamw(1e-3, weight_decay=0)},
        lambda tree: {layer: {"w": "decay", "b": "none"} for layer in tree},
    )
    by_mask = optim.adamw(1e-3, weight_decay=0.1, mask=optim.decay_mask)
    first, second = by_groups.init(params), by_mask.init(params)
    for _ in range(3):
        a, first = by_groups.update(grads, first, params)
        b, second = by_mask.update(grads, second, params)
        assert_trees_equal(a, b)


def test_masked_state_covers_the_masked_in_leaves_only() -> None:
    params = mlp_params()
    rule = optim.masked(optim.scale_by_adam(), optim.decay_mask)
    state = rule.init(params)
    assert isinstance(state, optim.MaskedState)
    assert state.inner_state.mu["layer0"]["b"] is None
    assert state.inner_state.mu["layer0"]["w"].shape == params["layer0"]["w"].shape
    updates, _ = rule.update(params, state, params)
    assert_trees_equal(updates["layer1"]["b"], params["layer1"]["b"])  # passed through


def test_a_prefix_mask_marks_whole_subtrees() -> None:
    params = mlp_params()
    rule = optim.add_decayed_weights(1.0, mask={"layer0": True, "layer1": False})
    zeros = fa.tree.zeros_like(params)
    updates, _ = rule.update(zeros, rule.init(params), params)
    assert_trees_equal(updates["layer0"], params["layer0"])
    assert_trees_equal(updates["layer1"], zeros["layer1"])


def test_hyperparams_are_found_and_set_inside_masks_and_groups() -> None:
    params = mlp_params()
    rule = optim.multi_transform(
        {"a": optim.adamw(1e-3, mask=optim.decay_mask), "b": optim.sgd(0.1, momentum=0.5)},
        {"layer0": "a", "layer1": "b"},
    )
    state = rule.init(params)
    found = optim.get_hyperparams(state)
    assert sorted(found) == ["b1", "b2", "eps", "learning_rate", "momentum", "weight_decay"]
    assert found["learning_rate"].item() == 1e-3  # the first group's
    state = optim.set_hyperparams(state, learning_rate=0.5, weight_decay=0.2)
    for group in state.inner_states.values():  # set in every group
        assert optim.get_hyperparams(group)["learning_rate"].item() == 0.5
    assert optim.get_hyperparams(state.inner_states["a"])["weight_decay"].item() == 0.2
    with pytest.raises(fa.FuncaccumError, match="learning_rate must be >= 0"):
        optim.set_hyperparams(state, learning_rate=-1.0)


def nested(w: Any = True, b: Any = False) -> dict[str, Any]:
    return {"layer0": {"w": w, "b": b}, "layer1": {"w": w, "b": b}}


@pytest.mark.parametrize(
    ("mask", "words"),
    [
        pytest.param(
            {"layer0": {"w": True}, "layer1": {"w": True, "b": False}},
            "mask does not match params: params['layer0']['b'] has no entry in mask",
            id="missing",
        ),
        pytest.param(
            {**nested(), "layer2": True},
            "mask['layer2'] names no param",
            id="extra",
        ),
        pytest.param(
            {"layer0": {"weight": True, "b": False}, "layer1": True},
            "params['layer0']['w'] has no entry in mask; mask['layer0']['weight'] names no param",
            id="renamed",
        ),
        pytest.param(nested(b=1), "mask gives 1 for params['layer0']['b']", id="int"),
        pytest.param(nested(b="no"), "mask gives 'no' (a str) for params['layer0']['b']", id="str"),
        pytest.param(
            nested(w=torch.tensor(True)), "for params['layer0']['w']; each entry", id="tensor"
        ),
        pytest.param(
            lambda params: {"layer0": True}, "params['layer1']['b'], params['layer1']['w']", id="fn"
        ),
    ],
)
def test_a_mask_that_does_not_fit_the_params_names_the_path(mask: Any, words: str) -> None:
    rule = optim.adamw(1e-3, mask=mask)
    with pytest.raises(fa.FuncaccumError, match=re.escape(words)):
        rule.init(mlp_params())


def test_a_mask_in_other_containers_is_refused() -> None:
    params = {"layers": [torch.zeros(2, 2), torch.zeros(2)]}
    rule = optim.masked(optim.scale_by_adam(), {"layers": (True, False)})
    with pytest.raises(fa.FuncaccumError, match="mask does not match params: its containers"):
        rule.init(params)


@pytest.mark.parametrize(
    ("labels", "words"),
    [
        pytest.param(
            {"layer0": "a", "layer1": "c"},
            "param_labels gives 'c' (a str) for params['layer1']['b']; each entry must be one "
            "of the labels of transforms, ['a', 'b']",
            id="unknown-label",
        ),
        pytest.param(
            {"layer0": "a"}, "params['layer1']['b'], params['layer1']['w'] have no entry", id="few"
        ),
        pytest.param(lambda params: None, "param_labels gives None", id="fn-none"),
    ],
)
def test_labels_that_do_not_fit_are_refused(labels: Any, words: str) -> None:
    rule = optim.multi_transform({"a": optim.sgd(0.1), "b": optim.sgd(0.2)}, labels)
    with pytest.raises(fa.FuncaccumError, match=re.escape(words)):
        rule.init(mlp_params())


@pytest.mark.parametrize(
    ("make", "words"),
    [
        pytest.param(
            lambda: optim.multi_transform({}, {}), "transforms must be a non-empty dict", id="empty"
        ),
        pytest.param(
            lambda: optim.multi_transform({"a": optim.sgd}, {}),
            "transforms['a'] must be a GradientTransformation",
            id="uncalled",
        ),
        pytest.param(
            lambda: optim.multi_transform({1: optim.sgd(0.1)}, {}),
            "labels must be strings",
            id="int-label",
        ),
        pytest.param(
            lambda: optim.masked(optim.sgd, optim.decay_mask),
            "masked's inner must be a GradientTransformation",
            id="masked-uncalled",
        ),
    ],
)
def test_bad_groups_are_refused_when_made(make: Callable, words: str) -> None:
    with pytest.raises(fa.FuncaccumError, match=re.escape(words)):
        make()


def test_group_states_are_checked_at_update() -> None:
    params = mlp_params()
    two = optim.multi_transform(
        {"a": optim.sgd(0.1), "b": optim.sgd(0.2)}, {"layer0": "a", "layer1": "b"}
    )
    other = optim.multi_transform({"a": optim.sgd(0.1)}, {"layer0": "a", "layer1": "a"})
    with pytest.raises(fa.FuncaccumError, match=r"state for the labels \['a'\], not \['a', 'b'\]"):
        two.update(params, other.init(params), params)
    masked = optim.masked(optim.sgd(0.1), optim.decay_mask)
    with pytest.raises(fa.FuncaccumError, match=r"masked\(\)'s update got MultiTransformState"):
        masked.update(params, two.init(params), params)


@pytest.mark.compile
def test_masks_and_groups_trace_into_one_graph() -> None:
    """The mask, the labels and the state checks are plain Python: no graph break."""
    params = mlp_params()
    grads = mlp_params(seed=1)
    for rule in (
        optim.adamw(1e-3, mask=optim.decay_mask),
        optim.multi_transform(
            {"a": optim.adamw(1e-3), "b": optim.sgd(0.1, momentum=0.9)},
            lambda tree: {layer: "a" if layer == "layer0" else "b" for layer in tree},
        ),
    ):
        torch._dynamo.reset()
        state = rule.init(params)

        def step(state: Any, rule: optim.GradientTransformation = rule) -> tuple:
            # train_step reads the rate with get_hyperparams inside its graph.
            updates, state = rule.update(grads, state, params)
            return updates, state, optim.get_hyperparams(state)["learning_rate"]

        compiled = torch.compile(step, backend="eager", fullgraph=True)
        assert_trees_allclose(compiled(state), step(state))
