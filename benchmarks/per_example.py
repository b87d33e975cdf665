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

Part 2 (``--part step``) times whole DP-SGD training steps (clip, noise, SGD
update) on the MLP and a GPT-shaped model (2 pre-norm blocks, causal sdpa,
d 64, context 32; and ``gpt-wide``, d 256, batch 32), every side in one
worker process, alternating rounds:

- ``torch``: the non-private step, a plain loop (forward, backward, ``torch.optim.SGD``);
- ``fa``: the non-private ``fa.train_step`` (``mean``, one microbatch, eager);
- ``fa DP ghost``: ``fa.train_step`` with a noised ``clipped_mean`` and ``ghost``;
- ``opacus DP hooks``: Opacus ``GradSampleModule`` and ``DPOptimizer``;
- ``opacus DP ghost``: Opacus fast gradient clipping with ghost clipping
  (``GradSampleModuleFastGradientClipping``, ``DPOptimizerFastGradientClipping``,
  ``DPLossFastGradientClipping``: two backward passes).

It prints the DP step's time over the non-private step's (``torch``) and the
best Opacus mode's over funcaccum's.

    python benchmarks/per_example.py
    python benchmarks/per_example.py --part step
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
    alternating_medians_ms,
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
NOISE, LR = 1.0, 0.05


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
        "funcaccum chunked": torch.compile(funcaccum_side(strategy=fa.chunked(64)), fullgraph=True),
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


class GPT(nn.Module):
    """GPT-2's shape at a CPU size (benchmarks/gpt.py's blocks), positions given per example.

    Per example, ``(b, t)``, not shared: Opacus's per-sample embedding gradients need a batch
    dimension (funcaccum's ghost takes either).
    """

    def __init__(self, layers: int = 2, d: int = 64, heads: int = 4, ctx: int = 32) -> None:
        super().__init__()
        from gpt import Block

        self.wte, self.wpe = nn.Embedding(64, d), nn.Embedding(ctx, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, 64, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x = self.wte(tokens) + self.wpe(positions.contiguous())
        return self.head(self.ln_f(self.blocks(x)))


def build_step_model(
    model_name: str, batch: int, device: str
) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    if model_name == "mlp":
        model: nn.Module = MLP((64, 256, 256, 10))
        data = (torch.randn(batch, 64), torch.randint(10, (batch,)))
    else:  # "gpt": d 64; "gpt-wide": d 256, where the ghost norms weigh less against the matmuls
        model = GPT(d=256 if model_name == "gpt-wide" else 64)
        tokens = torch.randint(64, (batch, 33))
        data = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    return model.to(device), (data[0].to(device), data[1].to(device))


def opacus_steps(model: nn.Module, data: tuple, batch: int) -> dict[str, Any]:
    """Opacus's two DP modes, each a whole step: per-sample clip, noise, SGD."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
            from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
            from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
        except ImportError:
            return {}
    import copy

    x, y = data
    sequence = y.ndim == 2
    hooks = GradSampleModule(copy.deepcopy(model), loss_reduction="mean")
    hooks_optimizer = DPOptimizer(
        torch.optim.SGD(hooks.parameters(), lr=LR), noise_multiplier=NOISE,
        max_grad_norm=MAX_NORM, expected_batch_size=batch, loss_reduction="mean",
    )  # fmt: skip

    def hooks_step() -> None:
        hooks_optimizer.zero_grad(set_to_none=True)
        functional.cross_entropy(hooks(x).flatten(0, -2), y.flatten()).backward()
        hooks_optimizer.step()

    ghost = GradSampleModuleFastGradientClipping(
        copy.deepcopy(model), max_grad_norm=MAX_NORM, use_ghost_clipping=True,
        loss_reduction="mean",
    )  # fmt: skip
    ghost_optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(ghost.parameters(), lr=LR), noise_multiplier=NOISE,
        max_grad_norm=MAX_NORM, expected_batch_size=batch, loss_reduction="mean",
    )  # fmt: skip
    criterion = DPLossFastGradientClipping(
        ghost, ghost_optimizer, nn.CrossEntropyLoss(reduction="mean"), loss_reduction="mean"
    )

    def ghost_step() -> None:
        ghost_optimizer.zero_grad(set_to_none=True)
        logits = ghost(x)
        shape = logits.shape if sequence else None
        criterion(logits.flatten(0, -2), y.flatten(), shape=shape).backward()  # two backwards
        ghost_optimizer.step()

    return {"opacus DP hooks": hooks_step, "opacus DP ghost": ghost_step}


def step_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Whole training steps, every side in this process, timed in alternating rounds."""
    device, batch = config["device"], config["batch"]
    torch.set_num_threads(config["threads"])
    model, data = build_step_model(config["model"], batch, device)
    apply, params, buffers = fa.functional_model(model)

    def loss_fn(params: dict, batch: tuple) -> torch.Tensor:
        return per_example_losses(apply(params, buffers, batch[0]), batch[1]).mean()

    def fa_step(accumulation: fa.Accumulation) -> Any:
        step = fa.train_step(loss_fn, optimizer=fa.optim.sgd(LR), accumulation=accumulation)
        state = [step.init(params)]

        def run() -> None:
            state[0], _ = step(state[0], data)

        return run

    import copy

    plain = copy.deepcopy(model)
    optimizer = torch.optim.SGD(plain.parameters(), lr=LR)

    def torch_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        per_example_losses(plain(data[0]), data[1]).mean().backward()
        optimizer.step()

    private = fa.clipped_mean(
        MAX_NORM, noise_multiplier=NOISE, denominator=batch,
        generator=torch.Generator(device).manual_seed(0),
    )  # fmt: skip
    sides: dict[str, Any] = {
        "torch": torch_step,
        "fa": fa_step(fa.Accumulation()),
        "fa DP ghost": fa_step(
            fa.Accumulation(reducer=private, microbatch_size=1, strategy=fa.ghost(model))
        ),
        **opacus_steps(model, data, batch),
    }
    for side in sides.values():
        side()  # build, check, warm
    return alternating_medians_ms(
        sides, device=device, rounds=config.get("rounds", 7), repeat=config.get("repeat", 10)
    )


def step_part(args: argparse.Namespace, results: dict[str, Any]) -> None:
    rows, results["steps"] = [], []
    plan = [(model, int(b)) for model in ("mlp", "gpt") for b in args.step_batches.split(",")]
    for model, batch in [*plan, ("gpt-wide", 32)]:
        if model not in args.step_models.split(","):
            continue
        config = {
            "device": args.device, "model": model, "batch": batch, "part": "step",
            "threads": args.threads, "rounds": args.rounds,
        }  # fmt: skip
        out = run_worker(__file__, config)
        print(json.dumps({**config, "ms": out}), flush=True)
        results["steps"].append({**config, "ms": out})
        opacus = [v for k, v in out.items() if k.startswith("opacus")]
        best = min(opacus) if opacus else float("nan")
        for side, ms in out.items():
            rows.append([model, batch, side, ms, ms / out["torch"], best / ms])
    print_table(
        f"DP-SGD training step ({args.device}): ms per step, medians of alternating rounds",
        ["model", "batch", "side", "ms", "x torch (non-private)", "best Opacus ms / ms"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batches", default="64,512", help="batch sizes, comma-separated")
    parser.add_argument("--step-batches", default="64,256", help="part 2's batch sizes")
    parser.add_argument("--step-models", default="mlp,gpt,gpt-wide", help="part 2's models")
    parser.add_argument("--part", default="both", choices=["clip", "step", "both"])
    parser.add_argument(
        "--threads", type=int, default=1, help="part 2's torch threads (1: steady on a busy CPU)"
    )
    parser.add_argument("--rounds", type=int, default=7, help="part 2's alternating rounds")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        config = json.loads(args.worker)
        print(json.dumps((step_worker if config.get("part") == "step" else worker)(config)))
        return
    results: dict[str, Any] = {
        "environment": environment(args.device),
        "command": " ".join(sys.argv),
    }
    if args.part in ("step", "both"):
        step_part(args, results)
    if args.part == "step":
        write_results(f"per_example-steps-{args.device}", results)
        return
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
