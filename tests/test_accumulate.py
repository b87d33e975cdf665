"""Exactness of accumulation: every strategy and split equals the full-batch gradient."""

from __future__ import annotations

import re
from collections import UserDict
from types import MappingProxyType
from typing import Any

import numpy as np
import optree
import pytest
import torch
from conftest import (
    classification_batch,
    mlp_loss,
    mlp_params,
    sequence_batch,
    sequence_params,
    token_losses,
    token_weighted_loss,
)
from torch.func import grad, grad_and_value

import funcaccum as fa
from funcaccum.testing import assert_trees_allclose, assert_trees_equal

STRATEGIES = [
    pytest.param({"strategy": "vmap"}, id="vmap"),
    pytest.param({"strategy": "scan"}, id="scan"),
    pytest.param({"strategy": fa.chunked(2)}, id="chunked2"),
]


@pytest.mark.parametrize("options", STRATEGIES)
@pytest.mark.parametrize("k", [1, 3, 8])
def test_mean_equals_full_batch_gradient_float64(options: dict, k: int) -> None:
    params, batch = mlp_params(), classification_batch(19)  # 19 = 3*6+1 = 8*2+3: uneven
    full_loss_grads, full_loss = grad_and_value(mlp_loss)(params, batch)
    result = fa.accumulate(mlp_loss, params, batch, num_microbatches=k, **options)
    assert_trees_allclose(result.grads, full_loss_grads, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(result.loss, full_loss, rtol=1e-12, atol=0)
    assert result.weight.item() == 19


@pytest.mark.parametrize("options", STRATEGIES)
def test_mean_equals_full_batch_gradient_float32(options: dict) -> None:
    params, batch = mlp_params(torch.float32), classification_batch(19, torch.float32)
    result = fa.accumulate(mlp_loss, params, batch, num_microbatches=8, **options)
    assert_trees_allclose(result.grads, grad(mlp_loss)(params, batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", STRATEGIES)
def test_microbatch_size_with_partial_last_microbatch(options: dict) -> None:
    params, batch = mlp_params(), classification_batch(19)
    result = fa.accumulate(mlp_loss, params, batch, microbatch_size=4, **options)  # 4,4,4,4,3
    assert_trees_allclose(result.grads, grad(mlp_loss)(params, batch), rtol=1e-10, atol=1e-13)


def full_token_loss(params: dict, batch: dict) -> torch.Tensor:
    mask = batch["mask"].to(params["out"].dtype)
    return (token_losses(params, batch) * mask).sum() / mask.sum()


@pytest.mark.parametrize("options", STRATEGIES)
def test_token_weighted_loss_is_exact(options: dict) -> None:
    params, batch = sequence_params(), sequence_batch(13)
    result = fa.accumulate(
        token_weighted_loss, params, batch, num_microbatches=4, has_weight=True, **options
    )
    assert_trees_allclose(
        result.grads, grad(full_token_loss)(params, batch), rtol=1e-10, atol=1e-13
    )
    torch.testing.assert_close(result.loss, full_token_loss(params, batch), rtol=1e-12, atol=0)
    assert result.weight.item() == batch["mask"].sum().item()


def test_average_of_per_microbatch_means_is_wrong_for_token_losses() -> None:
    """The mistake the weight fixes: microbatches hold different numbers of valid tokens."""
    params, batch = sequence_params(), sequence_batch(13)

    def mean_over_tokens(params: dict, batch: dict) -> torch.Tensor:
        return token_weighted_loss(params, batch)[0]

    # Dividing each microbatch mean by K weights every microbatch equally (sizes 4,3,3,3).
    naive = [
        grad(mean_over_tokens)(params, {k: v[i::4] for k, v in batch.items()})["out"]
        for i in range(4)
    ]
    naive_mean = sum(naive) / 4
    exact = grad(full_token_loss)(params, batch)["out"]
    assert (naive_mean - exact).abs().max() > 1e-3
    weighted = fa.accumulate(
        token_weighted_loss, params, batch, num_microbatches=4, has_weight=True
    ).grads["out"]
    torch.testing.assert_close(weighted, exact, rtol=1e-10, atol=1e-13)


def clip_loop(params: dict, batch: dict, k: int, max_norm: float) -> dict:
    """The hand-written reference: clip each microbatch gradient, weight by its size, average."""
    total, count = None, 0
    for group in fa.split_microbatches(batch, num_microbatches=k):
        for i in range(group.count):
            microbatch = {name: leaf[i] for name, leaf in group.batch.items()}
            g = grad(mlp_loss)(params, microbatch)
            norm = fa.tree.global_norm(g)
            g = fa.tree.scale(g, group.size * min(1.0, max_norm / norm.item()))
            total = g if total is None else fa.tree.add(total, g)
            count += group.size
    return fa.tree.scale(total, 1 / count)


@pytest.mark.parametrize("options", STRATEGIES)
def test_clipped_mean_equals_hand_written_loop(options: dict) -> None:
    params, batch = mlp_params(), classification_batch(19)
    result = fa.accumulate(
        mlp_loss, params, batch, reducer=fa.clipped_mean(0.3), num_microbatches=8, **options
    )
    assert_trees_allclose(result.grads, clip_loop(params, batch, 8, 0.3), rtol=1e-10, atol=1e-13)
    assert 0 < result.stats.clip_fraction.item() <= 1
    assert result.stats.norm_max >= result.stats.norm_mean > result.stats.clipped_norm_mean
    assert result.stats.clipped_norm_mean <= 0.3 + 1e-12


def test_clipped_mean_with_unreachable_threshold_is_the_mean() -> None:
    params, batch = mlp_params(), classification_batch(19)
    clipped = fa.accumulate(
        mlp_loss, params, batch, reducer=fa.clipped_mean(1e9), num_microbatches=5
    )
    plain = fa.accumulate(mlp_loss, params, batch, num_microbatches=5)
    assert_trees_allclose(clipped.grads, plain.grads, rtol=1e-12, atol=0)
    assert clipped.stats.clip_fraction.item() == 0


def test_clipped_mean_stats_by_hand() -> None:
    reducer = fa.clipped_mean(1.0)
    state = reducer.init({"w": torch.zeros(2)})
    state = reducer.update(state, {"w": torch.tensor([3.0, 4.0])}, torch.tensor(1.0))
    state = reducer.update(state, {"w": torch.tensor([0.0, 0.5])}, torch.tensor(3.0))
    grads, stats = reducer.finalize(state)
    torch.testing.assert_close(grads["w"], torch.tensor([0.6, 0.8 + 1.5]) / 4)
    assert stats.clip_fraction.item() == 0.5
    assert stats.norm_mean.item() == pytest.approx(2.75)
    assert stats.norm_max.item() == pytest.approx(5.0)
    assert stats.clipped_norm_mean.item() == pytest.approx(0.75)


def test_clipped_mean_never_drops_an_infinite_gradient() -> None:
    reducer = fa.clipped_mean(1.0)
    state = reducer.init({"w": torch.zeros(2)})
    state = reducer.update(
        state, {"w": torch.tensor([[1.0, 0.0], [float("inf"), 0.0]])}, torch.ones(2)
    )
    grads, _ = reducer.finalize(state)
    assert grads["w"].isnan().any()


@pytest.mark.parametrize("reducer", [fa.mean(), fa.clipped_mean(0.2)], ids=["mean", "clipped"])
@pytest.mark.parametrize("options", STRATEGIES)
def test_an_all_padding_microbatch_contributes_nothing(
    reducer: fa.extend.Reducer, options: dict
) -> None:
    params, batch = sequence_params(), sequence_batch(12)
    batch["mask"][4:8] = False  # the second of three microbatches is all padding
    assert torch.isnan(token_weighted_loss(params, {k: v[4:8] for k, v in batch.items()})[0])
    result = fa.accumulate(
        token_weighted_loss,
        params,
        batch,
        reducer=reducer,
        num_microbatches=3,
        has_weight=True,
        **options,
    )
    kept = {k: torch.cat([v[:4], v[8:]]) for k, v in batch.items()}
    expected = fa.accumulate(
        token_weighted_loss, params, kept, reducer=reducer, num_microbatches=2, has_weight=True
    )
    assert_trees_allclose(result.grads, expected.grads, rtol=1e-12, atol=1e-15)
    assert_trees_allclose(result.stats, expected.stats, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(result.loss, expected.loss, rtol=1e-12, atol=0)


@pytest.mark.parametrize("reducer", [fa.mean(), fa.clipped_mean(0.2)], ids=["mean", "clipped"])
def test_partial_states_merge_to_the_whole(reducer: fa.extend.Reducer) -> None:
    params, batch = mlp_params(), classification_batch(19)
    # Same microbatch boundaries in the parts as in the whole: 3,3,3 | 3,3,3,1.
    acc = fa.Accumulation(reducer=reducer, microbatch_size=3)
    whole = acc.fold(mlp_loss, params, batch)
    first = acc.fold(mlp_loss, params, {k: v[:9] for k, v in batch.items()})
    second = acc.fold(mlp_loss, params, {k: v[9:] for k, v in batch.items()})
    for merged in (acc.merge(first, second), acc.merge(second, first)):
        got, want = acc.finalize(merged), acc.finalize(whole)
        assert_trees_allclose(got.grads, want.grads, rtol=1e-12, atol=1e-15)
        assert_trees_allclose(got.stats, want.stats, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=0)


def test_streaming_fold_over_loader_batches_equals_one_big_batch() -> None:
    params, batch = mlp_params(), classification_batch(19)
    acc, state = fa.Accumulation(), None
    for start in range(0, 19, 5):  # loader batches of 5, 5, 5, 4
        state = acc.fold(
            mlp_loss, params, {k: v[start : start + 5] for k, v in batch.items()}, state
        )
    result = acc.finalize(state)
    assert_trees_allclose(result.grads, grad(mlp_loss)(params, batch), rtol=1e-10, atol=1e-13)


def test_fixed_denominator() -> None:
    params, batch = mlp_params(), classification_batch(19)
    by_weight = fa.accumulate(mlp_loss, params, batch, num_microbatches=4)
    fixed = fa.accumulate(
        mlp_loss, params, batch, reducer=fa.mean(denominator=38), num_microbatches=4
    )
    assert_trees_allclose(fixed.grads, fa.tree.scale(by_weight.grads, 0.5), rtol=1e-12, atol=0)


def test_accumulation_is_float32_for_bf16_gradients() -> None:
    params = mlp_params(torch.bfloat16)
    batch = classification_batch(64, torch.bfloat16)
    result = fa.accumulate(mlp_loss, params, batch, num_microbatches=16)
    assert {g.dtype for g in optree.tree_leaves(result.grads)} == {torch.float32}
    assert {g.dtype for g in optree.tree_leaves(fa.mean().init(params).grad_sum)} == {torch.float32}
    # The bf16 microbatch gradients, averaged exactly in float64, agree with the float32 sums.
    per = fa.microbatch_grads(mlp_loss, params, batch, num_microbatches=16)
    reference = optree.tree_map(lambda g: g.double().mean(0).float(), per.grads)
    assert_trees_allclose(result.grads, reference, rtol=1e-5, atol=1e-6)


def test_accumulate_does_not_mutate_its_inputs_and_fold_returns_new_state() -> None:
    params, batch = mlp_params(), classification_batch(19)
    params_before = fa.tree.scale(params, 1.0)
    batch_before = {k: v.clone() for k, v in batch.items()}
    acc = fa.Accumulation(num_microbatches=3)
    state = acc.fold(mlp_loss, params, batch)
    state_before = fa.tree.scale(state, 1)
    acc.fold(mlp_loss, params, batch, state)
    assert_trees_equal(params, params_before)
    assert_trees_equal(batch, batch_before)
    assert_trees_equal(state, state_before)


def test_microbatch_size_one_gives_per_example_gradients() -> None:
    params, batch = mlp_params(), classification_batch(7)
    out = fa.microbatch_grads(mlp_loss, params, batch, microbatch_size=1)
    for i in range(7):
        single = grad(mlp_loss)(params, {k: v[i : i + 1] for k, v in batch.items()})
        assert_trees_allclose(
            {n: {k: g[i] for k, g in layer.items()} for n, layer in out.grads.items()},
            single, rtol=1e-12, atol=1e-15,
        )  # fmt: skip
    assert out.weights.tolist() == [1] * 7


def test_aux_is_stacked_per_microbatch() -> None:
    params, batch = mlp_params(), classification_batch(19)

    def loss_with_accuracy(params: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = torch.tanh(batch["x"] @ params["layer0"]["w"]) @ params["layer1"]["w"]
        accuracy = (logits.argmax(-1) == batch["y"]).double().mean()
        return torch.nn.functional.cross_entropy(logits, batch["y"]), {"accuracy": accuracy}

    for options in (
        {"strategy": "vmap"},
        {"strategy": "scan"},
        {"strategy": fa.chunked(3)},
    ):
        result = fa.accumulate(
            loss_with_accuracy, params, batch, num_microbatches=5, has_aux=True, **options
        )
        assert result.aux["accuracy"].shape == (5,)
        assert ((result.aux["accuracy"] >= 0) & (result.aux["accuracy"] <= 1)).all()


def test_dropout_needs_an_explicit_randomness_choice() -> None:
    params, batch = mlp_params(), classification_batch(12)

    def dropout_loss(params: dict, batch: dict) -> torch.Tensor:
        x = torch.nn.functional.dropout(batch["x"], p=0.5, training=True)
        return mlp_loss(params, {"x": x, "y": batch["y"]})

    with pytest.raises(fa.FuncaccumError, match=r"vmap\(randomness='different'\)"):
        fa.accumulate(dropout_loss, params, batch, num_microbatches=4, strategy="vmap")
    torch.manual_seed(0)
    per = fa.microbatch_grads(dropout_loss, params, batch, microbatch_size=6, randomness="same")
    assert per.grads["layer0"]["w"].shape[0] == 2
    torch.manual_seed(0)
    result = fa.accumulate(
        dropout_loss, params, batch, num_microbatches=4, strategy=fa.vmap(randomness="different")
    )
    assert torch.isfinite(result.loss)
    # Identical microbatches see one mask under "same" and different masks under "different".
    twins = {k: torch.cat([v[:6], v[:6]]) for k, v in batch.items()}
    same = fa.microbatch_grads(dropout_loss, params, twins, num_microbatches=2, randomness="same")
    different = fa.microbatch_grads(
        dropout_loss, params, twins, num_microbatches=2, randomness="different"
    )
    assert torch.equal(same.losses[0], same.losses[1])
    assert not torch.equal(different.losses[0], different.losses[1])


class Encoding(UserDict):
    """What a Hugging Face tokenizer or collator returns: a BatchEncoding is a UserDict."""


def test_a_mapping_batch_is_taken_as_its_dict_everywhere_a_batch_enters() -> None:
    params, batch = mlp_params(), classification_batch(12)
    expected = fa.accumulate(mlp_loss, params, batch, num_microbatches=3)
    for wrap in (Encoding, MappingProxyType):
        got = fa.accumulate(mlp_loss, params, wrap(batch), num_microbatches=3)
        assert_trees_allclose(got.grads, expected.grads, rtol=0, atol=0)
    got = fa.microbatch_grads(mlp_loss, params, Encoding(batch), microbatch_size=4)
    assert got.grads["layer0"]["w"].shape[0] == 3
    assert [g.count for g in fa.split_microbatches(Encoding(batch), num_microbatches=3)] == [3]
    step = fa.train_step(mlp_loss, optimizer=fa.optim.sgd(0.1),
                         accumulation=fa.Accumulation(num_microbatches=3))  # fmt: skip
    state, metrics = step(step.init(params), Encoding(batch))
    assert metrics.loss == expected.loss
    folded = step.fold(state, Encoding(batch))
    assert int(folded.state.microbatches) == 3
    _, epoch = fa.run_epoch(step, state, [Encoding(batch)])
    assert epoch.steps == 1


@pytest.mark.parametrize("strategy", ["vmap", "scan"])
def test_a_batch_that_requires_grad_leaves_no_graph_in_the_results(strategy: str) -> None:
    """Inputs from a model run outside (not under no_grad): funcaccum differentiates the params."""
    batch = classification_batch(8)
    batch["x"] = batch["x"].clone().requires_grad_()
    result = fa.accumulate(mlp_loss, mlp_params(), batch, num_microbatches=2, strategy=strategy)
    accumulation = fa.Accumulation(num_microbatches=2, strategy=strategy)
    step = fa.train_step(mlp_loss, optimizer=fa.optim.sgd(0.1), accumulation=accumulation)
    state, metrics = step(step.init(mlp_params()), batch)
    for leaf in optree.tree_leaves((result, state, metrics)):
        assert leaf.grad_fn is None
        assert not leaf.requires_grad


@pytest.mark.parametrize(
    ("leaf", "words"),
    [
        (torch.zeros(5, 16, device="meta"), "is on the meta device"),
        (torch.zeros(5, 16, dtype=torch.int64), "is a torch.int64 tensor"),
        (0.5, "is a float; params must be torch tensors"),
        (np.zeros((5, 16)), "is a ndarray (convert it with torch.from_numpy)"),
        (torch.zeros(5, 16).to(torch.float8_e4m3fn), "is a torch.float8_e4m3fn tensor, which"),
    ],
    ids=["meta", "int64", "python-float", "numpy", "float8"],
)
def test_params_that_cannot_be_differentiated_are_named(leaf: Any, words: str) -> None:
    params = mlp_params()
    params["layer0"]["w"] = leaf
    for call in (
        lambda: fa.accumulate(mlp_loss, params, classification_batch(8)),
        lambda: fa.microbatch_grads(mlp_loss, params, classification_batch(8), microbatch_size=4),
        lambda: fa.Accumulation().init(params),
    ):
        with pytest.raises(fa.FuncaccumError, match=re.escape(f"params['layer0']['w'] {words}")):
            call()
