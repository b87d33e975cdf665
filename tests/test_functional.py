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
