"""Update rules follow torch.optim's trajectories; schedules follow torch's schedulers."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import funcaccum as fa
from funcaccum import optim
from funcaccum.testing import assert_trees_allclose

STEPS = 200


def make_model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    ).to(dtype)


def make_batches(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(8, 4, generator=g, dtype=dtype)
    batches = []
    for _ in range(5):
        x = torch.randn(48, 8, generator=g, dtype=dtype)
        batches.append((x, (x @ teacher).argmax(-1)))
    return batches


def torch_run(
    dtype: torch.dtype,
    make_optimizer: Callable[..., torch.optim.Optimizer],
    make_scheduler: Callable[[torch.optim.Optimizer], object] | None = None,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """A hand-written loop, done right: zero_grad, backward, step, scheduler step, per batch."""
    model, batches = make_model(dtype), make_batches(dtype)
    opt = make_optimizer(model.parameters())
    scheduler = make_scheduler(opt) if make_scheduler else None
    rates = []
    for step in range(STEPS):
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return {n: p.detach() for n, p in model.named_parameters()}, rates


def funcaccum_run(
    dtype: torch.dtype, rule: optim.GradientTransformation, num_microbatches: int
) -> tuple[dict[str, torch.Tensor], list[float]]:
    model, batches = make_model(dtype), make_batches(dtype)
    apply, params, buffers = fa.functional_model(model)

    def loss_fn(params: dict, batch: tuple) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(apply(params, buffers, x), y)

    step = fa.train_step(
        loss_fn,
        optimizer=rule,
        accumulation=fa.Accumulation(num_microbatches=num_microbatches),
    )
    state = step.init(params)
    rates = []
    for i in range(STEPS):
        state, metrics = step(state, batches[i % len(batches)])
        rates.append(metrics.learning_rate.item())
    assert state.step.item() == STEPS
    return state.params, rates


RULES = [
    pytest.param(lambda p: torch.optim.SGD(p, lr=0.1), lambda: optim.sgd(0.1), id="sgd"),
    pytest.param(
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda: optim.sgd(0.05, momentum=0.9),
        id="sgd-momentum",
    ),
    pytest.param(
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
        lambda: optim.sgd(0.05, momentum=0.9, nesterov=True),
        id="sgd-nesterov",
    ),
    pytest.param(
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, weight_decay=0.01),
        lambda: optim.sgd(0.05, momentum=0.5, weight_decay=0.01),
        id="sgd-weight-decay",
    ),
    pytest.param(lambda p: torch.optim.Adam(p, lr=3e-3), lambda: optim.adam(3e-3), id="adam"),
    pytest.param(
        lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=1e-2),
        lambda: optim.adam(3e-3, weight_decay=1e-2),
        id="adam-l2",
    ),
    pytest.param(
        lambda p: torch.optim.AdamW(p, lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1),
        lambda: optim.adamw(3e-3, b1=0.8, b2=0.99, eps=1e-7, weight_decay=0.1),
        id="adamw",
    ),
]


@pytest.mark.parametrize(("torch_rule", "rule"), RULES)
def test_follows_torch_optim_float64(torch_rule: Callable, rule: Callable) -> None:
    expected, _ = torch_run(torch.float64, torch_rule)
    got, _ = funcaccum_run(torch.float64, rule(), num_microbatches=4)
    assert_trees_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("torch_rule", "rule"), RULES)
def test_follows_torch_optim_float32(torch_rule: Callable, rule: Callable) -> None:
    expected, _ = torch_run(torch.float32, torch_rule)
    got, _ = funcaccum_run(torch.float32, rule(), num_microbatches=1)
    assert_trees_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_warmup_cosine_matches_torch_lr_scheduler() -> None:
    peak, warmup, total = 3e-3, 20, STEPS  # torch's cosine rises again after T_max; ours holds

    def torch_scheduler(opt: torch.optim.Optimizer) -> object:
        return torch.optim.lr_scheduler.SequentialLR(
            opt,
            [
                torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=warmup),
                torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=1e-5),
            ],
            milestones=[warmup],
        )

    expected, torch_rates = torch_run(
        torch.float64, lambda p: torch.optim.AdamW(p, lr=peak), torch_scheduler
    )
    schedule = optim.warmup_cosine_decay_schedule(peak * 0.01, peak, warmup, total, end_value=1e-5)
    got, rates = funcaccum_run(torch.float64, optim.adamw(schedule), num_microbatches=3)
    torch.testing.assert_close(
        torch.tensor(rates), torch.tensor(torch_rates), rtol=1e-12, atol=1e-15
    )
    assert_trees_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_step_decay_matches_torch_step_lr() -> None:
    def torch_scheduler(opt: torch.optim.Optimizer) -> object:
        return torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.5)

    _, torch_rates = torch_run(torch.float64, lambda p: torch.optim.SGD(p, lr=0.1), torch_scheduler)
    schedule = optim.exponential_decay(0.1, 30, 0.5, staircase=True)
    assert [schedule(torch.tensor(t)).item() for t in range(STEPS)] == pytest.approx(
        torch_rates, rel=1e-14
    )


def test_lion_follows_its_definition() -> None:
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(5, generator=g, dtype=torch.float64)}
    rule = optim.lion(0.01, b1=0.9, b2=0.99, weight_decay=0.1)
    state = rule.init(params)
    w, m = params["w"].clone(), torch.zeros(5, dtype=torch.float64)
    for _ in range(20):
        grad = torch.randn(5, generator=g, dtype=torch.float64)
        updates, state = rule.update({"w": grad}, state, params)
        params = optim.apply_updates(params, updates)
        w = w - 0.01 * (torch.sign(0.9 * m + 0.1 * grad) + 0.1 * w)
        m = 0.99 * m + 0.01 * grad
    torch.testing.assert_close(params["w"], w, rtol=1e-14, atol=1e-15)


def test_clip_by_global_norm_clips_the_accumulated_gradient() -> None:
    rule = optim.clip_by_global_norm(2.0)
    params = {"a": torch.zeros(2), "b": torch.zeros(1)}
    state = rule.init(params)
    long, _ = rule.update({"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}, state, params)
    short, _ = rule.update({"a": torch.tensor([0.3, 0.0]), "b": torch.tensor([0.4])}, state, params)
    assert fa.tree.global_norm(long).item() == pytest.approx(2.0)
    assert short["b"].item() == pytest.approx(0.4)


def test_moments_are_float32_for_bf16_params() -> None:
    params = {"w": torch.zeros(3, dtype=torch.bfloat16)}
    state = optim.adamw(1e-3).init(params)
    assert state[0].mu["w"].dtype == torch.float32
    assert state[0].nu["w"].dtype == torch.float32
    updates, _ = optim.adamw(1e-3).update({"w": torch.ones(3)}, state, params)
    assert optim.apply_updates(params, updates)["w"].dtype == torch.bfloat16


def test_set_hyperparams_changes_the_rate_and_refuses_unknown_names() -> None:
    rule = optim.sgd(0.1)
    params = {"w": torch.zeros(1)}
    state = optim.set_hyperparams(rule.init(params), learning_rate=0.5)
    updates, _ = rule.update({"w": torch.ones(1)}, state, params)
    assert updates["w"].item() == -0.5
    with pytest.raises(fa.FuncaccumError, match=r"no hyperparameters \['lr'\].*learning_rate"):
        optim.set_hyperparams(state, lr=0.1)


def test_schedule_arguments_are_checked() -> None:
    with pytest.raises(fa.FuncaccumError, match="warmup_steps < decay_steps"):
        optim.warmup_cosine_decay_schedule(0.0, 1.0, 10, 5)
    with pytest.raises(fa.FuncaccumError, match="one boundary fewer"):
        optim.join_schedules([optim.constant_schedule(1.0)], [3])
    with pytest.raises(fa.FuncaccumError, match="decay_steps must be >= 1"):
        optim.cosine_decay_schedule(1.0, 0)
