"""Modules as pure functions: gradients agree with ordinary autograd on the module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import funcaccum as fa
from funcaccum.testing import assert_trees_allclose


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.GELU(), nn.Linear(12, 4))
    model.double()
    model[1].running_mean.normal_()  # nontrivial buffers, used in eval mode
    return model.eval()


@pytest.mark.parametrize("options", [{"strategy": "vmap"}, {"strategy": "scan"}])
def test_accumulated_gradient_matches_module_backward(options: dict) -> None:
    model = make_model()
    x, y = torch.randn(21, 6, dtype=torch.float64), torch.randint(4, (21,))
    apply, params, buffers = fa.functional_model(model)

    def loss_fn(params: dict, batch: tuple) -> torch.Tensor:
        inputs, targets = batch
        return nn.functional.cross_entropy(apply(params, buffers, inputs), targets)

    result = fa.accumulate(loss_fn, params, (x, y), num_microbatches=4, **options)
    nn.functional.cross_entropy(model(x), y).backward()
    expected = {name: p.grad for name, p in model.named_parameters()}
    assert_trees_allclose(result.grads, expected, rtol=1e-10, atol=1e-13)


def test_frozen_parameters_are_buffers_and_tied_weights_appear_once() -> None:
    embed = nn.Embedding(5, 3)
    model = nn.Sequential(embed, nn.Linear(3, 5, bias=False))
    model[1].weight = embed.weight  # tied
    model[0].weight.requires_grad_(True)
    _, params, _ = fa.functional_model(model)
    assert list(params) == ["0.weight"]
    frozen = nn.Linear(2, 2)
    frozen.bias.requires_grad_(False)
    _, params, buffers = fa.functional_model(frozen)
    assert list(params) == ["weight"]
    assert list(buffers) == ["bias"]


@pytest.mark.distributed
def test_a_sharded_module_is_refused_where_functional_call_would_ignore_its_params(
    one_process_group: object,
) -> None:
    """functional_call on an FSDP2 module runs on FSDP's params: zero gradients, no error."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, distribute_tensor

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    fully_shard(model, mesh=one_process_group)
    for use in (fa.functional_model, fa.ghost, lambda m: fa.load_into(m, params)):
        with pytest.raises(
            fa.FuncaccumError, match=r"the module itself went through FSDP2's fully_shard"
        ):
            use(model)
    with pytest.raises(fa.FuncaccumError, match=r"funcaccum\.distributed\.FullyShardedStep"):
        fa.functional_model(model)
    # DTensor params without FSDP (tensor parallelism, say): refused as well.
    plain = nn.Linear(3, 2).double()
    plain.weight = nn.Parameter(
        distribute_tensor(plain.weight.detach(), one_process_group, [Replicate()])
    )
    with pytest.raises(fa.FuncaccumError, match="the DTensor 'weight'"):
        fa.functional_model(plain)


def regression_loss(apply, buffers):
    def loss_fn(params: dict, batch: tuple) -> torch.Tensor:
        return ((apply(params, buffers, batch[0]).squeeze(-1) - batch[1]) ** 2).mean()

    return loss_fn


def test_the_train_eval_mode_is_captured_and_a_change_is_refused() -> None:
    """model.eval() for an evaluation, then the next step: refused, not trained in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    apply, params, buffers = fa.functional_model(model)
    accumulation = fa.Accumulation(strategy=fa.vmap(randomness="different"))
    step = fa.train_step(regression_loss(apply, buffers), optimizer=fa.optim.sgd(0.1),
                         accumulation=accumulation)  # fmt: skip
    state = step.init(params)
    batch = (torch.randn(8, 3), torch.randn(8))
    state, _ = step(state, batch)
    model.eval()
    with pytest.raises(fa.FuncaccumError, match=r"made functional in training mode and is now in eval mode \(at \[.*'1'"):  # noqa: E501
        step(state, batch)
    evaluate, _, _ = fa.functional_model(model)  # an apply for the eval mode: no dropout
    out = evaluate(state.params, buffers, batch[0])
    assert torch.equal(out, evaluate(state.params, buffers, batch[0]))
    model.train()
    step(state, batch)  # back in the mode it was made in
    with pytest.raises(fa.FuncaccumError, match="made functional in eval mode"):
        evaluate(state.params, buffers, batch[0])


def test_an_apply_made_in_eval_mode_never_writes_the_module_buffers() -> None:
    model = make_model()  # eval mode, batch norm with running statistics
    before = model[1].running_mean.clone()
    apply, params, buffers = fa.functional_model(model)
    model.train()
    with pytest.raises(fa.FuncaccumError, match=r"now in training mode"):
        apply(params, buffers, torch.randn(4, 6, dtype=torch.float64))
    assert torch.equal(model[1].running_mean, before)


def test_batch_norm_without_running_statistics_needs_no_model_state() -> None:
    """It keeps no buffers: accepted without has_state, each microbatch normalised alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False),
                          nn.Linear(4, 1)).double()  # fmt: skip
    apply, params, buffers = fa.functional_model(model)
    assert buffers == {}
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    got = fa.accumulate(regression_loss(apply, buffers), params, (x, y), num_microbatches=2)
    halves = [((model(x[i:i + 4]).squeeze(-1) - y[i:i + 4]) ** 2).mean() / 2 for i in (0, 4)]
    (halves[0] + halves[1]).backward()  # the hand-written loop: each half its own statistics
    assert_trees_allclose(got.grads, {n: p.grad for n, p in model.named_parameters()},
                          rtol=1e-10, atol=1e-13)  # fmt: skip
    step = fa.train_step(regression_loss(apply, buffers), optimizer=fa.optim.sgd(0.1),
                         accumulation=fa.Accumulation(has_state=True))  # fmt: skip
    with pytest.raises(fa.FuncaccumError, match="track_running_stats=False keeps none"):
        step.init(params, model_state=buffers)


def test_batch_norm_on_one_example_microbatches_is_explained() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    apply, params, buffers = fa.functional_model(model, has_state=True)

    def loss_fn(params: dict, state: dict, batch: torch.Tensor) -> tuple:
        out, state = apply(params, state, batch)
        return out.pow(2).mean(), state

    accumulation = fa.Accumulation(microbatch_size=1, has_state=True)
    step = fa.train_step(loss_fn, optimizer=fa.optim.sgd(0.1), accumulation=accumulation)
    with pytest.raises(fa.FuncaccumError, match="a microbatch of one example has no batch stat"):
        step(step.init(params, model_state=buffers), torch.randn(4, 3))


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda b: {k: v for k, v in b.items() if "var" not in k}, r"missing \['1.running_var'\]"),
        (lambda b: {**b, "1.running_mean": torch.zeros(5)}, r"'1.running_mean' has shape \(5,\)"),
        (lambda b: {**b, "1.running_mean": b["1.running_mean"].double()}, "is torch.float64"),
        (lambda b: list(b.values()), r"buffers is .*\(a list\)"),
    ],
    ids=["missing", "shape", "dtype", "a-list"],
)
def test_buffers_that_do_not_fit_the_module_are_named(change, words: str) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    apply, params, buffers = fa.functional_model(model)
    with pytest.raises(fa.FuncaccumError, match=words):
        apply(params, change(buffers), torch.randn(4, 3))
