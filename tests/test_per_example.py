"""Per-example gradients and clipping: the general path, Opacus parity, noise, padding."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import grad
from torch.nn import functional

import funcaccum as fa
from funcaccum.testing import assert_trees_allclose
from recipes.models import MLP, CharTransformer, ConvNet

Batch = tuple[torch.Tensor, torch.Tensor]


def mlp_case() -> tuple[nn.Module, Batch]:
    g = torch.Generator().manual_seed(0)
    return MLP((12, 32, 32, 5)), (
        torch.randn(24, 12, generator=g),
        torch.randint(5, (24,), generator=g),
    )


def conv_case() -> tuple[nn.Module, Batch]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(12, 1, 16, 16, generator=g)
    return ConvNet(channels=1, classes=4, width=4), (images, torch.randint(4, (12,), generator=g))


def transformer_case() -> tuple[nn.Module, Batch]:
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(20, (10, 9), generator=g)
    # Contiguous: Opacus's embedding ghost norm calls .view on the token ids.
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    return CharTransformer(20, 8, dim=16, heads=2, layers=1), (inputs, targets)


CASES = [
    pytest.param(mlp_case, id="mlp"),
    pytest.param(conv_case, id="conv"),
    pytest.param(transformer_case, id="embedding-transformer"),
]


def per_example_losses(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each example's mean loss (over its tokens, for sequences): shape (n,)."""
    losses = functional.cross_entropy(output.flatten(0, -2), targets.flatten(), reduction="none")
    return losses.view(targets.shape[0], -1).mean(1)


def functional_loss(
    model: nn.Module,
) -> tuple[Callable[..., torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(3)
    for p in model.parameters():  # fresh, non-trivial weights
        p.data.normal_(0, 0.5)
    apply, params, buffers = fa.functional_model(model)

    def loss_fn(params: dict, batch: Batch) -> torch.Tensor:
        return per_example_losses(apply(params, buffers, batch[0]), batch[1]).mean()

    return loss_fn, params


@pytest.mark.parametrize("case", CASES)
def test_per_example_gradients_equal_a_loop_of_single_example_grads(case: Callable) -> None:
    model, batch = case()
    loss_fn, params = functional_loss(model)
    out = fa.microbatch_grads(loss_fn, params, batch, microbatch_size=1)
    for i in range(batch[1].shape[0]):
        single = grad(loss_fn)(params, (batch[0][i : i + 1], batch[1][i : i + 1]))
        assert_trees_allclose({k: v[i] for k, v in out.grads.items()}, single, rtol=1e-5, atol=1e-6)


def median_norm(loss_fn: Callable, params: dict, batch: Batch, microbatch_size: int) -> float:
    """A threshold between the two middle norms: about half the microbatches are clipped,
    and no norm sits on the threshold, where rounding would decide its side."""
    per = fa.microbatch_grads(loss_fn, params, batch, microbatch_size=microbatch_size)
    norms = (
        torch.stack([g.flatten(1).norm(dim=1) for g in per.grads.values()])
        .norm(dim=0)
        .sort()
        .values
    )
    middle = len(norms) // 2
    return float(norms[middle - 1] + norms[middle]) / 2


def opacus_clipped_sum(
    model: nn.Module, batch: Batch, max_norm: float, ghost: bool
) -> dict[str, torch.Tensor]:
    """Opacus's clipped gradient: per-sample grads (GradSampleModule) or fast ghost clipping."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping

        if ghost:
            wrapped = GradSampleModuleFastGradientClipping(
                model, max_grad_norm=max_norm, use_ghost_clipping=True, loss_reduction="sum"
            )
            per = per_example_losses(wrapped(batch[0]), batch[1])
            per.sum().backward(retain_graph=True)
            coefficients = wrapped.get_clipping_coef()
            wrapped.zero_grad()
            wrapped.disable_hooks()
            (coefficients * per).sum().backward()
            wrapped.enable_hooks()
            out = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        else:
            wrapped = GradSampleModule(model, loss_reduction="sum")
            per_example_losses(wrapped(batch[0]), batch[1]).sum().backward()
            samples = {n: p.grad_sample for n, p in model.named_parameters()}
            norms = torch.stack([g.flatten(1).norm(dim=1) for g in samples.values()]).norm(dim=0)
            coefficients = (max_norm / (norms + 1e-6)).clamp(max=1.0)
            out = {n: torch.einsum("i,i...->...", coefficients, g) for n, g in samples.items()}
        wrapped._close()
    return out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("opacus_mode", ["grad-sample", "ghost"])
def test_clipped_mean_equals_opacus(case: Callable, opacus_mode: str) -> None:
    pytest.importorskip("opacus", reason="Opacus parity needs the opacus test extra")
    model, batch = case()
    loss_fn, params = functional_loss(model)
    params = {k: v.clone() for k, v in params.items()}  # Opacus writes into the module
    n, max_norm = batch[1].shape[0], median_norm(loss_fn, params, batch, 1)
    expected = opacus_clipped_sum(model, batch, max_norm, ghost=opacus_mode == "ghost")
    for strategy in ("vmap", fa.ghost(model)):
        result = fa.accumulate(
            loss_fn,
            params,
            batch,
            reducer=fa.clipped_mean(max_norm),
            microbatch_size=1,
            strategy=strategy,
        )
        # Opacus clips with max_norm / (norm + 1e-6); funcaccum with max_norm / norm.
        assert_trees_allclose(fa.tree.scale(result.grads, n), expected, rtol=1e-5, atol=1e-6)


def padded(batch: Batch, size: int) -> dict[str, torch.Tensor]:
    """A batch padded to a fixed size, with a mask: how varying (Poisson) batches keep one shape."""
    x, y = batch
    pad = size - y.shape[0]
    return {
        "x": torch.cat([x, torch.zeros(pad, *x.shape[1:])]),
        "y": torch.cat([y, torch.zeros(pad, dtype=y.dtype)]),
        "mask": torch.arange(size) < y.shape[0],
    }


def test_padding_and_declared_denominators() -> None:
    model, batch = mlp_case()
    loss_fn, params = functional_loss(model)

    def masked_loss(params: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        losses = per_example_losses(
            fa.functional_model(model)[0](params, {}, batch["x"]), batch["y"]
        )
        mask = batch["mask"].to(losses.dtype)
        return (losses * mask).sum() / mask.sum().clamp(min=1), mask.sum()

    real = fa.accumulate(loss_fn, params, batch, reducer=fa.clipped_mean(0.7), microbatch_size=1)
    for options in ({"strategy": fa.vmap()}, {"strategy": fa.chunked(8)}):
        result = fa.accumulate(
            masked_loss,
            params,
            padded(batch, 40),
            reducer=fa.clipped_mean(0.7),
            microbatch_size=1,
            has_weight=True,
            **options,
        )
        assert_trees_allclose(result.grads, real.grads, rtol=1e-5, atol=1e-7)
        assert_trees_allclose(result.stats, real.stats, rtol=1e-5, atol=1e-7)
        assert result.weight.item() == 24
    expected_batch = 32.0  # DP-SGD divides by the expected batch size, whatever the real one
    declared = fa.accumulate(
        masked_loss,
        params,
        padded(batch, 40),
        reducer=fa.clipped_mean(0.7, denominator=expected_batch),
        microbatch_size=1,
        has_weight=True,
        strategy="vmap",
    )
    assert_trees_allclose(
        declared.grads, fa.tree.scale(real.grads, 24 / expected_batch), rtol=1e-5, atol=1e-7
    )


def test_noise_needs_an_explicit_denominator() -> None:
    with pytest.raises(fa.FuncaccumError, match="with noise, choose the denominator"):
        fa.clipped_mean(1.0, noise_multiplier=1.0)
    with pytest.raises(fa.FuncaccumError, match="number or 'weight'"):
        fa.clipped_mean(1.0, denominator="count")
    with pytest.raises(fa.FuncaccumError, match="noise_multiplier must be >= 0"):
        fa.clipped_mean(1.0, noise_multiplier=-1.0, denominator=8)


@pytest.mark.parametrize("units", [1, 8])
def test_noise_is_added_once_per_step_with_the_right_scale(units: int) -> None:
    """Zero gradients leave pure noise: std = sigma * C / B, whatever the number of microbatches."""
    sigma, max_norm, batch_size = 1.3, 0.5, 16.0
    reducer = fa.clipped_mean(
        max_norm,
        noise_multiplier=sigma,
        denominator=batch_size,
        generator=torch.Generator().manual_seed(units),
    )
    params = {"w": torch.zeros(20000, dtype=torch.float64)}
    state = reducer.init(params)
    for _ in range(units):
        state = reducer.update(
            state, {"w": torch.zeros(20000, dtype=torch.float64)}, torch.tensor(2.0)
        )
    noise = reducer.finalize(state)[0]["w"]
    expected = sigma * max_norm / batch_size
    assert abs(noise.std().item() / expected - 1) < 0.03  # 20000 draws: the std is within about 1%
    assert abs(noise.mean().item()) < 4 * expected / math.sqrt(20000)


def test_clip_statistics_report_norms_before_and_after() -> None:
    model, batch = mlp_case()
    loss_fn, params = functional_loss(model)
    result = fa.accumulate(loss_fn, params, batch, reducer=fa.clipped_mean(0.7), microbatch_size=1)
    per = fa.microbatch_grads(loss_fn, params, batch, microbatch_size=1)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per.grads.values()]).norm(dim=0)
    stats: dict[str, Any] = result.stats
    torch.testing.assert_close(stats.norm_mean, norms.mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(stats.norm_max, norms.max(), rtol=1e-5, atol=0)
    torch.testing.assert_close(
        stats.clipped_norm_mean, norms.clamp(max=0.7).mean(), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(stats.clip_fraction, (norms > 0.7).float().mean())
