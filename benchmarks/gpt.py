"""A GPT-2-shaped training step: time to the first step, cold and warm, and the step itself.

One process per side (and a second process on the same compile cache, for
the warm start), each side building the same model, data and AdamW:

- ``batch``: one batch of ``K * m`` sequences, ``torch.compile(model)``,
  fused ``torch.optim.AdamW`` (no accumulation: the speed to aim for);
- ``loop`` / ``loop_compiled``: the hand-written loop, ``loss / K``,
  ``backward()``, an optimizer step every ``K`` microbatches, eager or with
  ``torch.compile(model)``;
- ``jax``: ``jax.jit`` of a ``lax.scan`` over the microbatches and
  ``optax.adamw`` (skipped when jax is not installed);
- ``fa_scan``, ``fa_vmap``, ``fa_chunked``: ``funcaccum.train_step`` with
  each strategy, ``compile=True``; ``fa_regions``: ``scan()`` with
  ``compile="regions"`` (each block compiled once, reused by the others);
  ``fa_scan_eager`` etc.: ``compile=False``.

Mixed precision: bf16 compute with float32 master weights (autocast for the
torch sides, ``compute_dtype`` for funcaccum, params cast inside the loss for
JAX); ``--dtype fp32`` turns it off (the CPU default: bf16 is emulated there).

Each row: ms per step (median of ``--steps`` steps after two warm-up steps),
tokens per second, MFU (with ``--peak-tflops``, or on an H100), the peak
memory over the timed steps (CUDA: ``max_memory_allocated``; CPU: the
process's resident-set high-water mark, runtime included), and the seconds to
the first step (from building the step to the end of its first call): cold,
in a fresh compile cache, and warm, in a second process on that cache.

    python benchmarks/gpt.py --small                    # 2-core CPU: a few minutes
    python benchmarks/gpt.py --small --layers 2,12 --sides loop_compiled,jax,fa_scan
    python benchmarks/gpt.py --device cuda --layers 2,12    # GPT-2 small shapes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import environment, print_table, run_worker, synchronize, write_results
from torch.nn import functional

import funcaccum as fa
from recipes.models import GPT

LEARNING_RATE, WEIGHT_DECAY = 3e-4, 0.1
GPU_SHAPE = {"d": 768, "heads": 12, "ctx": 1024, "vocab": 50304, "microbatch": 8, "k": 4}
SMALL_SHAPE = {"d": 64, "heads": 4, "ctx": 32, "vocab": 64, "microbatch": 8, "k": 4}
SIDES = [
    "batch",
    "loop",
    "loop_compiled",
    "jax",
    "fa_scan",
    "fa_vmap",
    "fa_chunked",
    "fa_regions",
    "fa_scan_eager",
    "fa_vmap_eager",
]
COMPILED = {"batch", "loop_compiled", "jax", "fa_scan", "fa_vmap", "fa_chunked", "fa_regions"}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16

Step = Callable[[], None]


def make_data(config: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n, ctx, vocab = config["k"] * config["microbatch"], config["ctx"], config["vocab"]
    tokens = torch.randint(vocab, (n, ctx + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def torch_side(config: dict[str, Any], side: str) -> Step:
    """Build one torch or funcaccum side; the build (and any compile wrapper) is timed too."""
    device, k = config["device"], config["k"]
    bf16 = config["dtype"] == "bf16"
    torch.manual_seed(0)
    model = GPT(config["layers"], config["d"], config["heads"], config["ctx"], config["vocab"])
    model = model.to(device)
    x, y = (t.to(device) for t in make_data(config))

    if side.startswith("fa_"):
        strategy = "scan" if side == "fa_regions" else side.split("_")[1]
        compile_as = "regions" if side == "fa_regions" else not side.endswith("_eager")
        apply, params, buffers = fa.functional_model(model)

        def loss_fn(params: dict[str, torch.Tensor], batch: tuple) -> torch.Tensor:
            tokens, targets = batch
            return cross_entropy(apply(params, buffers, tokens), targets)

        step = fa.train_step(
            loss_fn,
            optimizer=fa.optim.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY),
            compute_dtype=torch.bfloat16 if bf16 else None,
            compile=compile_as,
            accumulation=fa.Accumulation(
                num_microbatches=k, strategy=fa.chunked(2) if strategy == "chunked" else strategy
            ),
        )
        state = [step.init(params)]

        def fa_step() -> None:
            state[0], _ = step(state[0], (x, y))

        return fa_step

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, fused=True
    )
    forward = torch.compile(model) if side in ("batch", "loop_compiled") else model
    autocast = torch.autocast(device_type=torch.device(device).type, enabled=bf16)
    chunks = 1 if side == "batch" else k

    def loop_step() -> None:
        for xs, ys in zip(x.chunk(chunks), y.chunk(chunks), strict=True):
            with autocast:
                loss = cross_entropy(forward(xs), ys) / chunks
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return loop_step


def jax_side(config: dict[str, Any]) -> tuple[Step, Callable[[], float]]:
    """The same model and step in JAX: ``jit`` of a ``lax.scan`` over microbatches, optax AdamW."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    jax.config.update("jax_compilation_cache_dir", os.environ["FUNCACCUM_BENCH_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    d, heads, ctx, vocab, layers = (config[n] for n in ("d", "heads", "ctx", "vocab", "layers"))
    k, m = config["k"], config["microbatch"]
    compute = jnp.bfloat16 if config["dtype"] == "bf16" else jnp.float32
    rng = np.random.default_rng(0)

    def normal(*shape: int) -> jax.Array:
        return jnp.asarray(rng.normal(0.0, 0.02, shape), dtype=jnp.float32)

    def norm() -> dict[str, jax.Array]:
        return {"g": jnp.ones(d), "b": jnp.zeros(d)}

    params = {
        "wte": normal(vocab, d),
        "wpe": normal(ctx, d),
        "blocks": [
            {
                "ln1": norm(),
                "ln2": norm(),
                "qkv": normal(d, 3 * d),
                "qkv_b": jnp.zeros(3 * d),
                "proj": normal(d, d),
                "proj_b": jnp.zeros(d),
                "fc": normal(d, 4 * d),
                "fc_b": jnp.zeros(4 * d),
                "out": normal(4 * d, d),
                "out_b": jnp.zeros(d),
            }
            for _ in range(layers)
        ],
        "ln_f": norm(),
        "head": normal(d, vocab),
    }

    def layer_norm(x: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["g"] + p["b"]

    def forward(p: Any, tokens: jax.Array) -> jax.Array:
        p = jax.tree.map(lambda a: a.astype(compute), p)
        b, t = tokens.shape
        x = p["wte"][tokens] + p["wpe"][:t]
        for blk in p["blocks"]:
            qkv = (layer_norm(x, blk["ln1"]) @ blk["qkv"] + blk["qkv_b"]).reshape(
                b, t, 3, heads, d // heads
            )
            q, k_, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (batch, time, heads, head_dim)
            y = jax.nn.dot_product_attention(q, k_, v, is_causal=True)
            x = x + y.reshape(b, t, d) @ blk["proj"] + blk["proj_b"]
            h = jax.nn.gelu(layer_norm(x, blk["ln2"]) @ blk["fc"] + blk["fc_b"], approximate=True)
            x = x + h @ blk["out"] + blk["out_b"]
        return layer_norm(x, p["ln_f"]) @ p["head"]

    def loss_fn(p: Any, tokens: jax.Array, targets: jax.Array) -> jax.Array:
        logits = forward(p, tokens).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    opt_state = tx.init(params)

    def train_step(params: Any, opt_state: Any, xs: jax.Array, ys: jax.Array) -> tuple:
        def body(acc: Any, batch: tuple) -> tuple:
            loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
            return jax.tree.map(jnp.add, acc, grads), loss

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, losses = jax.lax.scan(body, zeros, (xs, ys))
        grads = jax.tree.map(lambda g: g / k, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, losses.mean()

    jitted = jax.jit(train_step, donate_argnums=(0, 1))
    x, y = (jnp.asarray(t.numpy()).reshape(k, m, ctx) for t in make_data(config))
    carry = [params, opt_state]

    def step() -> None:
        carry[0], carry[1], loss = jitted(carry[0], carry[1], x, y)
        loss.block_until_ready()

    def peak_mib() -> float:
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use", 0) / 2**20 or rss_high_water_mib()

    return step, peak_mib


def reset_rss_high_water() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current RSS


def rss_high_water_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024


def worker(config: dict[str, Any]) -> dict[str, Any]:
    side, device = config["side"], config["device"]
    torch.set_num_threads(config["threads"] or torch.get_num_threads())
    start = time.perf_counter()
    if side == "jax":
        step, peak = jax_side(config)
    else:
        step = torch_side(config, side)
        peak = None
    step()
    synchronize(device)
    first = time.perf_counter() - start
    for _ in range(2):
        step()
    synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_rss_high_water()
    times = []
    for _ in range(config["steps"]):
        begin = time.perf_counter()
        step()
        synchronize(device)
        times.append((time.perf_counter() - begin) * 1e3)
    if peak is not None:
        peak_mib = peak()
    elif device == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = rss_high_water_mib()
    return {"first_step_s": first, "ms": statistics.median(times), "peak_mib": peak_mib}


def flops_per_token(config: dict[str, Any]) -> float:
    """6N for the matrix products (embedding lookups excluded) plus attention's 12 L d T."""
    d, layers, ctx, vocab = config["d"], config["layers"], config["ctx"], config["vocab"]
    matmul_params = layers * 12 * d * d + d * vocab
    return 6 * matmul_params + 12 * layers * d * ctx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--small", action="store_true", help="a tiny GPT for a 2-core CPU")
    parser.add_argument("--layers", default="2", help="comma-separated layer counts")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"some of {SIDES}")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: 1 with --small)"
    )
    parser.add_argument("--no-warm", action="store_true", help="skip the warm-cache processes")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    shape = SMALL_SHAPE if args.small or args.device == "cpu" else GPU_SHAPE
    # A tiny model gains nothing from threads, and OpenMP's fork-join per kernel is what
    # suffers most when a shared machine is loaded: one thread keeps the sides comparable.
    threads = args.threads or (1 if shape is SMALL_SHAPE else None)
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    sides = args.sides.split(",")
    if "jax" in sides:
        try:
            import jax  # noqa: F401
        except ImportError:
            print("jax is not installed: the jax side is skipped (pip install 'jax[cpu]' optax)")
            sides.remove("jax")
    peak = args.peak_tflops
    if peak is None and args.device == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)

    rows, results = [], []
    for layers in (int(n) for n in args.layers.split(",")):
        config = {**shape, "layers": layers, "device": args.device, "dtype": dtype,
                  "steps": args.steps, "threads": threads}  # fmt: skip
        tokens = config["k"] * config["microbatch"] * config["ctx"]
        for side in sides:
            with tempfile.TemporaryDirectory() as cache:
                env = {"TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": f"{cache}/triton",
                       "FUNCACCUM_BENCH_CACHE": f"{cache}/jax"}  # fmt: skip
                if threads:
                    env["OMP_NUM_THREADS"] = str(threads)
                    env["XLA_FLAGS"] = (
                        "--xla_cpu_multi_thread_eigen=false "
                        f"intra_op_parallelism_threads={threads}"
                    )
                run = {**config, "side": side}
                cold = run_worker(__file__, run, timeout=args.timeout, env=env)
                warm = None
                if side in COMPILED and not args.no_warm:
                    warm = run_worker(__file__, run, timeout=args.timeout, env=env)
            tokens_per_s = tokens / (cold["ms"] / 1e3)
            mfu = tokens_per_s * flops_per_token(config) / (peak * 1e12) if peak else math.nan
            result = {"layers": layers, "side": side, "cold": cold, "warm": warm,
                      "tokens_per_s": tokens_per_s, "mfu": mfu}  # fmt: skip
            results.append(result)
            rows.append([
                layers, side, cold["ms"], tokens_per_s, "-" if math.isnan(mfu) else f"{mfu:.1%}",
                cold["peak_mib"], cold["first_step_s"], warm["first_step_s"] if warm else "-",
            ])  # fmt: skip
            print(json.dumps(result), flush=True)
    print_table(
        f"GPT step, K={shape['k']} x {shape['microbatch']} x {shape['ctx']} tokens, {dtype}, "
        f"{args.device}",
        ["layers", "side", "ms/step", "tokens/s", "MFU", "peak MiB", "first step s",
         "warm first step s"],
        rows,
    )  # fmt: skip
    write_results(
        f"gpt-{args.device}{'-small' if shape is SMALL_SHAPE else ''}-layers{args.layers}",
        {"command": " ".join(sys.argv), "environment": environment(args.device),
         "shape": shape, "dtype": dtype, "results": results},
    )  # fmt: skip


if __name__ == "__main__":
    main()
