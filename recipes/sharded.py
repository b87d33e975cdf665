"""A GPT-shaped model sharded with FSDP2: exact accumulation on each rank's shards.

Start it with torchrun, which runs one process per rank:

    torchrun --nproc-per-node 2 recipes/sharded.py
    torchrun --nproc-per-node 4 recipes/sharded.py --sync step --gather step
    torchrun --nproc-per-node 1 recipes/sharded.py --device cuda      # NCCL, one GPU a rank

Every block of the model, then the model itself, goes through FSDP2's
``fully_shard``; ``funcaccum.distributed.FullyShardedStep`` runs each
microbatch through FSDP's hooks and folds the reduce-scattered gradient
shards, and AdamW updates the shards. On the CPU the processes talk through
gloo, on CUDA through NCCL. The summary shows each rank's bytes of params,
gradient sums and optimizer state beside what ``DataParallel`` holds for the
same model (everything, on every rank), the peak resident memory, and checks
that the ranks agree on every replicated value. Only rank 0 prints.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import time
import warnings

import _common
import torch
import torch.distributed as dist
from torch.nn import functional

import funcaccum as fa
from recipes.models import GPT

# torch 2.13's FSDP2 warns whenever a wrapped module's output is a view (a Linear on a
# 3-d input is one), in case the caller writes into it in place; nothing here does.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def language(generator: torch.Generator, vocab: int) -> torch.Tensor:
    """A first-order Markov chain over ``vocab`` tokens, each with a few likely successors."""
    logits = torch.randn(vocab, vocab, generator=generator) * 3.0
    return functional.softmax(logits, dim=-1)


def sample(
    chain: torch.Tensor, n: int, length: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.empty(n, length + 1, dtype=torch.int64)
    tokens[:, 0] = torch.randint(chain.shape[0], (n,), generator=generator)
    for t in range(length):
        tokens[:, t + 1] = torch.multinomial(chain[tokens[:, t]], 1, generator=generator)[:, 0]
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32, help="global sequences per step")
    p.add_argument("--microbatches", type=int, default=4, help="K per rank")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--sync", default="microbatch", choices=["microbatch", "step"])
    p.add_argument("--gather", default="microbatch", choices=["microbatch", "step"])
    p.add_argument("--reducer", default="mean", choices=["mean", "clipped", "adaptive"])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a collective may wait")
    args = p.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit("start me with torchrun: torchrun --nproc-per-node 2 recipes/sharded.py")
    if args.smoke:
        args.steps, args.batch_size, args.layers, args.dim, args.context = 4, 16, 2, 32, 16
    device = _common.start_distributed(args.device, args.timeout)
    _train(args, device)
    # Every FSDP module and mesh of the run is garbage now, so the group's gloo threads
    # stop here, not in the interpreter's teardown (where they can abort a rank).
    gc.collect()
    dist.barrier()
    fa.distributed.destroy_process_group()


def _train(args: argparse.Namespace, device: torch.device) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    args.quiet = args.quiet or rank != 0
    recipe = _common.Recipe(
        f"FSDP2 on {world} processes: sharded accumulation", args, show=rank == 0
    )
    if rank != 0:
        args.summary = args.metrics = None
    mesh = init_device_mesh(device.type, (world,))

    def build() -> GPT:
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        return GPT(args.layers, args.dim, args.heads, args.context, args.vocab).to(device)

    model = build()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)

    def loss_fn(module: torch.nn.Module, batch: tuple) -> torch.Tensor:
        tokens, targets = batch
        return functional.cross_entropy(module(tokens).flatten(0, 1), targets.flatten())

    reducer = {"mean": fa.mean(), "clipped": fa.clipped_mean(1.0), "adaptive": fa.adaptive()}[
        args.reducer
    ]
    optimizer = fa.optim.adamw(args.lr, weight_decay=0.1, mask=fa.optim.decay_mask)
    accumulation = fa.Accumulation(reducer=reducer, num_microbatches=args.microbatches)
    sharded = fa.distributed.FullyShardedStep(
        model,
        loss_fn,
        optimizer=optimizer,
        accumulation=accumulation,
        sync=args.sync,
        gather=args.gather,
        timeout=args.timeout,
    )
    state = sharded.init()

    generator = torch.Generator().manual_seed(args.seed)  # the same data on every rank
    chain = language(generator, args.vocab)
    share = args.batch_size // world
    mine = slice(rank * share, (rank + 1) * share)
    times, first_loss = [], None
    with recipe.progress("training", args.steps) as advance:
        for t in range(args.steps):
            tokens, targets = sample(chain, args.batch_size, args.context, generator)
            start = time.perf_counter()
            state, metrics = sharded(state, (tokens[mine].to(device), targets[mine].to(device)))
            times.append(time.perf_counter() - start)
            first_loss = float(metrics.loss) if first_loss is None else first_loss
            recipe.log(step=t, loss=metrics.loss, grad_norm=metrics.grad_norm)
            advance(loss=metrics.loss)

    # What DataParallel would hold on every rank for the same model: everything, whole.
    plain_params = {n: p.detach() for n, p in build().named_parameters()}
    mine_bytes = {
        "params": fa.distributed.local_bytes(state.params),
        "gradient sums": fa.distributed.local_bytes(accumulation.init(state.params).reducer),
        "optimizer state": fa.distributed.local_bytes(state.opt_state),
        "peak resident MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    everyone: list[dict] = [{}] * world
    dist.all_gather_object(everyone, mine_bytes)
    data_parallel = {
        "params": fa.distributed.local_bytes(plain_params),
        "gradient sums": fa.distributed.local_bytes(accumulation.init(plain_params).reducer),
        "optimizer state": fa.distributed.local_bytes(optimizer.init(plain_params)),
    }
    # The replicated values (loss, norm, counts) must be the same bits on every rank.
    check = torch.tensor([float(metrics.loss), float(metrics.grad_norm), float(state.step)])
    check = check.to(torch.float64)
    highest, lowest = check.clone(), check.clone()
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    rows = [
        ["processes", world],
        ["optimizer steps", int(state.step)],
        ["first loss", first_loss],
        ["final loss (global batch)", float(metrics.loss)],
        ["ms per step (median)", sorted(times)[len(times) // 2] * 1000],
        ["replicated values equal on every rank", bool(torch.equal(highest, lowest))],
    ]
    for what in ("params", "gradient sums", "optimizer state"):
        rows.append([f"{what}: DataParallel bytes per rank", data_parallel[what]])
        rows += [[f"{what}: sharded bytes, rank {r}", b[what]] for r, b in enumerate(everyone)]
    rows += [
        [f"peak resident MiB, rank {r}", b["peak resident MiB"]] for r, b in enumerate(everyone)
    ]
    recipe.summary(
        ["measure", "value"],
        rows,
        notes=[
            f"GPT {args.layers} layers, d={args.dim}, context {args.context}, vocab {args.vocab}; "
            f"{args.microbatches} microbatches per rank, sync={args.sync}, gather={args.gather}, "
            f"reducer {args.reducer}, AdamW lr {args.lr}; {dist.get_backend()} on {device}.",
            "Sharded bytes are this rank's shards; gradient sums are the reducer's accumulator "
            "(FSDP adds one microbatch's shards, or with sync=step the unsharded gradients).",
        ],
    )


if __name__ == "__main__":
    main()
