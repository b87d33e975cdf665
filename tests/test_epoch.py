"""run_epoch: the epoch's loss weighted by examples, skips counted apart, progress optional."""

from __future__ import annotations

import torch

import funcaccum as fa


def loss_fn(params: dict, batch: tuple) -> torch.Tensor:
    x, y = batch  # x: (m, 3), y: (m,)
    return torch.mean((x @ params["w"] - y) ** 2)


def test_the_epoch_loss_weights_every_example_once() -> None:
    """A partial last batch: the plain mean of step losses and the last loss are both wrong."""
    step = fa.train_step(
        loss_fn,
        optimizer=fa.optim.sgd(0.0),
        accumulation=fa.Accumulation(num_microbatches=2),
    )
    state = step.init({"w": torch.zeros(3, dtype=torch.float64)})
    x, y = torch.ones(10, 3, dtype=torch.float64), torch.arange(10, dtype=torch.float64)
    loader = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]  # 4, 4, 2 examples
    state, epoch = fa.run_epoch(step, state, loader, progress=True, description="test")
    assert epoch.loss.item() == (y**2).mean().item()  # 28.5, every example once
    per_step = [(b[1] ** 2).mean().item() for b in loader]
    assert epoch.loss.item() != sum(per_step) / 3  # 36.5: the partial batch overweighted
    assert epoch.last.loss.item() == per_step[-1]  # 72.5: the last batch's
    assert (epoch.steps, epoch.skipped, epoch.weight.item()) == (3, 0, 10.0)
    assert state.step.item() == 3


def test_skipped_steps_count_apart_and_do_not_enter_the_loss() -> None:
    step = fa.train_step(loss_fn, optimizer=fa.optim.sgd(0.01))
    state = step.init({"w": torch.zeros(3, dtype=torch.float64)})
    x, y = torch.ones(6, 3, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    loader = [(x, y), (x * torch.nan, y), (x, y)]
    state, epoch = fa.run_epoch(step, state, loader)
    assert (epoch.steps, epoch.skipped, epoch.weight.item()) == (2, 1, 12.0)
    assert torch.isfinite(epoch.loss)
    assert state.skipped.item() == 1
