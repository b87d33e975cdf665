"""funcaccum's training step against the hand-written accumulation loop.

Speed: ms per optimizer step, the hand-written loop (``loss / K;
loss.backward(); step every K``) and funcaccum timed in the same process, on
an MLP and a small transformer, for several K: eager against the eager loop,
compiled (``compile=True``, or the step compiled whole) against the loop with
``torch.compile(model)``.

Memory and compile time: at a fixed microbatch size, how peak memory and
compile seconds grow with K for each strategy.

    python benchmarks/accumulation.py                 # both parts, CPU
    python benchmarks/accumulation.py --device cuda
    python benchmarks/accumulation.py --part speed --smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Any

import torch
from _common import (
    alternating_medians_ms,
    environment,
    peak_memory,
    print_table,
    run_worker,
    time_to_first_call,
    write_results,
)
from torch import nn

import funcaccum as fa
from recipes.models import MLP, CharTransformer

LEARNING_RATE = 0.01
# "mlp" is small enough that per-op overhead matters (where compiling pays);
# "mlp-wide" is compute-bound on a 2-core CPU (about 1 GFLOP per step at K=8).
MLP_SIZES = {"mlp": (64, 256, 256, 10), "mlp-wide": (784, 512, 512, 10)}


def build(config: dict[str, Any]) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The model and a batch of ``k * microbatch`` examples."""
    torch.manual_seed(0)
    n, device = config["k"] * config["microbatch"], config["device"]
    if config["model"].startswith("mlp"):
        sizes = tuple(config.get("sizes", MLP_SIZES[config["model"]]))
        model = MLP(sizes)
        x, y = torch.randn(n, sizes[0]), torch.randint(sizes[-1], (n,))
    else:
        vocab, context = 64, 32
        model = CharTransformer(vocab, context, dim=64, heads=4, layers=1)
        x = torch.randint(vocab, (n, context))
        y = torch.roll(x, -1, dims=1)
    return model.to(device), (x.to(device), y.to(device))


def loss_of(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output.flatten(0, -2), targets.flatten())


def worker(config: dict[str, Any]) -> dict[str, Any]:
    device, k, m = config["device"], config["k"], config["microbatch"]
    model, (x, y) = build(config)

    # The hand-written loop of "What PyTorch code changes are needed?", with torch.optim.SGD;
    # beside a compiled funcaccum side its model is compiled too, torch.compile(model).
    loop_model = copy.deepcopy(model)
    opt = torch.optim.SGD(loop_model.parameters(), lr=LEARNING_RATE)
    forward = torch.compile(loop_model) if config["compiled"] else loop_model

    def eager_loop() -> None:
        for i in range(k):
            loss = loss_of(forward(x[i * m : (i + 1) * m]), y[i * m : (i + 1) * m]) / k
            loss.backward()
        opt.step()
        opt.zero_grad()

    apply, params, buffers = fa.functional_model(model)

    def loss_fn(params: dict, batch: tuple) -> torch.Tensor:
        inputs, targets = batch
        return loss_of(apply(params, buffers, inputs), targets)

    chunked = config["strategy"] == "chunked"
    step = fa.train_step(
        loss_fn,
        optimizer=fa.optim.sgd(LEARNING_RATE),
        compile=config["compiled"] is True,
        max_consecutive_skips=None,
        accumulation=fa.Accumulation(
            num_microbatches=k,
            strategy=fa.chunked(config["chunk"]) if chunked else config["strategy"],
        ),
    )
    state = step.init(params)
    # "whole": the step compiled as one graph by the caller, the microbatch loop a scan.
    run = torch.compile(step.step, fullgraph=True) if config["compiled"] == "whole" else step

    def funcaccum_step() -> None:
        nonlocal state
        state, _ = run(state, (x, y))

    result: dict[str, Any] = {"first_call_s": time_to_first_call(funcaccum_step, device)}
    result["loop_first_call_s"] = time_to_first_call(eager_loop, device)
    repeat = config.get("repeat", 20)
    if config["part"] == "speed":
        calls = {"loop_ms": eager_loop, "funcaccum_ms": funcaccum_step}
        result |= alternating_medians_ms(calls, device=device, rounds=3, repeat=repeat)
    else:
        funcaccum_step()
        with peak_memory(device) as memory:
            funcaccum_step()
        result["peak_mib"] = memory["mib"]
        eager_loop()
        with peak_memory(device) as memory:
            eager_loop()
        result["loop_peak_mib"] = memory["mib"]
    return result


def _mode(compiled: bool | str) -> str:
    """eager, compiled (``compile=True``: the loss) or whole (``torch.compile(step.step)``)."""
    return {False: "eager", True: "compiled", "whole": "whole compiled"}[compiled]


def speed_configs(
    device: str, smoke: bool, ks: set[int] | None = None, models: set[str] | None = None
) -> list[dict[str, Any]]:
    if smoke:
        base = {"part": "speed", "device": device, "microbatch": 4, "repeat": 3}
        return [
            {
                **base,
                "model": "mlp",
                "sizes": (8, 16, 4),
                "k": 2,
                "strategy": "scan",
                "compiled": False,
            }
        ]
    configs = []
    chosen_ks = ks
    for model, model_ks, microbatch in (
        ("mlp", (1, 4, 8, 16), 32),
        ("mlp-wide", (8,), 32),
        ("transformer", (1, 4, 16), 8),
    ):
        if models is not None and model not in models:
            continue
        for k in (k for k in model_ks if chosen_ks is None or k in chosen_ks):
            sides = (("scan", False), ("scan", True), ("scan", "whole"), ("vmap", True))
            for strategy, compiled in sides:
                configs.append(
                    {
                        "part": "speed",
                        "device": device,
                        "model": model,
                        "k": k,
                        "microbatch": microbatch,
                        "strategy": strategy,
                        "compiled": compiled,
                    }
                )
    return configs


def memory_configs(
    device: str, smoke: bool, ks: set[int] | None = None, strategies: set[str] | None = None
) -> list[dict[str, Any]]:
    ks = (1, 4) if smoke else tuple(k for k in (1, 2, 4, 16, 64) if ks is None or k in ks)
    sizes = (8, 16, 4) if smoke else (512, 2048, 2048, 512)
    return [
        {
            "part": "memory",
            "device": device,
            "model": "mlp",
            "sizes": sizes,
            "k": k,
            "microbatch": 32,
            "strategy": strategy,
            "chunk": 4,
            "compiled": not smoke,
        }
        for strategy in ("scan", "chunked", "vmap")
        if strategies is None or strategy in strategies
        for k in ks
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--part", default="all", choices=["all", "speed", "memory"])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, eager only: checks the script runs"
    )
    parser.add_argument("--ks", help="only these K, comma-separated (a shorter run)")
    parser.add_argument("--models", help="speed part: only these models, comma-separated")
    parser.add_argument("--strategies", help="memory part: only these strategies, comma-separated")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    ks = {int(k) for k in args.ks.split(",")} if args.ks else None
    strategies = set(args.strategies.split(",")) if args.strategies else None
    results: dict[str, Any] = {
        "environment": environment(args.device),
        "command": " ".join(sys.argv),
    }
    if args.part in ("all", "speed"):
        rows, results["speed"] = [], []
        models = set(args.models.split(",")) if args.models else None
        for config in speed_configs(args.device, args.smoke, ks, models):
            out = run_worker(__file__, config)
            print(json.dumps({**config, **out}), flush=True)
            results["speed"].append({**config, **out})
            side = f"{config['strategy']} {_mode(config['compiled'])}"
            rows.append(
                [
                    config["model"],
                    config["k"],
                    side,
                    out["loop_ms"],
                    out["funcaccum_ms"],
                    out["loop_ms"] / out["funcaccum_ms"],
                    out["first_call_s"],
                ]
            )
        print_table(
            f"ms per optimizer step ({args.device}): the hand-written loop (eager, or its model "
            "compiled beside a compiled funcaccum) vs funcaccum",
            ["model", "K", "funcaccum", "loop ms", "funcaccum ms", "speedup", "first step s"],
            rows,
        )
    if args.part in ("all", "memory"):
        rows, results["memory"] = [], []
        for config in memory_configs(args.device, args.smoke, ks, strategies):
            out = run_worker(__file__, config)
            print(json.dumps({**config, **out}), flush=True)
            results["memory"].append({**config, **out})
            rows.append(
                [
                    config["strategy"],
                    config["k"],
                    out["first_call_s"],
                    out["peak_mib"],
                    out["loop_peak_mib"],
                ]
            )
        print_table(
            f"peak memory and compile time vs K, microbatch 32 ({args.device})",
            ["strategy", "K", "compile s", "peak MiB", "loop peak MiB"],
            rows,
        )
    if not args.smoke:
        write_results(f"accumulation-{args.device}-{args.part}", results)


if __name__ == "__main__":
    main()
