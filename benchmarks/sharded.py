"""FSDP2 on CPU processes: funcaccum's sharded step against a hand-written FSDP2 loop.

Every side trains the same GPT-shaped model (recipes/models.py) with AdamW,
``K`` microbatches per rank per optimizer step, timed in the same processes,
in alternating rounds:

- ``hand_fsdp2``: torchtitan's loop. ``fully_shard`` on every block and the
  root, FSDP's mean turned into a sum (``set_gradient_divide_factor(1.0)``,
  ``set_force_sum_reduction_for_comms(True)``), the global token count
  all-reduced before the first forward, each microbatch's summed loss divided
  by it and backpropagated (a reduce-scatter per microbatch), the gradient
  norm (``clip_grad_norm_``, as torchtitan logs it), ``torch.optim.AdamW``
  (foreach) on the DTensor shards;
- ``fa_sharded``: ``fa.distributed.FullyShardedStep`` on the same sharded
  model, ``sync="microbatch"`` (the same collectives, plus its own scalars);
- ``fa_sharded_step``: the same with ``sync="step"`` and ``gather="step"``:
  one all-gather and one reduce-scatter per step, full params and gradients
  held through it;
- ``fa_data_parallel``: ``fa.distributed.DataParallel`` on an unsharded copy:
  everything replicated, one all-reduce per step.

Each row: ms per step (the median of ``--steps`` steps, one step of each
side in turn, after a barrier), the ratio to the hand loop, rank 0's bytes
of params, gradient sums and optimizer state, the memory a step adds at its
peak (the resident set's high-water mark over two steps, less the resident
set before them, largest over ranks), and the peak resident set of a process
that built and ran that side alone (largest over ranks; the torch runtime
included). Times come from one launch running every side; memory from one
launch per side, which pins glibc's mmap threshold so the resident set
follows live tensors (a system call on every large allocation: it would
distort the times).

    python benchmarks/sharded.py                 # 1, 2 and 4 processes: a few minutes
    python benchmarks/sharded.py --worlds 2 --layers 2
    python benchmarks/sharded.py --d 384 --layers 6 --k 2 --microbatch 2 --steps 4 --tag large
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _common import environment, peak_memory, print_table, write_results
from torch.nn import functional

import funcaccum as fa
from recipes.models import GPT

warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
SIDES = ["hand_fsdp2", "fa_sharded", "fa_sharded_step", "fa_data_parallel"]
LR, WEIGHT_DECAY = 3e-4, 0.1


def build(config: dict[str, Any]) -> GPT:
    torch.manual_seed(0)
    return GPT(config["layers"], config["d"], config["heads"], config["ctx"], config["vocab"])


def sharded_model(config: dict[str, Any], mesh: Any) -> GPT:
    from torch.distributed.fsdp import fully_shard

    model = build(config)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def local_data(config: dict[str, Any], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    n, ctx, vocab = config["k"] * config["microbatch"], config["ctx"], config["vocab"]
    tokens = torch.randint(vocab, (n, ctx + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> Any:
    return functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)


def hand_fsdp2(config: dict[str, Any], mesh: Any, data: tuple) -> tuple[Any, dict[str, int]]:
    from torch.distributed.fsdp import FSDPModule

    model = sharded_model(config, mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, foreach=True)
    x, y = data
    k, grad_norm = config["k"], [None]

    def step() -> None:
        tokens = torch.tensor(float(y.numel()), dtype=torch.float64)
        dist.all_reduce(tokens)  # the global token count, before the first forward
        for xs, ys in zip(x.chunk(k), y.chunk(k), strict=True):
            (cross_entropy(model(xs), ys, "sum") / tokens.item()).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        grad_norm[0] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # to log
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the optimizer state exists after the first step
    params = list(model.parameters())
    return step, {
        "params": fa.distributed.local_bytes(params),
        "grads": fa.distributed.local_bytes(params),  # .grad shards, between microbatches
        "opt_state": fa.distributed.local_bytes(
            [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        ),
    }


def fa_sharded(
    config: dict[str, Any], mesh: Any, data: tuple, **options: Any
) -> tuple[Any, dict[str, int]]:
    sharded = fa.distributed.FullyShardedStep(
        sharded_model(config, mesh),
        lambda module, batch: cross_entropy(module(batch[0]), batch[1]),
        optimizer=fa.optim.adamw(LR, weight_decay=WEIGHT_DECAY),
        accumulation=fa.Accumulation(num_microbatches=config["k"]),
        max_consecutive_skips=None,
        **options,
    )
    state = [sharded.init()]

    def step() -> None:
        state[0], _ = sharded(state[0], data)

    step()
    return step, {
        "params": fa.distributed.local_bytes(state[0].params),
        "grads": fa.distributed.local_bytes(sharded.accumulation.init(state[0].params).reducer),
        "opt_state": fa.distributed.local_bytes(state[0].opt_state),
    }


def fa_data_parallel(config: dict[str, Any], data: tuple) -> tuple[Any, dict[str, int]]:
    apply, params, buffers = fa.functional_model(build(config))

    def loss_fn(params: dict, batch: tuple) -> torch.Tensor:
        return cross_entropy(apply(params, buffers, batch[0]), batch[1])

    step = fa.train_step(
        loss_fn,
        optimizer=fa.optim.adamw(LR, weight_decay=WEIGHT_DECAY),
        accumulation=fa.Accumulation(num_microbatches=config["k"]),
        max_consecutive_skips=None,
    )
    parallel = fa.distributed.DataParallel(step)
    state = [parallel.init(params)]

    def run() -> None:
        state[0], _ = parallel(state[0], data)

    run()
    return run, {
        "params": fa.distributed.local_bytes(state[0].params),
        "grads": fa.distributed.local_bytes(step.accumulation.init(state[0].params).reducer),
        "opt_state": fa.distributed.local_bytes(state[0].opt_state),
    }


def rank_main(config: dict[str, Any], out: Path) -> None:
    """One rank of one launch: ``config["measure"]`` is ``"time"`` or ``"memory"``."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    data = local_data(config, rank)
    builders = {
        "hand_fsdp2": lambda: hand_fsdp2(config, mesh, data),
        "fa_sharded": lambda: fa_sharded(config, mesh, data),
        "fa_sharded_step": lambda: fa_sharded(config, mesh, data, sync="step", gather="step"),
        "fa_data_parallel": lambda: fa_data_parallel(config, data),
    }
    sides = {name: builders[name]() for name in config["sides"]}
    result: dict[str, Any] = {}
    if config["measure"] == "time":
        # One step of each side in turn, many times: a shared machine's drift falls on all.
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(config["steps"]):
            for name, (call, _) in sides.items():
                dist.barrier()
                start = time.perf_counter()
                call()
                times[name].append(1e3 * (time.perf_counter() - start))
        for name, (_, sizes) in sides.items():
            result[name] = {"ms": statistics.median(times[name]), "ms_all": times[name], **sizes}
    else:
        for name, (call, _) in sides.items():
            with peak_memory("cpu") as peak:
                call()
                call()
            result[name] = {"step_peak_mib": peak["mib"]}
        result["process_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, result)
    if rank == 0:
        out.write_text(json.dumps(everyone))
    fa.distributed.destroy_process_group()


def launch(world: int, config: dict[str, Any], port: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default, said explicitly
        if config["measure"] == "memory":
            # Allocations over 64 KiB mmapped and returned on free, so the resident set
            # follows live tensors (_common.peak_memory); not for timing: it adds syscalls.
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                str(world),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                __file__,
                "--worker",
                json.dumps(config),
                str(out),
            ],
            check=True,
            env=env,
        )
        return json.loads(out.read_text())


def main() -> None:
    if "RANK" in os.environ:
        rank_main(json.loads(sys.argv[2]), Path(sys.argv[3]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", default="1,2,4", help="process counts")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--k", type=int, default=4, help="microbatches per rank")
    p.add_argument("--microbatch", type=int, default=4, help="sequences per microbatch")
    p.add_argument("--steps", type=int, default=20, help="timed steps per side, interleaved")
    p.add_argument("--port", type=int, default=29631)
    p.add_argument("--tag", default="", help="results/sharded-cpu[-TAG].json")
    args = p.parse_args()
    config = {
        "layers": args.layers,
        "d": args.d,
        "heads": 4,
        "ctx": 64,
        "vocab": 256,
        "k": args.k,
        "microbatch": args.microbatch,
        "steps": args.steps,
    }
    results: dict[int, list[dict[str, Any]]] = {}
    port = args.port
    for world in (int(w) for w in args.worlds.split(",")):
        port += 1
        timed = launch(world, config | {"measure": "time", "sides": SIDES}, port)
        ranks: list[dict[str, Any]] = [dict(r) for r in timed]
        for side in SIDES:  # a process of its own per side: its peak resident set is its own
            port += 1
            memory = launch(world, config | {"measure": "memory", "sides": [side]}, port)
            for mine, measured in zip(ranks, memory, strict=True):
                mine[side] |= measured[side] | {"peak_rss_mib": measured["process_peak_rss_mib"]}
        results[world] = ranks
    rows = []
    mib = 2**20
    for world, ranks in results.items():
        first = ranks[0]
        for side in SIDES:
            row = first[side]
            rows.append(
                [
                    world,
                    side,
                    row["ms"],
                    row["ms"] / first["hand_fsdp2"]["ms"],
                    row["params"] / mib,
                    row["grads"] / mib,
                    row["opt_state"] / mib,
                    max(r[side]["step_peak_mib"] for r in ranks),
                    max(r[side]["peak_rss_mib"] for r in ranks),
                ]
            )
    print_table(
        f"GPT {args.layers} layers, d={args.d}, K={args.k} x {args.microbatch} sequences of 64 "
        "per rank, AdamW, gloo",
        ["N", "side", "ms/step", "/hand", "params MiB", "grads MiB", "opt MiB", "step peak",
         "peak RSS"],
        rows,
    )  # fmt: skip
    record = {
        "environment": environment("cpu"),
        "command": " ".join(["python", *sys.argv]),
        "config": config,
        "results": results,
    }
    write_results("sharded-cpu" + (f"-{args.tag}" if args.tag else ""), record)


if __name__ == "__main__":
    main()
