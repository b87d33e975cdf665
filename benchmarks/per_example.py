"""Per-example clipped mean (the DP-SGD gradient): funcaccum against Opacus.

For each model and batch size, one worker process times, in the same run,
the clipped gradient of one batch (per-example clipping to ``max_norm``, then
the sum): no optimizer step, which is the same everywhere.

- funcaccum ``vmap`` (compiled): every per-example gradient at once;
- funcaccum ``chunked`` (compiled): 64 per-example gradients at a time;
- funcaccum ``ghost`` (eager): ghost clipping, one forward and one backward;
- Opacus ``GradSampleModule``: per-sample gradients by hooks, then clip and sum;
- Opacus fast gradient clipping with ghost clipping (two backward passes).

It reports ms per step (median), peak memory above the model and batch, and
each side's time over the best Opacus mode's. Opacus is the ``opacus`` extra.

    python benchmarks/per_example.py
    python benchmarks/per_example.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

import torch
from _common import (
    environment,
    peak_memory,
    print_table,
    run_worker,
    time_to_first_call,
    timed_median_ms,
    write_results,
)
from torch import nn
from torch.nn import functional

import funcaccum as fa
from recipes.models import MLP, CharTransformer, ConvNet

MAX_NORM = 1.0


def build(
    model_name: str, batch: int, device: str
) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    if model_name == "mlp":
        model = MLP((64, 256, 256, 10))
        data = (torch.randn(batch, 64), torch.randint(10, (batch,)))
    elif model_name == "conv":
        model = ConvNet(channels=1, classes=10, width=16)
        data = (torch.randn(batch, 1, 16, 16), torch.randint(10, (batch,)))
    else:
        model = CharTransformer(64, 32, dim=64, heads=4, layers=1)
        tokens = torch.randint(64, (batch, 33))
        data = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    return model.to(device), (data[0].to(device), data[1].to(device))


def per_example_losses(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    losses = functional.cross_entropy(output.flatten(0, -2), targets.flatten(), reduction="none")
    return losses.view(targets.shape[0], -1).mean(1)


def opacus_sides(model: nn.Module, data: tuple) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
        except ImportError:
            return {}
        x, y = data
        import copy

        sample_module = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")

        def grad_sample() -> None:
            for p in sample_module.parameters():
                p.grad, p.grad_sample = None, None
            per_example_losses(sample_module(x), y).sum().backward()
            samples = [p.grad_sample for p in sample_module.parameters()]
            norms = torch.stack([g.flatten(1).norm(dim=1) for g in samples]).norm(dim=0)
            coefficients = (MAX_NORM / (norms + 1e-6)).clamp(max=1.0)
            for p, g in zip(sample_module.parameters(), samples, strict=True):
                p.grad = torch.einsum("i,i...->...", coefficients, g)

        ghost_module = GradSampleModuleFastGradientClipping(
            copy.deepcopy(model),
            max_grad_norm=MAX_NORM,
            use_ghost_clipping=True,
            loss_reduction="sum",
        )

        def fast_ghost() -> None:
            ghost_module.zero_grad()
            per = per_example_losses(ghost_module(x), y)
            per.sum().backward(retain_graph=True)
            coefficients = ghost_module.get_clipping_coef()
            ghost_module.zero_grad()
            ghost_module.disable_hooks()
            (coefficients * per).sum().backward()
            ghost_module.enable_hooks()

        return {"opacus grad-sample": grad_sample, "opacus ghost": fast_ghost}


def worker(config: dict[str, Any]) -> dict[str, Any]:
    device = config["device"]
    model, data = build(config["model"], config["batch"], device)
    apply, params, buffers = fa.functional_model(model)

    def loss_fn(params: dict, batch: tuple) -> torch.Tensor:
        return per_example_losses(apply(params, buffers, batch[0]), batch[1]).mean()

    reducer = fa.clipped_mean(MAX_NORM)

    def funcaccum_side(**options: Any) -> Any:
        def clipped(params: dict, batch: tuple) -> dict:
            return fa.accumulate(
                loss_fn, params, batch, reducer=reducer, microbatch_size=1, **options
            ).grads

        return clipped

    sides: dict[str, Any] = {
        "funcaccum vmap": torch.compile(funcaccum_side(strategy="vmap"), fullgraph=True),
        "funcaccum chunked": torch.compile(
            funcaccum_side(strategy=fa.chunked(64)), fullgraph=True
        ),
        "funcaccum ghost": funcaccum_side(strategy=fa.ghost(model)),
    }
    results: dict[str, Any] = {}
    for name, fn in sides.items():
        results[name] = {"first_s": time_to_first_call(lambda fn=fn: fn(params, data), device)}
    for name, fn in opacus_sides(model, data).items():
        sides[name] = fn
        results[name] = {"first_s": time_to_first_call(fn, device)}
    for name, fn in sides.items():
        call = fn if name.startswith("opacus") else (lambda fn=fn: fn(params, data))
        results[name]["ms"] = timed_median_ms(call, device=device, repeat=config.get("repeat", 15))
        call()
        with peak_memory(device) as memory:
            call()
        results[name]["peak_mib"] = memory["mib"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batches", default="64,512", help="batch sizes, comma-separated")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    results: dict[str, Any] = {
        "environment": environment(args.device),
        "command": " ".join(sys.argv),
    }
    rows, results["runs"] = [], []
    for model in ("mlp", "conv", "transformer"):
        for batch in (int(b) for b in args.batches.split(",")):
            config = {"device": args.device, "model": model, "batch": batch}
            out = run_worker(__file__, config)
            print(json.dumps({**config, "sides": out}), flush=True)
            results["runs"].append({**config, "sides": out})
            opacus = [v["ms"] for k, v in out.items() if k.startswith("opacus")]
            best_opacus = min(opacus) if opacus else float("nan")
            for side, value in out.items():
                rows.append(
                    [
                        model,
                        batch,
                        side,
                        value["ms"],
                        best_opacus / value["ms"],
                        value["peak_mib"],
                        value["first_s"],
                    ]
                )
    print_table(
        f"per-example clipped mean ({args.device}): ms per step, peak memory",
        ["model", "batch", "side", "ms", "best Opacus ms / ms", "peak MiB", "first call s"],
        rows,
    )
    write_results(f"per_example-{args.device}", results)


if __name__ == "__main__":
    main()
