"""Data-parallel accumulation on torch.distributed: one all-reduce per optimizer step.

Start it with torchrun, which runs one process per rank:

    torchrun --nproc-per-node 2 recipes/data_parallel.py
    torchrun --nproc-per-node 2 recipes/data_parallel.py --steps 200 --microbatches 8 --compile

Every rank takes its own share of each global batch (shares of different
sizes: the last rank's is smaller), folds its microbatches, and one all-reduce
merges the folded states; every rank then applies the same update. On the
CPU the processes talk through gloo, on CUDA through NCCL. Only rank 0 prints.
The summary reports the collectives and bytes per optimizer step, and checks
that every rank ends with bit-identical params.
"""

from __future__ import annotations

import os

import _common
import torch
import torch.distributed as dist
from torch import nn

import funcaccum as fa
from recipes.models import MLP


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256, help="global examples per step")
    p.add_argument("--microbatches", type=int, default=4, help="K per rank")
    p.add_argument("--reducer", default="mean", choices=["mean", "clipped", "adaptive"])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a collective may wait")
    _common.add_step_flags(p, strategy=False)
    args = p.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit(
            "start me with torchrun: torchrun --nproc-per-node 2 recipes/data_parallel.py"
        )
    if args.smoke:
        args.steps, args.batch_size = 5, 64
    rank = int(os.environ["RANK"])
    device = _common.start_distributed(args.device, args.timeout)
    world = dist.get_world_size()
    args.quiet = args.quiet or rank != 0
    title = f"Data parallel on {world} processes: one all-reduce per step"
    recipe = _common.Recipe(title, args, show=rank == 0)
    if rank != 0:
        args.summary = args.metrics = None

    generator = torch.Generator().manual_seed(args.seed)  # the same data on every rank
    teacher = torch.randn(32, 10, generator=generator)
    torch.manual_seed(args.seed + rank)  # different starting params: init takes rank 0's
    apply, params, buffers = fa.functional_model(MLP((32, 128, 128, 10)).to(device))

    def loss_fn(params: dict, batch: tuple) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(apply(params, buffers, x), y)

    reducer = {"mean": fa.mean(), "clipped": fa.clipped_mean(1.0), "adaptive": fa.adaptive()}[
        args.reducer
    ]
    step = fa.train_step(
        loss_fn,
        optimizer=fa.optim.adamw(args.lr),
        accumulation=fa.Accumulation(reducer=reducer, num_microbatches=args.microbatches),
        compile=args.compile,
    )
    parallel = fa.distributed.DataParallel(step, timeout=args.timeout)
    state = parallel.init(params)

    collectives, sent = [0], [0]
    all_reduce = dist.all_reduce

    def counted(tensor: torch.Tensor, *a: object, **k: object) -> object:
        collectives[0] += 1
        sent[0] += tensor.numel() * tensor.element_size()
        return all_reduce(tensor, *a, **k)

    dist.all_reduce = counted
    # Shares of the global batch: equal, but the last rank takes what is left over.
    share = -(-args.batch_size // world)
    start, stop = rank * share, min((rank + 1) * share, args.batch_size)
    with recipe.progress("training", args.steps) as advance:
        for t in range(args.steps):
            x = torch.randn(args.batch_size, 32, generator=generator)
            y = (x @ teacher).argmax(-1)
            local = (x[start:stop].to(device), y[start:stop].to(device)) if stop > start else None
            state, metrics = parallel(state, local)
            recipe.log(
                step=t,
                loss=metrics.loss,
                weight=metrics.weight,
                grad_norm=metrics.grad_norm,
            )
            advance(loss=metrics.loss)
    dist.all_reduce = all_reduce
    flat = torch.cat([v.reshape(-1) for v in state.params.values()])
    spread = flat.clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    lowest = flat.clone()
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    identical = bool(torch.equal(spread, lowest))
    recipe.summary(
        ["measure", "value"],
        [
            ["processes", world],
            ["optimizer steps", int(state.step)],
            ["final loss (global batch)", float(metrics.loss)],
            ["examples per step", float(metrics.weight)],
            ["all-reduces per step", collectives[0] / args.steps],
            ["bytes all-reduced per step", sent[0] / args.steps],
            ["params bit-identical on every rank", identical],
        ],
        notes=[
            f"{args.microbatches} microbatches per rank, reducer {args.reducer}, "
            f"AdamW lr {args.lr}, {dist.get_backend()} backend, {device}."
        ],
    )
    fa.distributed.destroy_process_group()  # frees the group: no gloo thread left at exit


if __name__ == "__main__":
    main()
