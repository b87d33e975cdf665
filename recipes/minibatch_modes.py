"""Batch, stochastic, mini-batch and accumulated gradient descent on one regression problem.

The articles "How does mini-batching affect PyTorch loss accumulation?" and "Why
does PyTorch use mini-batches for training?" train a linear regression four ways
and print, after each epoch, the loss of the epoch's *last* batch. This recipe
trains the same model with ``funcaccum.train_step`` in each mode and reports,
per epoch, the exact mean loss over every example the epoch saw (each step's
loss weighted by its examples), next to the last batch's loss the articles
print, and the loss of the final params on the whole dataset.

- ``batch``: one step per epoch on all examples;
- ``stochastic``: one example per step;
- ``mini-batch``: batches of ``--batch-size``;
- ``accumulated``: batches of ``--batch-size * --microbatches``, accumulated
  over microbatches of ``--batch-size`` (the same gradient as a big batch).

The dataset's size is not a multiple of the batch sizes, so each epoch ends
with a partial batch, used with its true weight.

    python recipes/minibatch_modes.py
    python recipes/minibatch_modes.py --epochs 30 --lr 0.05 --metrics out/modes.jsonl
"""

from __future__ import annotations

import _common
import torch

import funcaccum as fa


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The first article's problem: y = 2x + 1 + noise."""
    x = torch.randn(n, 1, generator=generator)
    return x, 2 * x + 1 + 0.1 * torch.randn(n, 1, generator=generator)


def loss_fn(
    params: dict[str, torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    x, y = batch  # (m, 1), (m, 1)
    return torch.mean((x @ params["w"] + params["b"] - y) ** 2)


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--microbatches", type=int, default=4, help="K, for the accumulated mode")
    p.add_argument("--lr", type=float, default=0.01)
    args = p.parse_args()
    if args.smoke:
        args.examples, args.epochs = 150, 2
    device = _common.pick_device(args.device)
    recipe = _common.Recipe("Four ways to descend: the epoch's loss, reported right", args)
    generator = torch.Generator().manual_seed(args.seed)
    x, y = (t.to(device) for t in make_data(args.examples, generator))
    n = args.examples
    modes = {
        "batch": {"batch": n, "microbatch_size": n},
        "stochastic": {"batch": 1, "microbatch_size": 1},
        "mini-batch": {"batch": args.batch_size, "microbatch_size": args.batch_size},
        "accumulated": {
            "batch": args.batch_size * args.microbatches,
            "microbatch_size": args.batch_size,
        },
    }
    rows = []
    total_steps = sum(args.epochs * -(-n // mode["batch"]) for mode in modes.values())
    with recipe.progress("training four ways", total_steps) as advance:
        for name, mode in modes.items():
            step = fa.train_step(
                loss_fn,
                optimizer=fa.optim.sgd(args.lr),
                accumulation=fa.Accumulation(microbatch_size=mode["microbatch_size"]),
            )
            state = step.init(
                {"w": torch.zeros(1, 1, device=device), "b": torch.zeros(1, device=device)}
            )
            for epoch in range(args.epochs):
                loss_sum, weight_sum = torch.zeros((), device=device), 0.0
                for start in range(0, n, mode["batch"]):
                    batch = (x[start : start + mode["batch"]], y[start : start + mode["batch"]])
                    state, metrics = step(state, batch)
                    loss_sum += metrics.loss * metrics.weight
                    weight_sum += float(metrics.weight)
                    advance(loss=metrics.loss)
                epoch_mean = float(loss_sum) / weight_sum
                recipe.log(
                    mode=name,
                    epoch=epoch,
                    epoch_mean_loss=epoch_mean,
                    last_batch_loss=metrics.loss,
                    steps=state.step,
                )
            final = float(loss_fn(state.params, (x, y)))
            rows.append(
                [
                    name,
                    mode["batch"],
                    int(state.step),
                    epoch_mean,
                    float(metrics.loss),
                    final,
                    float(state.params["w"][0, 0]),
                    float(state.params["b"][0]),
                ]
            )
    recipe.summary(
        [
            "mode",
            "batch",
            "steps",
            "last epoch mean loss",
            "last batch loss",
            "final full loss",
            "w (true 2)",
            "b (true 1)",
        ],
        rows,
        notes=[
            f"{n} examples, {args.epochs} epochs, SGD lr {args.lr}, {device}.",
            "last epoch mean loss: every step's loss weighted by its examples, over the epoch; "
            "last batch loss: what the articles print as the epoch's loss, one (maybe partial) "
            "batch.",
        ],
    )


if __name__ == "__main__":
    main()
