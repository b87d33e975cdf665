"""What bit-identical compiled runs cost on the CPU: ``compile=True`` with and without
torch's deterministic algorithms around the compiled pieces.

funcaccum runs its compiled pieces under ``torch.use_deterministic_algorithms(True,
warn_only=True)`` on CPU tensors (``funcaccum._compile.deterministic_on_cpu``), so
inductor lowers a scattered sum (an embedding's gradient) to the serial ATen kernel
instead of atomic adds in a varying order. The other side switches that context off,
which is what training was before. A GPT-shaped model with an embedding (the op the
setting changes), K = 4 microbatches, AdamW; one process per run, each with a fresh
compile cache and torch's default threads (the atomic adds race across threads), the
sides alternating; medians over ``--rounds`` runs of each.

    python benchmarks/determinism.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
from _common import environment, print_table, run_worker, write_results
from torch.nn import functional

import funcaccum as fa
from recipes.models import GPT

SHAPE = {"layers": 2, "dim": 64, "heads": 4, "context": 32, "vocab": 64, "microbatch": 8, "k": 4}


def worker(config: dict[str, Any]) -> dict[str, Any]:
    if not config["deterministic"]:  # the context as a no-op: the nondeterministic kernels
        fa._compile.deterministic_on_cpu.__enter__ = lambda self: None  # type: ignore[method-assign]
        fa._compile.deterministic_on_cpu.__exit__ = lambda self, *exc: None  # type: ignore[method-assign]
    torch.manual_seed(0)
    s = SHAPE
    model = GPT(s["layers"], s["dim"], s["heads"], s["context"], s["vocab"])
    apply, params, buffers = fa.functional_model(model)

    def loss_fn(params: dict, batch: tuple) -> torch.Tensor:
        tokens, targets = batch
        logits = apply(params, buffers, tokens)
        return functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    step = fa.train_step(
        loss_fn,
        optimizer=fa.optim.adamw(3e-4),
        accumulation=fa.Accumulation(num_microbatches=s["k"]),
        compile=True,
    )
    g = torch.Generator().manual_seed(1)
    n = s["k"] * s["microbatch"]
    batch = (torch.randint(s["vocab"], (n, s["context"]), generator=g),) * 2
    state = step.init(params)
    start = time.perf_counter()
    state, _ = step(state, batch)
    first = time.perf_counter() - start
    for _ in range(2):
        state, _ = step(state, batch)
    times = []
    for _ in range(config["steps"]):
        start = time.perf_counter()
        state, _ = step(state, batch)
        times.append(time.perf_counter() - start)
    return {"first_step_s": first, "ms": statistics.median(times) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    runs: dict[str, list[dict[str, Any]]] = {"deterministic": [], "nondeterministic": []}
    for _ in range(args.rounds):
        for side in runs:
            with tempfile.TemporaryDirectory() as cache:
                config = {"deterministic": side == "deterministic", "steps": args.steps}
                env = {"TORCHINDUCTOR_CACHE_DIR": cache}
                runs[side].append(run_worker(__file__, config, env=env))
    medians = {
        side: {key: statistics.median(r[key] for r in rs) for key in ("first_step_s", "ms")}
        for side, rs in runs.items()
    }
    ratio = medians["deterministic"]["ms"] / medians["nondeterministic"]["ms"]
    print_table(
        f"compile=True, GPT {SHAPE['layers']} layers d{SHAPE['dim']}, K={SHAPE['k']} (cpu)",
        ["side", "first step s", "ms per step", "relative step time"],
        [
            [side, m["first_step_s"], m["ms"], m["ms"] / medians["nondeterministic"]["ms"]]
            for side, m in medians.items()
        ],
    )
    print(f"deterministic / nondeterministic step time: {ratio:.3f}")
    write_results(
        "determinism-cpu",
        {
            "environment": environment("cpu"),
            "command": " ".join(sys.argv),
            "runs": runs,
            "medians": medians,
        },
    )


if __name__ == "__main__":
    main()
