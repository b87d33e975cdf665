"""A whole training step with AdamW: funcaccum compiled, the hand-written eager loop, and JAX.

Each worker process times, for one model and K, in the same run:

- the hand-written loop (``loss / K; loss.backward(); step every K``) with
  ``torch.optim.AdamW``, ``foreach=True`` and ``fused=True``;
- ``funcaccum.train_step`` with ``funcaccum.optim.adamw``, compiled
  (``vmap`` and ``scan`` strategies; ``scan`` again under
  ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, which skips
  Dynamo's per-call guard checks);
- the same step in JAX: ``optax.MultiSteps(optax.adamw)`` applied per
  microbatch inside a ``lax.scan`` over the K microbatches, under ``jax.jit``
  (the benchmark-only extra ``pip install "jax[cpu]" optax``).

It reports ms per optimizer step (the median of five rounds that time every
side in turn), the ratio to funcaccum, and the time to the first step
(compilation).

    python benchmarks/train_step.py
    python benchmarks/train_step.py --device cuda      # JAX skipped unless it sees the GPU
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
from collections.abc import Callable
from typing import Any

import torch
from _common import (
    alternating_medians_ms,
    environment,
    print_table,
    run_worker,
    time_to_first_call,
    write_results,
)
from torch import nn

import funcaccum as fa
from recipes.models import MLP

LEARNING_RATE, WEIGHT_DECAY = 1e-3, 1e-2
SIZES = {"mlp": (64, 256, 256, 10), "mlp-wide": (784, 512, 512, 10)}


Step = Callable[[], None]


def torch_sides(config: dict[str, Any]) -> dict[str, Step]:
    device, k, m = config["device"], config["k"], config["microbatch"]
    torch.manual_seed(0)
    sizes = SIZES[config["model"]]
    model = MLP(sizes).to(device)
    x = torch.randn(k * m, sizes[0], device=device)
    y = torch.randint(sizes[-1], (k * m,), device=device)
    sides: dict[str, Step] = {}

    for flavour in ("foreach", "fused"):
        loop_model = copy.deepcopy(model)
        opt = torch.optim.AdamW(
            loop_model.parameters(),
            lr=LEARNING_RATE,
            weight_decay=WEIGHT_DECAY,
            **{flavour: True},
        )

        def eager_loop(
            loop_model: nn.Module = loop_model, opt: torch.optim.Optimizer = opt
        ) -> None:
            for i in range(k):
                logits = loop_model(x[i * m : (i + 1) * m])
                (nn.functional.cross_entropy(logits, y[i * m : (i + 1) * m]) / k).backward()
            opt.step()
            opt.zero_grad()

        sides[f"loop_{flavour}"] = eager_loop

    apply, params, buffers = fa.functional_model(model)

    def loss_fn(params: dict, batch: tuple) -> torch.Tensor:
        inputs, targets = batch
        return nn.functional.cross_entropy(apply(params, buffers, inputs), targets)

    for strategy in ("vmap", "scan"):
        step = fa.train_step(
            loss_fn,
            optimizer=fa.optim.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY),
            compile=True,
            max_consecutive_skips=None,
            accumulation=fa.Accumulation(num_microbatches=k, strategy=strategy),
        )
        state = [step.init(params)]

        def funcaccum_step(step: fa.TrainStep = step, state: list = state) -> None:
            state[0], _ = step(state[0], (x, y))

        sides[f"funcaccum_{strategy}"] = funcaccum_step

    def unguarded(scan_step: Step = sides["funcaccum_scan"]) -> None:
        # Dynamo checks its guards on every call; once warm, with one compiled
        # graph and static shapes, a user may opt out of that.
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            scan_step()

    sides["funcaccum_scan_unguarded"] = unguarded
    return sides


def jax_side(config: dict[str, Any]) -> dict[str, Step]:
    try:
        import jax
        import jax.numpy as jnp
        import optax
    except ImportError:
        return {}
    if config["device"] == "cuda" and jax.default_backend() != "gpu":
        return {}
    k, m = config["k"], config["microbatch"]
    sizes = SIZES[config["model"]]
    key = jax.random.PRNGKey(0)
    params = []
    for a, b in itertools.pairwise(sizes):
        key, wkey = jax.random.split(key)
        params.append({"w": jax.random.normal(wkey, (a, b)) / a**0.5, "b": jnp.zeros(b)})
    key, xkey, ykey = jax.random.split(key, 3)
    x = jax.random.normal(xkey, (k, m, sizes[0]))
    y = jax.random.randint(ykey, (k, m), 0, sizes[-1])

    def loss_fn(params: list, x: Any, y: Any) -> Any:
        for layer in params[:-1]:
            x = jnp.tanh(x @ layer["w"] + layer["b"])
        logits = x @ params[-1]["w"] + params[-1]["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    optimizer = optax.MultiSteps(
        optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY), every_k_schedule=k
    )
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params: list, opt_state: Any, x: Any, y: Any) -> tuple:
        def microbatch(carry: tuple, batch: tuple) -> tuple:
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(microbatch, (params, opt_state), (x, y))
        return params, opt_state, losses.mean()

    carry = [params, opt_state]

    def jax_step() -> None:
        params, opt_state, loss = train_step(carry[0], carry[1], x, y)
        loss.block_until_ready()
        carry[:] = [params, opt_state]

    return {"jax": jax_step}


def worker(config: dict[str, Any]) -> dict[str, float]:
    """Every side's first-call seconds, then their ms per step, timed in alternation."""
    sides = {**torch_sides(config), **jax_side(config)}
    # The unguarded side runs the scan side's compiled graph: its first call is that one's.
    out = {
        f"{name}_first_s": time_to_first_call(step, config["device"])
        for name, step in sides.items()
        if name != "funcaccum_scan_unguarded"
    }
    out["funcaccum_scan_unguarded_first_s"] = out["funcaccum_scan_first_s"]
    timings = alternating_medians_ms(sides, device=config["device"], rounds=5, repeat=20)
    return out | {f"{name}_ms": ms for name, ms in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        config = json.loads(args.worker)
        print(json.dumps(worker(config)))
        return
    results: dict[str, Any] = {
        "environment": environment(args.device),
        "command": " ".join(sys.argv),
    }
    rows, results["runs"] = [], []
    for model, k in (("mlp", 1), ("mlp", 8), ("mlp-wide", 8)):
        config = {"device": args.device, "model": model, "k": k, "microbatch": 32}
        out = run_worker(__file__, config)
        print(json.dumps({**config, **out}), flush=True)
        results["runs"].append({**config, **out})
        best = min(out["funcaccum_vmap_ms"], out["funcaccum_scan_ms"])
        sides = ("loop_foreach", "loop_fused", "funcaccum_vmap", "funcaccum_scan")
        for side in (*sides, "funcaccum_scan_unguarded", "jax"):
            if f"{side}_ms" in out:
                ms = out[f"{side}_ms"]
                rows.append([model, k, side, ms, ms / best, out[f"{side}_first_s"]])
    print_table(
        f"AdamW training step ({args.device}): ms per optimizer step, microbatch 32",
        ["model", "K", "side", "ms", "ms / best funcaccum", "first step s"],
        rows,
    )
    write_results(f"train_step-{args.device}", results)


if __name__ == "__main__":
    main()
