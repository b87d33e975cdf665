"""Peak memory of a funcaccum step with and without activation checkpointing.

The GPT of ``benchmarks/gpt.py`` (each block wrapped in
``torch.utils.checkpoint`` on the checkpointed side), one fresh process per
side, ``fa.train_step`` with the ``"scan"`` strategy at a fixed microbatch
size: peak memory over one step (after a warm-up step), and ms per step.

    python benchmarks/checkpointing.py
    python benchmarks/checkpointing.py --device cuda --layers 12 --d 768 --ctx 1024
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from _common import environment, peak_memory, print_table, run_worker, synchronize, write_results
from gpt import GPT, cross_entropy

import funcaccum as fa


def worker(config: dict[str, Any]) -> dict[str, float]:
    device = config["device"]
    torch.manual_seed(0)
    model = GPT(config["layers"], config["d"], config["heads"], config["ctx"], config["vocab"],
                checkpointed=config["checkpointed"]).to(device)  # fmt: skip
    apply, params, buffers = fa.functional_model(model)

    def loss_fn(params: dict, batch: tuple) -> torch.Tensor:
        return cross_entropy(apply(params, buffers, batch[0]), batch[1])

    n = config["microbatch"] * config["k"]
    tokens = torch.randint(config["vocab"], (n, config["ctx"] + 1), device=device)
    batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    step = fa.train_step(
        loss_fn,
        optimizer=fa.optim.adamw(1e-4),
        accumulation=fa.Accumulation(num_microbatches=config["k"]),
    )
    state, _ = step(step.init(params), batch)  # warm-up: allocations made once
    synchronize(device)
    with peak_memory(device) as peak:
        state, _ = step(state, batch)
    times = []
    for _ in range(config["steps"]):
        start = time.perf_counter()
        state, _ = step(state, batch)
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"peak_mib": peak["mib"], "ms": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--microbatch", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    config = {k: v for k, v in vars(args).items() if k != "worker"}
    results, rows = {}, []
    for checkpointed in (False, True):
        out = run_worker(__file__, {**config, "checkpointed": checkpointed})
        side = "checkpointed" if checkpointed else "plain"
        results[side] = out
        rows.append([side, out["peak_mib"], out["ms"]])
    ratio = results["checkpointed"]["peak_mib"] / results["plain"]["peak_mib"]
    slowdown = results["checkpointed"]["ms"] / results["plain"]["ms"]
    rows.append(["checkpointed / plain", ratio, slowdown])
    print_table(
        f"activation checkpointing, {args.layers} layers, d {args.d}, microbatch "
        f"{args.microbatch} x {args.ctx} tokens ({args.device})",
        ["side", "peak MiB over one step", "ms/step"],
        rows,
    )
    info = {"config": config, "environment": environment(args.device)}
    write_results(f"checkpointing-{args.device}", {**info, **results})


if __name__ == "__main__":
    main()
