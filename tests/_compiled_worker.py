"""One process of the compiled-determinism tests: python _compiled_worker.py PHASE OUT.

A small character transformer (its embedding's gradient is a scatter-add, which
inductor's CPU kernels sum with atomic adds across threads) trained with
``compile=True``. ``first``: 2 steps, a checkpoint, 2 more (the uninterrupted
run). ``second``, a fresh process: the same 4 steps from the start, then a
resume from the checkpoint for the last 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.nn import functional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's packages first

import funcaccum as fa
from recipes.models import CharTransformer

VOCAB, CONTEXT, STEPS, SAVED_AT = 8, 64, 4, 2


def batch(i: int) -> torch.Tensor:
    """32 sequences over a small vocabulary: every token's embedding row is hit many times."""
    return torch.randint(VOCAB, (32, CONTEXT), generator=torch.Generator().manual_seed(i))


def main() -> None:
    phase, out = sys.argv[1], Path(sys.argv[2])
    torch.manual_seed(0)
    model = CharTransformer(VOCAB, CONTEXT, dim=32, heads=2, layers=1)
    apply, params, buffers = fa.functional_model(model)

    def loss_fn(params: dict, tokens: torch.Tensor) -> torch.Tensor:
        logits = apply(params, buffers, tokens[:, :-1])
        return functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    step = fa.train_step(
        loss_fn,
        optimizer=fa.optim.adamw(1e-2),
        accumulation=fa.Accumulation(num_microbatches=4),
        compile=True,
    )

    def run(state: fa.TrainState, start: int, stop: int) -> fa.TrainState:
        for i in range(start, stop):
            state, _ = step(state, batch(i))
        return state

    if phase == "first":
        state = run(step.init(params), 0, SAVED_AT)
        fa.save(out / "checkpoint.pt", state)
        fa.save(out / "uninterrupted.pt", run(state, SAVED_AT, STEPS))
    else:
        fa.save(out / "again.pt", run(step.init(params), 0, STEPS))
        checkpoint = fa.load(out / "checkpoint.pt", like=step.init(params))
        fa.save(out / "resumed.pt", run(checkpoint.state, checkpoint.batches_consumed, STEPS))


if __name__ == "__main__":
    main()
