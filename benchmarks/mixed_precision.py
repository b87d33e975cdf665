"""compute_dtype against autocast: how far a bf16 run drifts from float32, measured.

A tiny Llama (Hugging Face ``LlamaForCausalLM`` from a config, random weights:
nothing is downloaded) trained with AdamW on padded token batches and its own
``labels=`` loss, token-weighted (``has_weight``), three ways from the same start
on the same batches:

- ``float32``: the reference;
- ``compute_dtype`` (``torch.bfloat16``): funcaccum casts the params to bf16 for the loss (every op
  in bf16: matmuls, norms, softmax, the rotary embedding), float32 master weights;
- ``autocast``: the params stay float32 and the loss runs under
  ``torch.autocast("cpu", torch.bfloat16)``, which runs matmuls in bf16 and keeps
  norms, softmax and the loss in float32 (torch's per-op policy).

Printed: each run's final loss, the largest difference of its per-step loss from
float32's, the distance of its params from float32's relative to how far float32
training moved them (``|p - p32| / |p32 - p0|``), and ms per step.
Needs the ``models`` extra (transformers).

    python benchmarks/mixed_precision.py
    python benchmarks/mixed_precision.py --steps 50 --layers 4
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Any

import torch
from _common import environment, print_table, write_results

import funcaccum as fa  # before transformers: lets PyPI's torchvision import beside the CPU torch
from funcaccum import tree


def llama(layers: int, vocab: int) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).train()


def batches(steps: int, n: int, length: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded sequences of random lengths, each counting up from a random start by a
    random stride (learnable: the loss falls); -100 labels on the padding."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        lengths = torch.randint(length // 4, length + 1, (n,), generator=g)
        mask = (torch.arange(length) < lengths[:, None]).long()
        start = torch.randint(1, vocab, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        ids = (start + stride * torch.arange(length)) % (vocab - 1) + 1
        ids = ids * mask
        out.append({"input_ids": ids, "attention_mask": mask,
                    "labels": ids.masked_fill(mask == 0, -100)})  # fmt: skip
    return out


def run(
    side: str, model: torch.nn.Module, data: list[dict[str, torch.Tensor]], k: int
) -> dict[str, Any]:
    apply, params, buffers = fa.functional_model(model)
    autocast = side == "autocast"

    def loss_fn(params: dict, batch: dict) -> tuple:
        bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
        with bf16 if autocast else contextlib.nullcontext():
            loss = apply(params, buffers, **batch).loss
        return loss.float(), (batch["labels"][:, 1:] != -100).sum()

    step = fa.train_step(
        loss_fn,
        optimizer=fa.optim.adamw(1e-2),
        accumulation=fa.Accumulation(num_microbatches=k, has_weight=True),
        compute_dtype=torch.bfloat16 if side == "compute_dtype" else None,
    )
    state = step.init(params)
    start_params = state.params
    losses, times = [], []
    for batch in data:
        start = time.perf_counter()
        state, metrics = step(state, batch)
        times.append(time.perf_counter() - start)
        losses.append(float(metrics.loss))
    return {"losses": losses, "params": state.params, "start": start_params,
            "ms": 1e3 * statistics.median(times[1:])}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--microbatches", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    vocab = 128
    data = batches(args.steps, args.batch, args.length, vocab)
    sides = ["float32", "compute_dtype", "autocast"]
    results: dict[str, dict[str, Any]] = {}
    for side in sides:
        results[side] = run(side, llama(args.layers, vocab), data, args.microbatches)
    reference = results["float32"]
    rows, summary = [], {}
    # How far float32 training moved the params: the scale a drift is measured against.
    moved = float(tree.global_norm(tree.sub(reference["params"], reference["start"])))
    for side in sides:
        got = results[side]
        loss_gap = max(abs(a - b) for a, b in zip(got["losses"], reference["losses"], strict=True))
        param_gap = float(tree.global_norm(tree.sub(got["params"], reference["params"]))) / moved
        summary[side] = {"final_loss": got["losses"][-1], "max_loss_gap": loss_gap,
                         "param_gap": param_gap, "ms_per_step": got["ms"]}  # fmt: skip
        early = abs(got["losses"][2] - reference["losses"][2])
        summary[side]["loss_gap_step_3"] = early
        rows.append([side, f"{got['losses'][-1]:.4f}", f"{early:.1e}", f"{loss_gap:.1e}",
                     f"{param_gap:.2f}", f"{got['ms']:.0f}"])  # fmt: skip
    print_table(
        f"Tiny Llama ({args.layers} layers, d 64), {args.steps} AdamW steps of "
        f"{args.batch} x {args.length} tokens, K = {args.microbatches}",
        ["run", "final loss", "loss gap, step 3", "max loss gap", "param gap", "ms/step"],
        rows,
    )  # fmt: skip
    write_results("mixed_precision-cpu", {"environment": environment("cpu"), "args": vars(args),
                                          "results": summary})  # fmt: skip


if __name__ == "__main__":
    main()
