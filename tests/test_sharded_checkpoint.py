"""save_sharded and load_sharded: DCP shards per rank, resharded on load, loaded safely."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _sharded_worker import LR, accumulation, launch, local_batch, reference_model, token_loss

import funcaccum as fa
from funcaccum.testing import assert_trees_equal

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    # torch 2.13's FSDP2 warns whenever a wrapped Linear gets a 3-d input (its output is a
    # view), in case the caller writes into it in place; nothing here does.
    pytest.mark.filterwarnings("ignore:FSDP2-wrapped module .* returned a view tensor"),
]


def test_resume_on_another_world_size_is_bit_identical(tmp_path: Path) -> None:
    """Saved on 4 ranks after 3 steps, loaded on 2: the same state, and the same next steps."""
    saved = launch("save", 4, tmp_path)
    resumed = launch("resume", 2, tmp_path)
    for result in resumed:
        assert_trees_equal(result["loaded"], saved[0]["state"])  # every shard, every bit
        # Two more steps from the loaded state, and from the same state held in memory.
        assert_trees_equal(result["resumed"], result["from_memory"])
        assert int(result["resumed"].step) == 5
        assert torch.equal(result["rng"], saved[0]["rng"])  # rank 0's random state, everywhere
        assert result["metadata"] == {"epoch": 7}
        assert result["batches_consumed"] == 3
    assert_trees_equal(resumed[0]["resumed"], resumed[1]["resumed"])
    written = {p.name for p in (tmp_path / "checkpoint").iterdir()}
    assert written == {".metadata", "funcaccum.pt"} | {f"__{r}_0.distcp" for r in range(4)}


def sharded_step(mesh: Any, reducer: str = "mean") -> fa.distributed.FullyShardedStep:
    from torch.distributed.fsdp import fully_shard

    model = reference_model()
    fully_shard(model.inp, mesh=mesh)
    fully_shard(model.out, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return fa.distributed.FullyShardedStep(
        model,
        token_loss,
        optimizer=fa.optim.adamw(LR),
        accumulation=accumulation(reducer, {"num_microbatches": 2}),
    )


def trained(mesh: Any) -> tuple[fa.distributed.FullyShardedStep, fa.TrainState]:
    sharded = sharded_step(mesh)
    state, _ = sharded(sharded.init(), local_batch(0, 0, [4]))
    return sharded, state


def test_a_template_of_another_configuration_is_refused_by_path(
    one_process_group: Any, tmp_path: Path
) -> None:
    _, state = trained(one_process_group)
    fa.distributed.save_sharded(tmp_path / "ckpt", state)
    other = sharded_step(one_process_group, reducer="adaptive").init()  # a carry, not ()
    with pytest.raises(fa.FuncaccumError, match=r"at state.reducer_carry: the checkpoint holds"):
        fa.distributed.load_sharded(tmp_path / "ckpt", like=other)
    wider = state._replace(params={**state.params, "scale": torch.zeros(5, dtype=torch.float64)})
    with pytest.raises(fa.FuncaccumError, match=r"at state.params\['scale'\]"):
        fa.distributed.load_sharded(tmp_path / "ckpt", like=wider)
    with pytest.raises(fa.FuncaccumError, match="not a funcaccum sharded checkpoint"):
        fa.distributed.load_sharded(tmp_path, like=state)


def test_a_newer_checkpoint_replaces_the_older_whole(
    one_process_group: Any, tmp_path: Path
) -> None:
    sharded, state = trained(one_process_group)
    fa.distributed.save_sharded(tmp_path / "ckpt", sharded.init())
    fa.distributed.save_sharded(tmp_path / "ckpt", state, metadata={"step": 1})
    loaded = fa.distributed.load_sharded(tmp_path / "ckpt", like=sharded.init(), restore_rng=False)
    assert_trees_equal(loaded.state, state)
    assert loaded.metadata == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "rendezvous"]  # nothing left


def test_random_states_are_restored_as_funcaccum_load_restores_them(
    one_process_group: Any, tmp_path: Path
) -> None:
    _, state = trained(one_process_group)
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(11)
    fa.distributed.save_sharded(tmp_path / "ckpt", state, generators={"noise": generator})
    want = (torch.rand(3), torch.rand(3, generator=generator))  # what follows the save
    torch.manual_seed(0)
    generator.manual_seed(0)
    fa.distributed.load_sharded(tmp_path / "ckpt", like=state, generators={"noise": generator})
    assert torch.equal(torch.rand(3), want[0])
    assert torch.equal(torch.rand(3, generator=generator), want[1])
    before = torch.get_rng_state()
    fa.distributed.load_sharded(tmp_path / "ckpt", like=state, restore_rng=False)
    assert torch.equal(torch.get_rng_state(), before)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def test_a_metadata_file_that_would_run_code_is_refused_unread(
    one_process_group: Any, tmp_path: Path
) -> None:
    _, state = trained(one_process_group)
    fa.distributed.save_sharded(tmp_path / "ckpt", state)
    marker = tmp_path / "code-ran"
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(fa.FuncaccumError, match=r"names posix.mkdir, which is not part of"):
        fa.distributed.load_sharded(tmp_path / "ckpt", like=state)
    assert not marker.exists()


def test_a_checkpoint_with_pickled_objects_is_refused(
    one_process_group: Any, tmp_path: Path
) -> None:
    """DCP would torch.load(weights_only=False) a non-tensor entry: refused before reading."""
    import torch.distributed.checkpoint as dcp

    fa.distributed.save_sharded(tmp_path / "ckpt", {"w": torch.ones(2)})
    forged = tmp_path / "forged"  # its description, and DCP files with one pickled object more
    dcp.save({"leaf0": torch.ones(2), "extra": {"note": "an object"}}, checkpoint_id=forged)
    shutil.copy(tmp_path / "ckpt" / "funcaccum.pt", forged)
    with pytest.raises(fa.FuncaccumError, match=r"holds entries that are not tensors"):
        fa.distributed.load_sharded(forged, like={"w": torch.zeros(2)})


def test_a_sharded_checkpoint_loads_whole_into_plain_tensors(
    one_process_group: Any, tmp_path: Path
) -> None:
    _, state = trained(one_process_group)
    fa.distributed.save_sharded(tmp_path / "ckpt", state)
    whole = {n: torch.zeros_like(p.full_tensor()) for n, p in state.params.items()}
    loaded = fa.distributed.load_sharded(tmp_path / "ckpt", like=state._replace(params=whole))
    assert_trees_equal(loaded.state.params, {n: p.full_tensor() for n, p in state.params.items()})
