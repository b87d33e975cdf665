"""Data-parallel steps on 2 processes: funcaccum DataParallel against DDP with no_sync.

Both sides train the same MLP with AdamW, K microbatches per rank per
optimizer step, timed in the same processes:

- DDP: ``no_sync()`` for the first K - 1 microbatches, a synchronising
  backward on the last, then ``torch.optim.AdamW`` (foreach);
- funcaccum: ``fa.distributed.DataParallel`` (fold, one all-reduce, apply),
  eager and with fold and apply compiled.

Bytes per step are counted on the wire's input: DDP's through a comm hook
(its gradient buckets), funcaccum's at its all-reduce.

    python benchmarks/data_parallel.py              # starts torchrun itself
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _common import (
    environment,
    print_table,
    time_to_first_call,
    timed_median_ms,
    write_results,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import funcaccum as fa
from recipes.models import MLP

SIZES = {"mlp": (64, 256, 256, 10), "mlp-wide": (784, 512, 512, 10)}
K, MICROBATCH, LR = 8, 32, 1e-3


def count_bucket_bytes(sent: list[int]) -> Any:
    """A DDP comm hook: DDP's default all-reduce, counting the bytes of every bucket."""

    def hook(state, bucket):
        sent[0] += bucket.buffer().numel() * bucket.buffer().element_size()
        tensor = bucket.buffer().div_(dist.get_world_size())
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda f: f.value()[0])

    return hook


def measure(sizes: tuple[int, ...], rank: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = MLP(sizes)
    x = torch.randn(K * MICROBATCH, sizes[0]) + rank
    y = torch.randint(sizes[-1], (K * MICROBATCH,))
    row: dict[str, Any] = {}

    ddp = DistributedDataParallel(copy.deepcopy(model))
    sent = [0]
    ddp.register_comm_hook(None, count_bucket_bytes(sent))
    opt = torch.optim.AdamW(ddp.parameters(), lr=LR, foreach=True)

    def ddp_step() -> None:
        for i in range(K):
            with ddp.no_sync() if i < K - 1 else nullcontext():
                part = slice(i * MICROBATCH, (i + 1) * MICROBATCH)
                (nn.functional.cross_entropy(ddp(x[part]), y[part]) / K).backward()
        opt.step()
        opt.zero_grad()

    row["ddp_first_s"] = time_to_first_call(ddp_step)
    sent[0] = 0
    row["ddp_ms"] = timed_median_ms(ddp_step, warmup=0, repeat=20)
    row["ddp_bytes"] = sent[0] / 20

    apply, params, buffers = fa.functional_model(model)

    def loss_fn(params: dict, batch: tuple) -> torch.Tensor:
        return nn.functional.cross_entropy(apply(params, buffers, batch[0]), batch[1])

    all_reduce, counted = dist.all_reduce, [0]

    def counting(tensor: torch.Tensor, *a: Any, **k: Any) -> Any:
        counted[0] += tensor.numel() * tensor.element_size()
        return all_reduce(tensor, *a, **k)

    for compiled in (False, True):
        step = fa.train_step(
            loss_fn,
            optimizer=fa.optim.adamw(LR),
            max_consecutive_skips=None,
            accumulation=fa.Accumulation(num_microbatches=K),
            compile=compiled,
        )
        parallel = fa.distributed.DataParallel(step)
        state = [parallel.init(params)]

        def funcaccum_step(parallel: Any = parallel, state: list = state) -> None:
            state[0], _ = parallel(state[0], (x, y))

        key = "funcaccum_compiled" if compiled else "funcaccum"
        row[f"{key}_first_s"] = time_to_first_call(funcaccum_step)
        counted[0] = 0
        dist.all_reduce = counting
        row[f"{key}_ms"] = timed_median_ms(funcaccum_step, warmup=0, repeat=20)
        dist.all_reduce = all_reduce
        row[f"{key}_bytes"] = counted[0] / 20
    return row


def rank_main(out: Path) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    results = {name: measure(sizes, dist.get_rank()) for name, sizes in SIZES.items()}
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    if "RANK" in os.environ:
        rank_main(Path(sys.argv[1]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 processes on 2 cores
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                "2",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                "29611",
                __file__,
                str(out),
            ],
            check=True,
            env=env,
        )
        results = json.loads(out.read_text())
    rows = []
    for model, row in results.items():
        for side in ("ddp", "funcaccum", "funcaccum_compiled"):
            rows.append(
                [
                    model,
                    side,
                    row[f"{side}_ms"],
                    row["ddp_ms"] / row[f"{side}_ms"],
                    row[f"{side}_bytes"],
                    row[f"{side}_first_s"],
                ]
            )
    print_table(
        f"2 processes (gloo, CPU), K={K} microbatches of {MICROBATCH} per rank, AdamW",
        [
            "model",
            "side",
            "ms per step",
            "DDP ms / ms",
            "bytes all-reduced per step",
            "first step s",
        ],
        rows,
    )
    record = {"environment": environment("cpu"), "command": " ".join(sys.argv), "results": results}
    write_results("data_parallel-cpu", record)


if __name__ == "__main__":
    main()
