"""Data parallelism: two gloo processes on loopback, as torchrun would start them."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _distributed_worker import (
    BN_NAN_STEP,
    BN_SPLITS,
    FLOAT32_SPLIT,
    FLOAT32_STEPS,
    REDUCERS32,
    bn_batch,
    bn_loss,
)
from conftest import classification_batch, conv_bn_model, free_port, mlp_loss, mlp_params

import funcaccum as fa
from funcaccum.testing import assert_trees_allclose, assert_trees_equal

WORKER = Path(__file__).resolve().parent / "_distributed_worker.py"
pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]


def launch(
    scenario: str, tmp_path: Path, timeout: float = 240, ports: int = 1
) -> tuple[list[dict[str, Any]], list[int], float]:
    port, start = ",".join(free_port() for _ in range(ports)), time.monotonic()
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), "2", port, scenario, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    codes = []
    for process in processes:
        _, err = process.communicate(timeout=timeout)
        codes.append(process.returncode)
        if process.returncode not in (0, 17):
            raise AssertionError(f"{scenario} rank failed:\n{err[-3000:]}")
    results = [
        torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        if (tmp_path / f"rank{r}.pt").exists()
        else {}
        for r in range(2)
    ]
    return results, codes, time.monotonic() - start


def test_merged_states_equal_single_process_accumulation(tmp_path: Path) -> None:
    """Every reducer, aligned and uneven ranks, and a rank with no examples; one collective each."""
    results, _, _ = launch("exact", tmp_path)
    params, batch = mlp_params(), classification_batch(20)
    for key, (grads, loss, stats) in results[0].items():
        name = key.split("-")[-1]
        reducer = {"mean": fa.mean(), "clipped": fa.clipped_mean(0.3), "adaptive": fa.adaptive()}[
            name
        ]
        expected = fa.accumulate(mlp_loss, params, batch, reducer=reducer, microbatch_size=2)
        assert_trees_allclose(grads, expected.grads, rtol=1e-10, atol=1e-13, check_dtype=False)
        torch.testing.assert_close(loss, expected.loss, rtol=1e-12, atol=0)
        want = expected.stats._asdict()
        keys = [k for k in want if k != "efficiency" or name != "adaptive"]
        assert_trees_allclose(
            {k: stats[k] for k in keys},
            {k: want[k] for k in keys},
            rtol=1e-10,
            atol=1e-12,
        )
        assert_trees_equal(results[1][key][0], grads)  # the same bits on both ranks
    assert len(results[0]) == 7  # 3 reducers aligned, mean uneven, 3 reducers with an empty rank


def test_training_keeps_ranks_bit_identical_with_one_collective_per_step(tmp_path: Path) -> None:
    results, _, _ = launch("train", tmp_path)
    assert_trees_equal(results[0]["params"], results[1]["params"])
    assert results[0]["step"].item() == 20
    assert results[0]["per_step"] == ONE_ALL_REDUCE
    # The same 20 steps in one process, on the global batches, agree with the distributed run.
    step = fa.train_step(
        mlp_loss,
        optimizer=fa.optim.adamw(1e-2),
        accumulation=fa.Accumulation(num_microbatches=3),
    )
    state = step.init(mlp_params())
    for i in range(20):
        batch = classification_batch(20, seed=i)
        merged = step.accumulation.merge(
            step.fold(state, {k: v[:12] for k, v in batch.items()}).state,
            step.fold(state, {k: v[12:] for k, v in batch.items()}).state,
        )
        state, _ = step.apply(state, fa.Folded(merged))
    assert_trees_allclose(results[0]["params"], state.params, rtol=1e-10, atol=1e-12)


ONE_ALL_REDUCE = {
    "all_reduce": 1.0,
    "broadcast": 0.0,
    "all_gather": 0.0,
    "reduce_scatter": 0.0,
    "reduce": 0.0,
    "gather": 0.0,
    "scatter": 0.0,
}


def test_noise_is_the_same_on_every_rank_seeded_apart(tmp_path: Path) -> None:
    """DP noise drawn after the merge from a generator DataParallel keeps in step: ranks whose
    seeds differ (global and the noise generator's own) end bit-identical, and as one process
    drawing the noise from rank 0's generator."""
    results, _, _ = launch("dp_noise", tmp_path)
    assert_trees_equal(results[0]["params"], results[1]["params"])
    assert torch.equal(results[0]["noise_state"], results[1]["noise_state"])
    noise = torch.Generator().manual_seed(200)  # rank 0's
    reducer = fa.clipped_mean(0.3, noise_multiplier=1.0, denominator=20, generator=noise)
    step = fa.train_step(
        mlp_loss,
        optimizer=fa.optim.sgd(0.1),
        accumulation=fa.Accumulation(reducer=reducer, microbatch_size=1),
    )
    state = step.init(mlp_params())
    for i in range(3):
        state, _ = step(state, classification_batch(20, seed=i))
    assert_trees_allclose(results[0]["params"], state.params, rtol=1e-10, atol=1e-12)


def test_float32_params_take_one_collective_per_step_for_every_reducer(tmp_path: Path) -> None:
    """adaptive's float64 sums and the float32 loss sums share one buffer (float64)."""
    results, _, _ = launch("float32", tmp_path)
    assert set(results[0]) == set(REDUCERS32)
    for name, make in REDUCERS32.items():
        got = results[0][name]
        assert got["per_step"] == ONE_ALL_REDUCE, name
        assert_trees_equal(results[1][name]["params"], got["params"])
        # One process, merging the same two shares, agrees to float32 rounding.
        step = fa.train_step(
            mlp_loss,
            optimizer=fa.optim.adamw(1e-2),
            accumulation=fa.Accumulation(reducer=make(), num_microbatches=3),
        )
        state = step.init(mlp_params(torch.float32))
        cut = FLOAT32_SPLIT[0]
        for i in range(FLOAT32_STEPS):
            batch = classification_batch(20, dtype=torch.float32, seed=i)
            merged = step.accumulation.merge(
                step.fold(state, {k: v[:cut] for k, v in batch.items()}).state,
                step.fold(state, {k: v[cut:] for k, v in batch.items()}).state,
            )
            state, metrics = step.apply(state, fa.Folded(merged))
        assert_trees_allclose(got["params"], state.params, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got["loss"], metrics.loss, rtol=1e-6, atol=0)


def running_statistics_by_hand(
    params: dict, model_state: dict, batch: dict, split: list[int]
) -> dict:
    """The documented rule: each rank runs its microbatches of 4 through the module in train
    mode from the common state; floats average weighted by microbatch count, counters add up."""
    shares, counts, start = [], [], 0
    for size in split:
        part = {k: v[start : start + size] for k, v in batch.items()}
        start += size
        if size == 0:
            continue
        model = fa.load_into(conv_bn_model(), params, model_state).train()
        with torch.no_grad():
            for x in part["x"].split(4):
                model(x)
        shares.append(dict(model.named_buffers()))
        counts.append(len(part["x"].split(4)))
    total = sum(counts)
    merged = {}
    for name, old in model_state.items():
        if old.is_floating_point():
            merged[name] = sum(k * s[name] for k, s in zip(counts, shares, strict=True)) / total
        else:
            merged[name] = old + sum(s[name] - old for s in shares)
    return merged


def test_batch_norm_statistics_merge_across_ranks_in_the_one_collective(tmp_path: Path) -> None:
    """Params as one process gets them; running statistics by the documented rule; bit-identical
    ranks; a rank without examples counts for nothing; a skipped step keeps the statistics."""
    results, _, _ = launch("batchnorm", tmp_path)
    history = results[0]["history"]
    assert results[0]["per_step"] == ONE_ALL_REDUCE
    assert_trees_equal([h[:2] for h in results[1]["history"]], [h[:2] for h in history])
    apply, params, buffers = fa.functional_model(conv_bn_model(), has_state=True)
    assert_trees_equal(history[0][:2], (params, buffers))  # rank 0's, broadcast at init
    # One process on the global batches: the same microbatches of 4, so the same gradients.
    step = fa.train_step(
        bn_loss(apply),
        optimizer=fa.optim.adamw(1e-2),
        accumulation=fa.Accumulation(microbatch_size=4, has_state=True),
    )
    state = step.init(params, model_state=buffers)
    for i, split in enumerate(BN_SPLITS):
        state, metrics = step(state, bn_batch(i))
        (before_params, before_state, _), (got_params, got_state, skipped) = history[i : i + 2]
        assert skipped == bool(metrics.skipped) == (i == BN_NAN_STEP), i
        assert_trees_allclose(got_params, state.params, rtol=1e-10, atol=1e-12)
        if skipped:  # every rank rolls back: params and statistics as before the step
            assert_trees_equal((got_params, got_state), (before_params, before_state))
            continue
        want = running_statistics_by_hand(before_params, before_state, bn_batch(i), split)
        assert_trees_allclose(got_state, want, rtol=1e-12, atol=1e-14)
    # Every microbatch of every applied step counted once, as one process would count it.
    assert history[-1][1]["1.num_batches_tracked"].item() == sum(
        sum(split) // 4 for i, split in enumerate(BN_SPLITS) if i != BN_NAN_STEP
    )


def test_a_model_state_without_a_merge_rule_is_refused() -> None:
    with pytest.raises(fa.FuncaccumError, match=r"model_state\['flag'\] is a torch.bool tensor"):
        fa.distributed._data_parallel._check_model_state({"flag": torch.tensor(True)})


def test_a_killed_rank_makes_the_survivor_fail_clearly(tmp_path: Path) -> None:
    results, codes, _ = launch("killed", tmp_path)
    assert codes[1] == 17
    survivor = results[0]
    assert survivor["failed_at"] == 3
    assert survivor["seconds"] < 5 + 2  # the timeout, with room for a slow machine
    assert "rank 0: the all-reduce of optimizer step 4 (since init) failed" in survivor["message"]
    assert "a peer process died or stalled" in survivor["message"]
    assert "resume them all from the last checkpoint" in survivor["message"]


def test_a_stalled_rank_times_out(tmp_path: Path) -> None:
    results, _, _ = launch("stalled", tmp_path)
    survivor = results[0]
    assert 2.5 < survivor["seconds"] < 3 + 3
    assert "timeout 3.0 s" in survivor["message"]


def test_no_gloo_thread_outlives_the_destroyed_process_group(tmp_path: Path) -> None:
    """A process group must be freed at destroy: gloo threads alive at exit abort the process.

    torch.distributed.nn.functional, which the first torch.func.grad imports (through
    torch._dynamo), captures the live world group in its default arguments if it is
    first imported after init_process_group; funcaccum imports it before.
    """
    results, _, _ = launch("teardown", tmp_path, ports=3)
    for rank, result in enumerate(results):
        assert result["before"] == [], rank
        assert result["funcaccum_first_running"], rank  # the check sees gloo's threads
        # Imported with funcaccum, before the group: nothing captured, torch's destroy frees it.
        assert result["funcaccum_first_after"] == [], rank
        assert not result["funcaccum_first_captured"], rank
        # Captured by a late import: funcaccum's destroy releases the references.
        assert result["captured_late_after"] == [], rank
        assert result["captured_late_captured"], rank
        # The control: torch's destroy alone leaves the group, and gloo's threads, alive.
        assert result["torch_destroy_after"], rank
        assert result["torch_destroy_released"] == [], rank


def test_data_parallel_needs_an_initialised_process_group() -> None:
    step = fa.train_step(mlp_loss, optimizer=fa.optim.sgd(0.1))
    with pytest.raises(fa.FuncaccumError, match="init_process_group"):
        fa.distributed.DataParallel(step)
