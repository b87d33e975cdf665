"""One rank of the distributed tests: python _distributed_worker.py RANK WORLD PORT SCENARIO OUT."""

from __future__ import annotations

import datetime
import gc
import importlib
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
# This checkout's funcaccum first, not the one installed in the environment.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import classification_batch, conv_bn_model, image_batch, mlp_loss, mlp_params
from torch.nn import functional

import funcaccum as fa

REDUCERS = {"mean": fa.mean, "clipped": lambda: fa.clipped_mean(0.3), "adaptive": fa.adaptive}
# float32 params: adaptive's float64 sums beside float32 loss sums, or all float32.
REDUCERS32 = {**REDUCERS, "adaptive-f32": lambda: fa.adaptive(accum_dtype=torch.float32)}
FLOAT32_SPLIT, FLOAT32_STEPS = [12, 8], 4
# Batch norm: per-rank examples at each step (microbatches of 4), and the step made non-finite.
BN_SPLITS, BN_NAN_STEP = [[12, 4], [8, 8], [16, 0], [12, 4], [4, 12]], 3
COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "reduce_scatter",
    "reduce",
    "gather",
    "scatter",
)


def count_collectives() -> dict[str, int]:
    """Wrap torch.distributed's collectives so every call is counted."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def counted(
            *args: object, _name: str = name, _original: object = original, **kwargs: object
        ) -> object:
            counts[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    return counts


def bn_loss(apply: object) -> object:
    def loss_fn(params: dict, model_state: dict, batch: dict) -> tuple:
        logits, model_state = apply(params, model_state, batch["x"])
        return functional.cross_entropy(logits, batch["y"]), model_state

    return loss_fn


def bn_batch(i: int) -> dict:
    """Step ``i``'s global batch of 16 images; at BN_NAN_STEP the last 4 are NaN."""
    batch = image_batch(16, seed=i)
    if i == BN_NAN_STEP:
        batch["x"][12:] = float("nan")
    return batch


def shard(batch: dict, rank: int, sizes: list[int]) -> dict | None:
    start = sum(sizes[:rank])
    if sizes[rank] == 0:
        return None
    return {k: v[start : start + sizes[rank]] for k, v in batch.items()}


def gloo_threads(wait: float = 0.0, *, until_present: bool = False) -> list[str]:
    """Names of this process's threads that belong to gloo, polled for up to ``wait`` seconds.

    Polled until there are none, or with ``until_present`` until there are some (torch 2.11
    starts them a moment after the group).
    """
    deadline = time.monotonic() + wait
    while True:
        names = []
        for task in Path("/proc/self/task").iterdir():
            try:
                names.append((task / "comm").read_text().strip())
            except OSError:  # the thread ended while we looked
                continue
        found = sorted(name for name in names if "gloo" in name)
        if bool(found) == until_present or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)


def captured_world() -> bool:
    """Whether torch.distributed.nn.functional's default arguments hold a process group."""
    defaults = sys.modules["torch.distributed.nn.functional"].all_reduce.__defaults__
    return defaults[-1] is not None


def teardown(rank: int, world: int, ports: list[str], out: Path) -> None:
    """Three process groups in turn; after each is destroyed, are gloo's threads gone?

    ``funcaccum_first``: funcaccum imported before the group, torch's destroy.
    ``captured_late``: the group captured by a late import, funcaccum's destroy.
    ``torch_destroy``: the same capture, torch's destroy: the control, which
    leaves the group alive until its captured references are released.
    """
    result: dict[str, object] = {"before": gloo_threads()}
    for case, port in zip(
        ("funcaccum_first", "captured_late", "torch_destroy"), ports, strict=True
    ):
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        result[f"{case}_running"] = gloo_threads(wait=5.0, until_present=True)
        if case != "funcaccum_first":
            # As if torch.distributed.nn.functional were first imported now, after the group
            # came up (a program that imports funcaccum late): its defaults capture the group.
            sys.modules.pop("torch.distributed.nn.functional")
            importlib.import_module("torch.distributed.nn.functional")
        step = fa.train_step(
            mlp_loss,
            optimizer=fa.optim.sgd(0.1),
            accumulation=fa.Accumulation(num_microbatches=2),
        )
        parallel = fa.distributed.DataParallel(step, timeout=30)
        state = parallel.init(mlp_params())
        for i in range(2):  # the first torch.func.grad imports torch._dynamo
            state, _ = parallel(state, shard(classification_batch(20, seed=i), rank, [10, 10]))
        result[f"{case}_captured"] = captured_world()
        del parallel
        if case == "captured_late":
            fa.distributed.destroy_process_group()
        else:
            dist.destroy_process_group()
        gc.collect()
        result[f"{case}_after"] = gloo_threads(wait=0.0 if case == "torch_destroy" else 5.0)
    # Release the control's group, so that this process exits cleanly too.
    module = sys.modules["torch.distributed.nn.functional"]
    fa.distributed._teardown.release_captured_group(module.all_reduce.__defaults__[-1])
    gc.collect()
    result["torch_destroy_released"] = gloo_threads(wait=5.0)
    torch.save(result, out / f"rank{rank}.pt")


def main() -> None:
    rank, world, port, scenario, out = (
        int(sys.argv[1]),
        int(sys.argv[2]),
        sys.argv[3],
        sys.argv[4],
        Path(sys.argv[5]),
    )
    if scenario == "teardown":
        teardown(rank, world, port.split(","), out)
        return
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    counts = count_collectives()
    params, batch = mlp_params(), classification_batch(20)
    result: dict[str, object] = {}
    if scenario == "exact":
        # per-rank sizes: aligned microbatches of 2 (14 + 6), uneven (13 + 7), an empty rank
        for split in ([14, 6], [13, 7], [20, 0]):
            for name, make in REDUCERS.items():
                if name != "mean" and split == [13, 7]:
                    continue  # clipping and noise statistics depend on microbatch boundaries
                acc = fa.Accumulation(reducer=make(), microbatch_size=2)
                local = shard(batch, rank, split)
                folded = acc.init(params) if local is None else acc.fold(mlp_loss, params, local)
                before = dict(counts)
                merged = fa.distributed.all_reduce_state(folded, timeout=30)
                assert sum(counts.values()) - sum(before.values()) == 1, counts
                out_of = acc.finalize(merged)
                result[f"{split}-{name}"] = (out_of.grads, out_of.loss, out_of.stats._asdict())
    elif scenario == "train":
        step = fa.train_step(
            mlp_loss,
            optimizer=fa.optim.adamw(1e-2),
            accumulation=fa.Accumulation(num_microbatches=3),
        )
        parallel = fa.distributed.DataParallel(step, timeout=30)
        torch.manual_seed(rank)  # different local params: init must broadcast rank 0's
        state = parallel.init(fa.tree.scale(mlp_params(), 1.0 + rank))
        counts_after_init = dict(counts)
        sizes = [12, 8]
        for i in range(20):
            local = shard(classification_batch(20, seed=i), rank, sizes)
            state, metrics = parallel(state, local)
        per_step = {k: (counts[k] - counts_after_init[k]) / 20 for k in COLLECTIVES}
        result = {
            "params": state.params,
            "per_step": per_step,
            "loss": metrics.loss,
            "step": state.step,
        }
    elif scenario == "dp_noise":
        # Per-rank seeds, as one seeds dropout: the global generator and the noise generator's
        # own seed differ between the ranks; DataParallel.init syncs the noise generator.
        torch.manual_seed(100 + rank)
        noise = torch.Generator().manual_seed(200 + rank)
        reducer = fa.clipped_mean(0.3, noise_multiplier=1.0, denominator=20, generator=noise)
        step = fa.train_step(
            mlp_loss,
            optimizer=fa.optim.sgd(0.1),
            accumulation=fa.Accumulation(reducer=reducer, microbatch_size=1),
        )
        parallel = fa.distributed.DataParallel(step, timeout=30)
        state = parallel.init(params)
        for i in range(3):
            state, _ = parallel(state, shard(classification_batch(20, seed=i), rank, [12, 8]))
        result = {"params": state.params, "noise_state": noise.get_state()}
    elif scenario == "float32":
        for name, make in REDUCERS32.items():
            step = fa.train_step(
                mlp_loss,
                optimizer=fa.optim.adamw(1e-2),
                accumulation=fa.Accumulation(reducer=make(), num_microbatches=3),
            )
            parallel = fa.distributed.DataParallel(step, timeout=30)
            state = parallel.init(mlp_params(torch.float32))
            before = dict(counts)
            for i in range(FLOAT32_STEPS):
                batch = classification_batch(20, dtype=torch.float32, seed=i)
                state, metrics = parallel(state, shard(batch, rank, FLOAT32_SPLIT))
            per_step = {k: (counts[k] - before[k]) / FLOAT32_STEPS for k in COLLECTIVES}
            result[name] = {"params": state.params, "per_step": per_step, "loss": metrics.loss}
    elif scenario == "batchnorm":
        apply, params, buffers = fa.functional_model(conv_bn_model(), has_state=True)
        step = fa.train_step(
            bn_loss(apply),
            optimizer=fa.optim.adamw(1e-2),
            accumulation=fa.Accumulation(microbatch_size=4, has_state=True),
        )
        parallel = fa.distributed.DataParallel(step, timeout=30)
        if rank == 1:  # init must broadcast rank 0's params and statistics
            params = fa.tree.scale(params, 2.0)
            buffers = {k: v + 1 for k, v in buffers.items()}
        state = parallel.init(params, model_state=buffers)
        after_init = dict(counts)
        history = [(state.params, state.model_state, False)]
        for i, split in enumerate(BN_SPLITS):
            state, metrics = parallel(state, shard(bn_batch(i), rank, split))
            history.append((state.params, state.model_state, bool(metrics.skipped)))
        per_step = {k: (counts[k] - after_init[k]) / len(BN_SPLITS) for k in COLLECTIVES}
        result = {"history": history, "per_step": per_step}
    elif scenario == "killed":
        step = fa.train_step(
            mlp_loss,
            optimizer=fa.optim.sgd(0.1),
            accumulation=fa.Accumulation(num_microbatches=2),
        )
        parallel = fa.distributed.DataParallel(
            step, timeout=float(os.environ.get("FA_TIMEOUT", "5"))
        )
        state = parallel.init(params)
        for i in range(10):
            if rank == 1 and i == 3:
                os._exit(17)  # a crash: no collective, no goodbye
            start = time.monotonic()
            try:
                state, _ = parallel(state, shard(batch, rank, [10, 10]))
            except fa.FuncaccumError as error:
                result = {
                    "failed_at": i,
                    "seconds": time.monotonic() - start,
                    "message": str(error),
                }
                break
    elif scenario == "stalled":
        step = fa.train_step(
            mlp_loss,
            optimizer=fa.optim.sgd(0.1),
            accumulation=fa.Accumulation(num_microbatches=2),
        )
        parallel = fa.distributed.DataParallel(step, timeout=3.0)
        state = parallel.init(params)
        if rank == 1:
            time.sleep(20)  # alive, but not joining the step
            os._exit(0)
        start = time.monotonic()
        try:
            parallel(state, shard(batch, rank, [10, 10]))
        except fa.FuncaccumError as error:
            result = {"seconds": time.monotonic() - start, "message": str(error)}
        torch.save(result, out / f"rank{rank}.pt")
        os._exit(0)  # the peer is gone: no orderly shutdown
    torch.save(result, out / f"rank{rank}.pt")
    if scenario != "killed":
        dist.destroy_process_group()
    else:
        os._exit(0)


if __name__ == "__main__":
    main()
