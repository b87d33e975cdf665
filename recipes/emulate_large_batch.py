"""Batch 128 emulated as 4 microbatches of 32, against three hand-written accumulation loops.

The article "How can I efficiently accumulate gradients for training with larger
batches in PyTorch?" emulates a batch of 128 with 4 microbatches of 32; "What
PyTorch code changes are needed?" shows the loop written three wrong ways. This
recipe trains the same model from the same start, on the same batches, five
ways, and compares each with true batch-128 training:

- ``batch 128``: one backward over all 128 examples per step (the reference);
- ``funcaccum 4 x 32``: ``funcaccum.train_step`` with ``num_microbatches=4``;
- ``no normalisation``: ``loss.backward()`` per microbatch without ``/ 4``;
- ``zero_grad every microbatch``: ``optimizer.zero_grad()`` right after each
  ``backward()``, as that second article writes it;
- ``no zero_grad after step``: the gradients are never cleared.

For each it reports the largest relative error of the applied gradient over
the run, the largest parameter deviation from the reference, and the final
loss on the whole dataset.

    python recipes/emulate_large_batch.py
    python recipes/emulate_large_batch.py --steps 400 --compile --metrics out/large.jsonl
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import _common
import torch
from torch import nn

import funcaccum as fa

Batch = tuple[torch.Tensor, torch.Tensor]


def make_data(n: int, generator: torch.Generator) -> Batch:
    """The first article's shapes (10 features, 2 targets), with a learnable target."""
    x = torch.rand(n, 10, generator=generator)
    teacher = torch.randn(10, 2, generator=generator)
    return x, torch.sin(x @ teacher) + 0.05 * torch.randn(n, 2, generator=generator)


def flat(params: dict[str, torch.Tensor] | list[torch.Tensor]) -> torch.Tensor:
    values = params.values() if isinstance(params, dict) else params
    return torch.cat([p.detach().reshape(-1) for p in values])


def hand_written_step(
    mistake: str, k: int
) -> Callable[[nn.Module, torch.optim.Optimizer, Batch], torch.Tensor]:
    """One optimizer step of the article's hand-written loop, with one of its mistakes (or none).

    Returns the gradient the step applied (what ``.grad`` held at ``step()``).
    """

    def step(model: nn.Module, opt: torch.optim.Optimizer, batch: Batch) -> torch.Tensor:
        x, y = batch
        for xs, ys in zip(x.chunk(k), y.chunk(k), strict=True):
            loss = nn.functional.mse_loss(model(xs), ys)
            if mistake != "no normalisation":
                loss = loss / k
            loss.backward()
            if mistake == "zero_grad every microbatch":
                opt.zero_grad()  # as the article's example 3: right after backward
        applied = flat(
            [torch.zeros_like(q) if q.grad is None else q.grad for q in model.parameters()]
        )
        opt.step()
        if mistake != "no zero_grad after step":
            opt.zero_grad()
        return applied

    return step


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--microbatches", type=int, default=4, help="K")
    p.add_argument("--microbatch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    _common.add_step_flags(p)
    args = p.parse_args()
    if args.smoke:
        args.steps = 12
    device = _common.pick_device(args.device)
    recipe = _common.Recipe("Batch 128 as 4 x 32: deviation from true batch-128 training", args)
    k, m = args.microbatches, args.microbatch_size
    generator = torch.Generator().manual_seed(args.seed)
    data = [t.to(device) for t in make_data(8 * k * m, generator)]
    batches = [(data[0][i : i + k * m], data[1][i : i + k * m]) for i in range(0, 8 * k * m, k * m)]
    torch.manual_seed(args.seed)
    initial = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 2)).to(device)

    def full_loss(model: nn.Module) -> float:
        with torch.no_grad():
            return nn.functional.mse_loss(model(data[0]), data[1]).item()

    def true_gradient(params: list[torch.Tensor], batch: Batch) -> torch.Tensor:
        probe = copy.deepcopy(initial)
        with torch.no_grad():
            for target, value in zip(probe.parameters(), params, strict=True):
                target.copy_(value)
        nn.functional.mse_loss(probe(batch[0]), batch[1]).backward()
        return flat([q.grad for q in probe.parameters()])

    # The reference and the three mistakes: the hand-written loops, on torch.optim.SGD.
    names = [
        "batch 128",
        "no normalisation",
        "zero_grad every microbatch",
        "no zero_grad after step",
    ]
    runs = {name: copy.deepcopy(initial) for name in names}
    optimizers = {
        name: torch.optim.SGD(model.parameters(), lr=args.lr) for name, model in runs.items()
    }
    steps = {name: hand_written_step(name, 1 if name == "batch 128" else k) for name in names}
    gradient_error = dict.fromkeys(names, 0.0)

    apply, params, buffers = fa.functional_model(copy.deepcopy(initial))

    def loss_fn(params: dict, batch: Batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(apply(params, buffers, x), y)

    step = fa.train_step(
        loss_fn,
        optimizer=fa.optim.sgd(args.lr),
        accumulation=fa.Accumulation(num_microbatches=k, strategy=_common.strategy(args)),
        compile="step" if args.compile else False,
    )
    state = step.init(params)
    gradient_error["funcaccum 4 x 32"] = 0.0
    deviation = dict.fromkeys(gradient_error, 0.0)

    with recipe.progress("training five ways", args.steps) as advance:
        for t in range(args.steps):
            batch = batches[t % len(batches)]
            for name in names:
                model, opt = runs[name], optimizers[name]
                truth = true_gradient(list(model.parameters()), batch)
                applied = steps[name](model, opt, batch)
                error = float((applied - truth).norm() / truth.norm())
                gradient_error[name] = max(gradient_error[name], error)
            truth = true_gradient(list(state.params.values()), batch)
            # fold and apply are the two halves of a step; apart, they show the gradient applied.
            folded = step.fold(state, batch)
            applied = flat(step.accumulation.finalize(folded.state).grads)
            state, metrics = step.apply(state, folded)
            error = float((applied - truth).norm() / truth.norm())
            gradient_error["funcaccum 4 x 32"] = max(gradient_error["funcaccum 4 x 32"], error)
            reference = flat(list(runs["batch 128"].parameters()))
            for name in names:
                gap = float((flat(list(runs[name].parameters())) - reference).abs().max())
                deviation[name] = max(deviation[name], gap)
            deviation["funcaccum 4 x 32"] = max(
                deviation["funcaccum 4 x 32"], float((flat(state.params) - reference).abs().max())
            )
            recipe.log(
                step=t, loss=metrics.loss, grad_norm=metrics.grad_norm, gradient_error=error
            )
            advance(loss=metrics.loss)

    final_model = copy.deepcopy(initial)
    final_model.load_state_dict(state.params, strict=False)
    final_loss = {name: full_loss(model) for name, model in runs.items()}
    final_loss["funcaccum 4 x 32"] = full_loss(final_model)
    order = ["batch 128", "funcaccum 4 x 32", *names[1:]]
    recipe.summary(
        ["method", "max gradient error", "max param deviation", "final loss"],
        [[name, gradient_error[name], deviation[name], final_loss[name]] for name in order],
        notes=[
            f"{args.steps} SGD steps, lr {args.lr}, batches of {k * m} = {k} x {m}, "
            f"float32, {device}.",
            "gradient error: |applied - true batch gradient| / |true|, the worst step; "
            "deviation: the largest parameter difference from batch-128 training, over the run.",
            "no normalisation applies K times the gradient: SGD at K times the learning rate, "
            "which may still converge (at lr 0.2 it diverges) but is not batch-128 training.",
            "zero_grad right after backward() clears every gradient before step(): since torch "
            "2.0 it sets .grad to None, so the loop never updates anything.",
        ],
    )


if __name__ == "__main__":
    main()
