"""One Adam update over many leaves: torch._foreach_* ops against leafwise ops, eager and compiled.

funcaccum.optim writes its update rules leafwise (``optree.tree_map`` of
elementwise ops), which inductor fuses per leaf. This measures that choice
against the same Adam update written with ``torch._foreach_*`` ops, which
batch the leaves into fewer kernel launches, eagerly and under
``torch.compile(fullgraph=True)``, in the same process.

    python benchmarks/optimizer_kernels.py
"""

from __future__ import annotations

import argparse
import sys

import optree
import torch
from _common import environment, print_table, timed_median_ms, write_results

import funcaccum as fa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    torch.manual_seed(0)
    device = args.device
    # 60 leaves, 1.0M parameters: 20 layers of (128 x 128, 128, 128).
    params = {
        f"layer{i}": {
            "w": torch.randn(128, 128, device=device),
            "b": torch.randn(128, device=device),
            "g": torch.randn(128, device=device),
        }
        for i in range(20)
    }
    grads = optree.tree_map(torch.randn_like, params)
    rule = fa.optim.adam(1e-3)
    state = rule.init(params)
    state = rule.update(grads, state, params)[1]  # a nonzero count and moments

    def leafwise(grads: dict, state: tuple, params: dict) -> dict:
        updates, _ = rule.update(grads, state, params)
        return fa.optim.apply_updates(params, updates)

    adam_state = state[0]
    b1, b2, eps = (adam_state.hyperparams[k] for k in ("b1", "b2", "eps"))
    lr = state[1].hyperparams["learning_rate"]

    def foreach(grads: dict, state: tuple, params: dict) -> dict:
        g, treedef = optree.tree_flatten(grads)
        m, v, p = (optree.tree_leaves(t) for t in (adam_state.mu, adam_state.nu, params))
        count = adam_state.count + 1
        m = torch._foreach_add(torch._foreach_mul(m, b1), torch._foreach_mul(g, 1 - b1))
        v = torch._foreach_add(
            torch._foreach_mul(v, b2), torch._foreach_mul(torch._foreach_mul(g, g), 1 - b2)
        )
        denominator = torch._foreach_add(
            torch._foreach_div(torch._foreach_sqrt(v), torch.sqrt(1 - b2**count)), eps
        )
        step = torch._foreach_div(torch._foreach_mul(m, lr / (1 - b1**count)), denominator)
        return optree.tree_unflatten(treedef, torch._foreach_sub(p, step))

    reference = leafwise(grads, state, params)
    difference = max(
        float((a - b).abs().max())
        for a, b in zip(
            optree.tree_leaves(reference),
            optree.tree_leaves(foreach(grads, state, params)),
            strict=True,
        )
    )
    rows, results = [], {}
    for name, fn in (("leafwise", leafwise), ("foreach", foreach)):
        for compiled in (False, True):
            run = torch.compile(fn, fullgraph=True) if compiled else fn
            ms = timed_median_ms(
                lambda run=run: run(grads, state, params), device=device, repeat=50
            )
            key = f"{name} {'compiled' if compiled else 'eager'}"
            results[key] = ms
            rows.append([key, ms])
    print_table(
        f"Adam update, 60 leaves, 1.0M parameters ({device}); the two agree to {difference:.1e}",
        ["implementation", "ms per update"],
        rows,
    )
    out = {"environment": environment(device), "command": " ".join(sys.argv), "ms": results}
    write_results(f"optimizer_kernels-{device}", out)


if __name__ == "__main__":
    main()
