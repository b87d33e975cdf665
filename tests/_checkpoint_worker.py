"""One process of the resume tests: python _checkpoint_worker.py PHASE OUT.

``first``: for each scenario, 10 steps, a checkpoint, then 10 more steps in the
same process (the uninterrupted run). ``resume``: a fresh process with its own
random-number state loads each checkpoint and takes the remaining steps; then,
as a control, does it again without restoring the random-number state.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional

sys.path.insert(0, str(Path(__file__).resolve().parent))
# This checkout's funcaccum first, not the one installed in the environment.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import classification_batch, mlp_apply, mlp_loss, mlp_params

import funcaccum as fa

STEPS, SAVED_AT, BATCH = 20, 10, 8


def dropout_loss(params: dict[str, Any], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The MLP with dropout on its inputs: every step draws masks from the global generator."""
    x = functional.dropout(batch["x"], p=0.2, training=True)
    return functional.cross_entropy(mlp_apply(params, x), batch["y"])


SCENARIOS: dict[str, Callable[[], fa.TrainStep]] = {
    "sgd_momentum": lambda: fa.train_step(
        dropout_loss,
        optimizer=fa.optim.sgd(0.05, momentum=0.9),
        accumulation=fa.Accumulation(num_microbatches=2),
    ),
    "adamw_warmup_cosine": lambda: fa.train_step(
        mlp_loss,
        optimizer=fa.optim.adamw(fa.optim.warmup_cosine_decay_schedule(0.0, 1e-2, 5, STEPS)),
        accumulation=fa.Accumulation(num_microbatches=2),
    ),
    "dp_noise": lambda: fa.train_step(
        mlp_loss,
        optimizer=fa.optim.sgd(0.1),
        accumulation=fa.Accumulation(
            reducer=fa.clipped_mean(1.0, noise_multiplier=1.0, denominator=BATCH),
            microbatch_size=1,
        ),
    ),
    "adaptive": lambda: fa.train_step(
        mlp_loss,
        optimizer=fa.optim.adam(1e-2),
        accumulation=fa.Accumulation(reducer=fa.adaptive(), num_microbatches=4),
    ),
}


def run(step: fa.TrainStep, state: fa.TrainState, start: int, stop: int) -> fa.TrainState:
    for i in range(start, stop):  # the batch of step i: the data position is the step index
        state, _ = step(state, classification_batch(BATCH, seed=100 + i))
    return state


def main() -> None:
    phase, out = sys.argv[1], Path(sys.argv[2])
    for name, make in SCENARIOS.items():
        step = make()
        if phase == "first":
            torch.manual_seed(0)
            state = run(step, step.init(mlp_params()), 0, SAVED_AT)
            fa.save(out / f"{name}.pt", state)
            fa.save(out / f"{name}-uninterrupted.pt", run(step, state, SAVED_AT, STEPS))
        else:
            torch.manual_seed(1234)  # another state: only the checkpoint's makes the run repeat
            checkpoint = fa.load(out / f"{name}.pt", like=step.init(mlp_params(seed=5)))
            state = run(step, checkpoint.state, checkpoint.batches_consumed, STEPS)
            fa.save(out / f"{name}-resumed.pt", state)
            # The control: the same resume with this process's own random numbers.
            checkpoint = fa.load(out / f"{name}.pt", like=state, restore_rng=False)
            state = run(step, checkpoint.state, checkpoint.batches_consumed, STEPS)
            fa.save(out / f"{name}-unrestored.pt", state)


if __name__ == "__main__":
    main()
