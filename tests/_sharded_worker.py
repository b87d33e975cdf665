"""One rank of the FSDP2 tests: python _sharded_worker.py RANK WORLD RENDEZVOUS SCENARIO OUT.

Scenarios run many configurations in one launch (process start-up and FSDP's
set-up dominate a test's time): ``main`` trains every reducer, split and sync
mode and counts collectives and bytes; ``save`` and ``resume`` write a
sharded checkpoint on one world size and resume it on another.
"""

from __future__ import annotations

import copy
import datetime
import gc
import resource
import sys
import warnings
from pathlib import Path
from typing import Any

import optree
import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's funcaccum

import funcaccum as fa

# Every parameter's first dimension divides by 4: each rank's shard is exactly 1/N.
STEPS, LR, MAX_NORM, TOKENS, FEATURES, CLASSES = 5, 1e-2, 2.5, 5, 4, 4
REDUCERS = {
    "mean": fa.mean,
    "clipped_mean": lambda: fa.clipped_mean(MAX_NORM),
    "adaptive": fa.adaptive,
}
# Each step's examples per rank: uneven shares, and a rank with none.
SPLITS = {
    1: [[8], [6], [9], [5], [7]],
    2: [[7, 3], [6, 0], [3, 7], [0, 6], [5, 5]],
    4: [[5, 3, 0, 4], [3, 3, 3, 3], [0, 6, 3, 3], [4, 0, 0, 8], [3, 5, 4, 0]],
}
# (sync, gather) modes: every reducer in the microbatch modes; mean also defers the sync.
MODES = {
    "mean": [("microbatch", "microbatch"), ("microbatch", "step"), ("step", "microbatch"),
             ("step", "step")],
    "clipped_mean": [("microbatch", "microbatch"), ("microbatch", "step")],
    "adaptive": [("microbatch", "microbatch"), ("microbatch", "step")],
}  # fmt: skip


class TokenModel(nn.Module):
    """A per-token MLP, ``(n, T, d) -> (n, T, c)``, with a scale of its own at the root."""

    def __init__(self, d: int = FEATURES, hidden: int = 8, classes: int = CLASSES) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(d, hidden), nn.Linear(hidden, classes)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, classes, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inp(x))) * self.scale


def token_loss(predict: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared error summed over a token's outputs, averaged over valid tokens; and their count."""
    errors = ((predict(batch["x"]) - batch["y"]) ** 2).sum(-1)
    count = batch["mask"].sum()
    return (errors * batch["mask"]).sum() / count, count


def reference_model() -> TokenModel:
    torch.manual_seed(0)
    return TokenModel().double()


def global_batch(step: int, n: int) -> dict[str, torch.Tensor]:
    """Step ``step``'s examples; every seventh example is all padding (no valid token)."""
    g = torch.Generator().manual_seed(100 + step)
    mask = torch.rand(n, TOKENS, generator=g) < 0.7
    mask[::7] = False
    return {
        "x": torch.randn(n, TOKENS, FEATURES, generator=g, dtype=torch.float64),
        "y": torch.randn(n, TOKENS, CLASSES, generator=g, dtype=torch.float64),
        "mask": mask.double(),
    }


def local_batch(step: int, rank: int, sizes: list[int]) -> dict[str, torch.Tensor]:
    batch = global_batch(step, sum(sizes))
    start = sum(sizes[:rank])
    return {k: v[start : start + sizes[rank]] for k, v in batch.items()}  # zero-length if none


def accumulation(reducer: str, split: dict[str, int]) -> fa.Accumulation:
    return fa.Accumulation(reducer=REDUCERS[reducer](), has_weight=True, **split)


def configs(world: int) -> list[dict[str, Any]]:
    """Every reducer, K in {1, 3}, each mode; and microbatch_size (ranks disagree on K)."""
    out = []
    for reducer, modes in MODES.items():
        for k in (1, 3):
            for sync, gather in modes:
                split = {"num_microbatches": k}
                out.append({"reducer": reducer, "split": split, "sync": sync, "gather": gather})
    for reducer in ("mean", "clipped_mean"):
        out.append({"reducer": reducer, "split": {"microbatch_size": 2}, "sync": "microbatch",
                    "gather": "microbatch"})  # fmt: skip
    return [c | {"name": f"{c['reducer']}-{c['split']}-{c['sync']}-{c['gather']}"} for c in out]


def sharded_model(mesh: Any) -> TokenModel:
    from torch.distributed.fsdp import fully_shard

    model = copy.deepcopy(reference_model())
    fully_shard(model.inp, mesh=mesh)
    fully_shard(model.out, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def plain_leaves(tree: Any) -> list[torch.Tensor]:
    """The leaves every rank holds whole (not DTensor shards)."""
    from torch.distributed.tensor import DTensor

    return [x for x in optree.tree_leaves(tree) if not isinstance(x, DTensor)]


def full(tree: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return optree.tree_map(lambda x: x.full_tensor() if isinstance(x, DTensor) else x, tree)


def sharded_step(mesh: Any, config: dict[str, Any]) -> fa.distributed.FullyShardedStep:
    """A FullyShardedStep on a fresh sharded model, as ``config`` sets it up."""
    return fa.distributed.FullyShardedStep(
        sharded_model(mesh),
        token_loss,
        optimizer=fa.optim.adamw(LR),
        accumulation=accumulation(config["reducer"], config["split"]),
        sync=config["sync"],
        gather=config["gather"],
        timeout=60,
    )


def train(mesh: Any, config: dict[str, Any], world: int, rank: int) -> dict[str, Any]:
    sharded = sharded_step(mesh, config)
    state = sharded.init()
    history = []
    for step, sizes in enumerate(SPLITS[world]):
        state, metrics = sharded(state, local_batch(step, rank, sizes))
        history.append(metrics)
    return {
        "params": full(state.params),
        "metrics": history,
        "replicated": plain_leaves((state, history)),
    }


# FSDP2 calls torch.distributed's collectives, DTensor the functional ones, funcaccum
# torch.distributed.all_reduce: every collective goes through one of these names.
COLLECTIVES = {
    "dist": ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor",
             "reduce_scatter_tensor", "all_reduce", "broadcast", "all_gather", "barrier"),
    "funcol": ("all_reduce", "all_gather_single", "reduce_scatter_single", "all_gather_inplace",
               "all_gather_tensor", "reduce_scatter_tensor"),
}  # fmt: skip


class CountCollectives:
    """Within the block, count every call of the collectives above, by module and name."""

    def __enter__(self) -> dict[str, int]:
        import torch.distributed._functional_collectives as funcol

        self.counts: dict[str, int] = {}
        self.saved: list[tuple[Any, str, Any]] = []
        for prefix, module in (("dist", dist), ("funcol", funcol)):
            for name in COLLECTIVES[prefix]:
                original = getattr(module, name)

                def counted(*args: Any, _key: str = f"{prefix}.{name}", _f: Any = original,
                            **kwargs: Any) -> Any:  # fmt: skip
                    self.counts[_key] = self.counts.get(_key, 0) + 1
                    return _f(*args, **kwargs)

                self.saved.append((module, name, original))
                setattr(module, name, counted)
        return self.counts

    def __exit__(self, *exc: object) -> None:
        for module, name, original in self.saved:
            setattr(module, name, original)


def count_step(mesh: Any, config: dict[str, Any], world: int, rank: int) -> dict[str, float]:
    """Collectives per optimizer step, by kind, counted over steps 2 to 5."""
    sharded = sharded_step(mesh, config)
    state = sharded.init()
    state, _ = sharded(state, local_batch(0, rank, [6] * world))  # FSDP's lazy set-up
    with CountCollectives() as counts:
        for step in range(1, STEPS):
            state, _ = sharded(state, local_batch(step, rank, [6] * world))
    return {name: count / (STEPS - 1) for name, count in counts.items()}


def measure_bytes(mesh: Any, rank: int) -> dict[str, Any]:
    """This rank's bytes of params, gradients and AdamW's state; the peak resident set."""
    sharded = fa.distributed.FullyShardedStep(
        sharded_model(mesh),
        token_loss,
        optimizer=fa.optim.adamw(LR),
        accumulation=accumulation("mean", {"num_microbatches": 2}),
        timeout=60,
    )
    state = sharded.init()
    state, _ = sharded(state, local_batch(0, rank, [6] * dist.get_world_size()))
    return {
        "params": fa.distributed.local_bytes(state.params),
        "opt_state": fa.distributed.local_bytes(state.opt_state),
        "grads": fa.distributed.local_bytes(sharded.accumulation.init(state.params).reducer),
        "full_params": sum(p.numel() * p.element_size() for p in reference_model().parameters()),
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def checkpoint_step(mesh: Any) -> Any:
    return fa.distributed.FullyShardedStep(
        sharded_model(mesh),
        token_loss,
        optimizer=fa.optim.adamw(LR),
        accumulation=accumulation("adaptive", {"num_microbatches": 2}),
        timeout=60,
    )


def save(mesh: Any, world: int, rank: int, out: Path) -> dict[str, Any]:
    """Three steps, a sharded checkpoint, the state whole for comparison."""
    sharded = checkpoint_step(mesh)
    state = sharded.init()
    for step in range(3):
        state, _ = sharded(state, local_batch(step, rank, [4] * world))
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    fa.distributed.save_sharded(out / "checkpoint", state, metadata={"epoch": 7})
    return {"state": full(state), "rng": rng}


def resume(mesh: Any, world: int, rank: int, out: Path) -> dict[str, Any]:
    """Load a checkpoint saved on another world size, then two steps; again from memory."""
    saved = torch.load(out / "save-rank0.pt", weights_only=False)["state"]
    sharded = checkpoint_step(mesh)
    torch.manual_seed(99)
    loaded = fa.distributed.load_sharded(out / "checkpoint", like=sharded.init())
    result: dict[str, Any] = {
        "loaded": full(loaded.state),
        "saved": saved,
        "rng": torch.get_rng_state(),
        "metadata": loaded.metadata,
        "batches_consumed": loaded.batches_consumed,
    }
    runs = {}
    for name, start in (("resumed", loaded.state), ("from_memory", _distributed(saved, sharded))):
        state = start
        for step in range(3, 5):
            state, _ = sharded(state, local_batch(step, rank, [4] * world))
        runs[name] = full(state)
    return result | runs


def _distributed(saved: Any, sharded: Any) -> Any:
    """A whole state cut into this rank's shards, as a template's leaves are."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    like = sharded.init()
    return optree.tree_map(
        lambda whole, template: (
            distribute_tensor(whole, template.device_mesh, template.placements)
            if isinstance(template, DTensor)
            else whole.clone()
        ),
        saved,
        like,
    )


def launch(scenario: str, world: int, out: Path, timeout: float = 400) -> list[dict[str, Any]]:
    """Run ``scenario`` on ``world`` gloo processes on loopback; each rank's result."""
    import subprocess
    import uuid

    # A rendezvous file of this launch's own, not a TCP port: another job on the machine
    # cannot take it between choosing and binding, nor join this group by mistake.
    rendezvous = out / f"rendezvous-{scenario}-{world}-{uuid.uuid4().hex}"
    # Each rank's output to a file: a pipe read after another rank's would fill and stall it.
    logs = [out / f"{scenario}-{world}-rank{rank}.log" for rank in range(world)]
    processes = []
    for rank, log in enumerate(logs):
        with log.open("w") as sink:  # the child holds its own copy of the descriptor
            command = [sys.executable, __file__, str(rank), str(world), str(rendezvous)]
            processes.append(
                subprocess.Popen([*command, scenario, str(out)], stdout=sink, stderr=sink)
            )
    failures = []
    for rank, process in enumerate(processes):
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
        if process.returncode != 0:
            failures.append(
                f"rank {rank} of {scenario} on {world}:\n{logs[rank].read_text()[-3000:]}"
            )
    if failures:
        raise AssertionError("\n".join(failures))
    return [torch.load(out / f"{scenario}-rank{r}.pt", weights_only=False) for r in range(world)]


def main() -> None:
    rank, world, rendezvous, scenario, out = (
        int(sys.argv[1]),
        int(sys.argv[2]),
        sys.argv[3],
        sys.argv[4],
        Path(sys.argv[5]),
    )
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    from torch.distributed.device_mesh import init_device_mesh

    # torch 2.13's FSDP2 warns whenever a wrapped Linear gets a 3-d input (its output is a
    # view), in case the caller writes into it in place; nothing here does.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh("cpu", (world,))
    result: dict[str, Any] = {}
    if scenario == "main":
        result["runs"] = {c["name"]: train(mesh, c, world, rank) for c in configs(world)}
        result["collectives"] = {
            c["name"]: count_step(mesh, c, world, rank)
            for c in configs(world)
            if c["split"] == {"num_microbatches": 3}
        }
        result["bytes"] = measure_bytes(mesh, rank)
    elif scenario == "bytes":
        result["bytes"] = measure_bytes(mesh, rank)
    elif scenario == "save":
        result = save(mesh, world, rank, out)
    elif scenario == "resume":
        result = resume(mesh, world, rank, out)
    torch.save(result, out / f"{scenario}-rank{rank}.pt")
    del mesh, result  # the group's threads stop at destroy, not in the interpreter's teardown
    gc.collect()
    dist.barrier()
    fa.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
