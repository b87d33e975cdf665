"""The adaptive-step reducer: steps and examples to a target loss, and its cost per step.

Part 1, on the small_dataset recipe's generated 10-class problem (an MLP,
SGD, microbatches of 16): training with a fixed number of microbatches K
(2, 4, 8, 16; the learning rate tuned for K = 2 and kept) against
``AdaptiveBatching`` (predictive controller, AdaScale gain on the learning
rate, base batch = 2 microbatches). It reports optimizer steps and examples
until the full training loss first reaches the target, and the final loss.

Part 2: the compiled step time of a training step with the ``mean`` reducer
and with ``adaptive`` (float64 sums, the default, and float32 sums) at K = 8,
on a small and a wide MLP, in the same process; the ratio is the statistics'
overhead.

    python benchmarks/adaptive.py
    python benchmarks/adaptive.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from _common import (
    alternating_medians_ms,
    environment,
    print_table,
    time_to_first_call,
    write_results,
)
from torch import nn

import funcaccum as fa
from recipes.models import MLP

MICROBATCH, LR, TARGET, MAX_EXAMPLES = 16, 0.05, 0.55, 400_000


def problem(device: str) -> tuple[Any, dict, dict, Any]:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 64, generator=g)
    y = torch.randint(10, (4096,), generator=g)
    x = centres[y] + 2.5 * torch.randn(4096, 64, generator=g)
    torch.manual_seed(0)
    apply, params, buffers = fa.functional_model(MLP((64, 128, 10)).to(device))

    def loss_fn(params: dict, batch: tuple) -> torch.Tensor:
        return nn.functional.cross_entropy(apply(params, buffers, batch[0]), batch[1])

    return loss_fn, params, {"x": x.to(device), "y": y.to(device)}, g


def microbatches(data: dict, generator: torch.Generator) -> Any:
    while True:
        order = torch.randperm(len(data["y"]), generator=generator).to(data["y"].device)
        for i in range(0, len(order) - MICROBATCH + 1, MICROBATCH):
            rows = order[i : i + MICROBATCH]
            yield (data["x"][rows], data["y"][rows])


def run(kind: str, k: int, device: str) -> dict[str, Any]:
    loss_fn, params, data, g = problem(device)
    stream = microbatches(data, g)
    if kind == "fixed":
        step = fa.train_step(
            loss_fn,
            optimizer=fa.optim.sgd(LR),
            accumulation=fa.Accumulation(num_microbatches=k),
        )
    else:
        reducer = fa.adaptive(base_batch_size=2 * MICROBATCH, k_max=64)
        step = fa.train_step(
            loss_fn,
            optimizer=fa.optim.sgd(LR),
            accumulation=fa.Accumulation(reducer=reducer),
        )
        runner = fa.AdaptiveBatching(step)
    state = step.init(params)
    examples, reached = 0, None
    ks = []
    while examples < MAX_EXAMPLES:
        if kind == "fixed":
            parts = [next(stream) for _ in range(k)]
            batch = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
            state, metrics = step(state, batch)
        else:
            state, metrics = runner(state, stream)
            ks.append(int(metrics.microbatches))
        examples += int(metrics.weight)
        if int(state.step) % 5 == 0:
            full = float(loss_fn(state.params, (data["x"], data["y"])))
            if full <= TARGET and reached is None:
                reached = {"steps": int(state.step), "examples": examples}
                break
    final = float(loss_fn(state.params, (data["x"], data["y"])))
    return {
        "reached": reached,
        "final_loss": final,
        "steps": int(state.step),
        "examples": examples,
        "mean_k": sum(ks) / len(ks) if ks else k,
    }


def overhead(device: str) -> dict[str, dict[str, float]]:
    """Compiled step time per reducer, K = 8; three alternating rounds, the median of each."""
    out: dict[str, dict[str, float]] = {}
    for model, sizes in (("mlp", (64, 128, 10)), ("mlp-wide", (784, 512, 512, 10))):
        torch.manual_seed(0)
        apply, params, buffers = fa.functional_model(MLP(sizes).to(device))

        def loss_fn(
            params: dict, batch: tuple, apply: Any = apply, buffers: Any = buffers
        ) -> torch.Tensor:
            return nn.functional.cross_entropy(apply(params, buffers, batch[0]), batch[1])

        batch = (
            torch.randn(128, sizes[0], device=device),
            torch.randint(10, (128,), device=device),
        )
        reducers = {
            "mean": fa.mean(),
            "adaptive (float64 sums)": fa.adaptive(),
            "adaptive (float32 sums)": fa.adaptive(accum_dtype=torch.float32),
        }
        calls = {}
        for name, reducer in reducers.items():
            step = fa.train_step(
                loss_fn,
                optimizer=fa.optim.sgd(LR),
                compile=True,
                max_consecutive_skips=None,
                accumulation=fa.Accumulation(reducer=reducer, num_microbatches=8),
            )
            state = [step.init(params)]

            def call(step: fa.TrainStep = step, state: list = state, batch: tuple = batch) -> None:
                state[0], _ = step(state[0], batch)

            time_to_first_call(call, device)
            calls[name] = call
        out[model] = alternating_medians_ms(calls, device=device, rounds=3, repeat=30)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    results: dict[str, Any] = {
        "environment": environment(args.device),
        "command": " ".join(sys.argv),
    }
    runs = {f"fixed K={k}": run("fixed", k, args.device) for k in (2, 4, 8, 16)}
    runs["adaptive"] = run("adaptive", 0, args.device)
    results["runs"] = runs
    rows = []
    for name, r in runs.items():
        hit = r["reached"] or {}
        rows.append(
            [
                name,
                hit.get("steps", "not reached"),
                hit.get("examples", "-"),
                r["mean_k"],
                r["final_loss"],
            ]
        )
    print_table(
        f"steps and examples until the full training loss reaches {TARGET} ({args.device})",
        ["run", "steps", "examples", "mean K", "final loss"],
        rows,
    )
    results["overhead_ms"] = overhead(args.device)
    print_table(
        f"compiled step time, K = 8 microbatches of 16 ({args.device})",
        ["model", "reducer", "ms per step", "relative to mean"],
        [
            [model, name, value, value / times["mean"]]
            for model, times in results["overhead_ms"].items()
            for name, value in times.items()
        ],
    )
    write_results(f"adaptive-{args.device}", results)


if __name__ == "__main__":
    main()
