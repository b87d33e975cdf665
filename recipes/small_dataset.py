"""A small dataset, done right: every example, a defined clip, noise-led batches, averaged weights.

The article "How to effectively utilize the final gradient in PyTorch gradient
accumulation for small datasets?" accumulates gradients on a small dataset: its loop drops the last
partial accumulation group of every epoch, clips the running sum in ``.grad``
after each backward (neither per microbatch nor once per step), tunes the
accumulation count by hand from the training loss, and keeps the weights of
the step with the lowest *training* microbatch loss. Here:

- every epoch uses every example: the last batch is smaller, and its last
  microbatch partial, each weighted by its true size;
- ``--reducer clipped`` clips each microbatch gradient before averaging
  (``clipped_mean``), a defined operation with its statistics;
- ``--reducer adaptive`` lets the gradient noise choose the number of
  microbatches per step (``adaptive`` with ``AdaptiveBatching``);
- weight averaging is a pure function of the params: an EMA
  (``fa.tree.lerp``), and the best weights by *validation* loss.

Data: scikit-learn's handwritten digits (``pip install scikit-learn``, the
``recipes`` extra) when installed, else a generated 10-class problem of the
same shape.

    python recipes/small_dataset.py
    python recipes/small_dataset.py --reducer adaptive --epochs 30
    python recipes/small_dataset.py --reducer clipped --max-norm 0.5 --data synthetic
"""

from __future__ import annotations

from typing import Any

import _common
import torch
from torch import nn

import funcaccum as fa
from recipes.models import MLP

Batch = tuple[torch.Tensor, torch.Tensor]


def load(kind: str, generator: torch.Generator) -> tuple[str, torch.Tensor, torch.Tensor]:
    if kind in ("auto", "digits"):
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            if kind == "digits":
                raise SystemExit(
                    "--data digits needs scikit-learn: pip install scikit-learn"
                ) from None
        else:
            digits = load_digits()
            x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
            return "digits (scikit-learn)", x, torch.tensor(digits.target)
    centres = torch.randn(10, 64, generator=generator)
    y = torch.randint(10, (1797,), generator=generator)
    x = centres[y] + 4.0 * torch.randn(1797, 64, generator=generator)  # overlapping classes
    return "synthetic, 10 classes", x, y


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--data", default="auto", choices=["auto", "digits", "synthetic"])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128, help="examples per optimizer step")
    p.add_argument("--microbatch-size", type=int, default=32)
    p.add_argument("--reducer", default="mean", choices=["mean", "clipped", "adaptive"])
    p.add_argument("--max-norm", type=float, default=1.0, help="for --reducer clipped")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ema-decay", type=float, default=0.9)
    _common.add_step_flags(p)
    args = p.parse_args()
    if args.smoke:
        args.epochs = 2
    device = _common.pick_device(args.device)
    recipe = _common.Recipe("A small dataset: every example, averaged weights", args)
    generator = torch.Generator().manual_seed(args.seed)
    source, x, y = load(args.data, generator)
    if args.smoke:
        x, y = x[:300], y[:300]
    order = torch.randperm(len(y), generator=generator)
    split = len(y) * 4 // 5
    train = (x[order[:split]].to(device), y[order[:split]].to(device))
    valid = (x[order[split:]].to(device), y[order[split:]].to(device))
    torch.manual_seed(args.seed)
    apply, params, buffers = fa.functional_model(MLP((64, 128, 10)).to(device))

    def loss_fn(params: dict, batch: Batch) -> torch.Tensor:
        inputs, targets = batch
        return nn.functional.cross_entropy(apply(params, buffers, inputs), targets)

    def evaluate(params: dict) -> tuple[float, float]:
        with torch.no_grad():
            logits = apply(params, buffers, valid[0])
            loss = nn.functional.cross_entropy(logits, valid[1])
            return float(loss), float((logits.argmax(-1) == valid[1]).float().mean())

    reducer: fa.extend.Reducer = {
        "mean": fa.mean(),
        "clipped": fa.clipped_mean(args.max_norm),
        "adaptive": fa.adaptive(k_max=16),
    }[args.reducer]
    rule = (fa.optim.adamw if args.optimizer == "adamw" else fa.optim.sgd)(args.lr)
    step = fa.train_step(
        loss_fn,
        optimizer=rule,
        compile=args.compile,
        accumulation=fa.Accumulation(
            reducer=reducer, microbatch_size=args.microbatch_size, strategy=_common.strategy(args)
        ),
    )
    runner = (
        fa.AdaptiveBatching(step)
        if args.reducer == "adaptive"
        else None
    )
    state = step.init(params)
    average = params
    best = {"loss": float("inf"), "params": params, "epoch": -1}
    n = len(train[1])
    used_per_epoch: list[float] = []

    def epoch_batches(epoch: int) -> list[Batch]:
        shuffle = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + epoch))
        shuffle = shuffle.to(device)
        return [
            (train[0][shuffle[i : i + args.batch_size]], train[1][shuffle[i : i + args.batch_size]])
            for i in range(0, n, args.batch_size)
        ]

    with recipe.progress("epochs", args.epochs) as advance:
        for epoch in range(args.epochs):
            used = 0.0
            metrics: dict[str, Any] = {}
            if runner is None:
                for batch in epoch_batches(epoch):
                    state, metrics = step(state, batch)
                    used += float(metrics.weight)
                    average = fa.tree.lerp(average, state.params, 1 - args.ema_decay)
                    recipe.log(epoch=epoch, **metrics.to_dict())
            else:
                microbatches = iter(
                    (b[0][i : i + args.microbatch_size], b[1][i : i + args.microbatch_size])
                    for b in epoch_batches(epoch)
                    for i in range(0, len(b[1]), args.microbatch_size)
                )
                start = state
                for state, metrics in runner.steps(start, microbatches):
                    used += float(metrics.weight)
                    average = fa.tree.lerp(average, state.params, 1 - args.ema_decay)
                    recipe.log(epoch=epoch, **metrics.to_dict())
            used_per_epoch.append(used)
            valid_loss, _ = evaluate(state.params)
            if valid_loss < best["loss"]:
                best = {"loss": valid_loss, "params": state.params, "epoch": epoch}
            advance(loss=metrics.loss)

    # The article's loop: loader batches of the microbatch size, a step every K of them,
    # the accumulator reset each epoch, so a last partial group is never applied.
    k = args.batch_size // args.microbatch_size
    loader_batches = -(-n // args.microbatch_size)
    seed_used = min(n, (loader_batches // k) * k * args.microbatch_size)
    rows = []
    for name, weights in (
        ("final params", state.params),
        ("EMA of params", average),
        (f"best by validation (epoch {best['epoch']})", best["params"]),
    ):
        loss, accuracy = evaluate(weights)
        rows.append([name, loss, accuracy])
    recipe.summary(
        ["weights", "validation loss", "validation accuracy"],
        rows,
        notes=[
            f"data: {source}; {n} training and {len(valid[1])} validation examples; "
            f"{args.epochs} epochs, {args.optimizer} lr {args.lr}, reducer {args.reducer}, "
            f"{device}.",
            f"examples per epoch: funcaccum used {used_per_epoch[-1]:.0f} of {n} "
            f"({int(state.step) / args.epochs:.1f} steps per epoch, the last partial, weighted "
            f"exactly); the article's loop would apply {seed_used}.",
            f"optimizer steps taken: {int(state.step)}; "
            f"skipped as non-finite: {int(state.skipped)}.",
        ],
    )


if __name__ == "__main__":
    main()
