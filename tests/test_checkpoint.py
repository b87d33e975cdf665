"""Checkpoints: exact round trips, bit-identical resumes in a fresh process, clear mismatches."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import optree
import pytest
import torch
from conftest import classification_batch, mlp_loss, mlp_params

import funcaccum as fa
from funcaccum.testing import assert_trees_equal

WORKER = Path(__file__).resolve().parent / "_checkpoint_worker.py"
SCENARIOS = ["sgd_momentum", "adamw_warmup_cosine", "dp_noise", "adaptive"]
RANDOM = {"sgd_momentum", "dp_noise"}  # dropout; clipped_mean's noise from the global generator


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run 10 steps, checkpoint, 10 more; then resume from the checkpoint in a new process."""
    out = tmp_path_factory.mktemp("resume")
    for phase in ("first", "resume"):
        done = subprocess.run(
            [sys.executable, str(WORKER), phase, str(out)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"{phase} failed:\n{done.stderr[-3000:]}"
    return out


@pytest.mark.subprocess
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_resume_in_a_fresh_process_is_bit_identical(resumed_runs: Path, scenario: str) -> None:
    uninterrupted = fa.load(resumed_runs / f"{scenario}-uninterrupted.pt", restore_rng=False)
    resumed = fa.load(resumed_runs / f"{scenario}-resumed.pt", restore_rng=False)
    assert_trees_equal(resumed.state, uninterrupted.state)  # torch.equal, bit for bit, every leaf
    assert resumed.state.step.item() == 20
    assert resumed.batches_consumed == 20
    assert fa.load(resumed_runs / f"{scenario}.pt", restore_rng=False).batches_consumed == 10
    # Where the run draws random numbers (dropout, DP noise), restoring them is what made it exact.
    unrestored = fa.load(resumed_runs / f"{scenario}-unrestored.pt", restore_rng=False).state
    if scenario in RANDOM:
        assert not torch.equal(
            unrestored.params["layer0"]["w"], resumed.state.params["layer0"]["w"]
        )
    else:
        assert_trees_equal(unrestored, resumed.state)


class Pair(NamedTuple):
    """A user's own NamedTuple, which only a template can rebuild."""

    left: Any
    right: Any


def trained(step: fa.TrainStep, steps: int = 3, seed: int = 0) -> fa.TrainState:
    torch.manual_seed(seed)
    state = step.init(mlp_params())
    for i in range(steps):
        state, _ = step(state, classification_batch(12, seed=i))
    return state


OPTIMIZERS = {
    "sgd_momentum": lambda: fa.optim.sgd(0.1, momentum=0.9, weight_decay=1e-3),
    "nesterov": lambda: fa.optim.sgd(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: fa.optim.adam(1e-2, weight_decay=1e-3),
    "adamw_schedule": lambda: fa.optim.adamw(fa.optim.cosine_decay_schedule(1e-2, 10)),
    "lion": lambda: fa.optim.lion(1e-3, weight_decay=0.1),
    "clip_then_adamw": lambda: fa.optim.chain(
        fa.optim.clip_by_global_norm(0.5),
        fa.optim.adamw(fa.optim.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10)),
    ),
    "clip_then_schedule": lambda: fa.optim.chain(
        fa.optim.clip_by_global_norm(0.5),
        fa.optim.scale_by_schedule(fa.optim.exponential_decay(-0.1, 2, 0.5)),
    ),
}
REDUCERS = {
    "mean": fa.mean,
    "clipped_mean": lambda: fa.clipped_mean(0.5),
    "adaptive": fa.adaptive,
}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_state_round_trips(tmp_path: Path, optimizer: str) -> None:
    step = fa.train_step(
        mlp_loss,
        optimizer=OPTIMIZERS[optimizer](),
        accumulation=fa.Accumulation(num_microbatches=3),
    )
    state = trained(step)
    fa.save(tmp_path / "ckpt.pt", state)
    loaded = fa.load(tmp_path / "ckpt.pt", like=step.init(mlp_params(seed=9)))
    assert_trees_equal(loaded.state, state)
    assert type(loaded.state) is fa.TrainState
    assert_trees_equal(fa.load(tmp_path / "ckpt.pt").state, state)  # funcaccum's own classes
    # The loaded state trains on exactly as the original does.
    batch = classification_batch(12, seed=7)
    assert_trees_equal(step(loaded.state, batch)[0], step(state, batch)[0])


@pytest.mark.parametrize("reducer", REDUCERS)
def test_every_reducer_carry_round_trips(tmp_path: Path, reducer: str) -> None:
    step = fa.train_step(
        mlp_loss,
        optimizer=fa.optim.adamw(1e-2),
        accumulation=fa.Accumulation(reducer=REDUCERS[reducer](), num_microbatches=3),
    )
    state = trained(step)
    if reducer == "adaptive":
        assert isinstance(state.reducer_carry, fa.extend.AdaptiveCarry)
        assert state.reducer_carry.progress.item() > 0
    fa.save(tmp_path / "ckpt.pt", state)
    assert_trees_equal(fa.load(tmp_path / "ckpt.pt", like=step.init(mlp_params())).state, state)


def nested_tree() -> dict[str, Any]:
    return {
        "pair": Pair(torch.arange(3), Pair(None, [torch.ones(2, dtype=torch.bfloat16), 1.5])),
        "ordered": OrderedDict([("b", torch.zeros(1)), ("a", (torch.tensor(True), "name", 7))]),
        3: [],
        "empty": (),
        "flag": False,
    }


def test_arbitrary_nested_trees_round_trip_into_the_template(tmp_path: Path) -> None:
    tree = nested_tree()
    fa.save(tmp_path / "tree.pt", tree)
    template = nested_tree()
    template["pair"] = Pair(torch.zeros(3, dtype=torch.int64), template["pair"].right)
    loaded = fa.load(tmp_path / "tree.pt", like=template).state
    assert optree.tree_structure(loaded) == optree.tree_structure(tree)
    for got, saved in zip(optree.tree_leaves(loaded), optree.tree_leaves(tree), strict=True):
        if isinstance(saved, torch.Tensor):
            assert got.dtype == saved.dtype
            assert torch.equal(got, saved)
        else:
            assert type(got) is type(saved)
            assert got == saved
    assert type(loaded["pair"]) is Pair
    assert type(loaded["ordered"]) is OrderedDict
    assert loaded["ordered"]["a"][1:] == ("name", 7)
    assert loaded["pair"].right.right[1] == 1.5
    assert list(loaded) == list(template)
    assert fa.load(tmp_path / "tree.pt", like=template).batches_consumed is None


def test_a_user_namedtuple_needs_a_template(tmp_path: Path) -> None:
    fa.save(tmp_path / "tree.pt", nested_tree())
    with pytest.raises(fa.FuncaccumError, match=r"Pair at state\['pair'\].*pass like="):
        fa.load(tmp_path / "tree.pt")


def test_dict_key_order_of_the_template_is_kept(tmp_path: Path) -> None:
    fa.save(tmp_path / "tree.pt", {"b": torch.ones(1), "a": torch.zeros(1)})
    loaded = fa.load(tmp_path / "tree.pt", like={"a": torch.ones(1), "b": torch.ones(1)}).state
    assert list(loaded) == ["a", "b"]
    assert loaded["b"].item() == 1.0
    assert loaded["a"].item() == 0.0


def test_batches_consumed_counts_skipped_steps(tmp_path: Path) -> None:
    step = fa.train_step(mlp_loss, optimizer=fa.optim.sgd(0.1))
    state = trained(step, steps=2)
    bad = classification_batch(12)
    bad["x"][0, 0] = float("nan")
    state, metrics = step(state, bad)
    assert bool(metrics.skipped)
    fa.save(tmp_path / "ckpt.pt", state, metadata={"epoch": 0, "note": "after a NaN"})
    loaded = fa.load(tmp_path / "ckpt.pt", like=step.init(mlp_params()))
    assert (loaded.state.step.item(), loaded.state.skipped.item()) == (2, 1)
    assert loaded.batches_consumed == 3  # the data resumes at the fourth batch
    assert loaded.metadata == {"epoch": 0, "note": "after a NaN"}


def test_metadata_round_trips_plain_values_and_tensors(tmp_path: Path) -> None:
    metadata = {"config": {"lr": 0.1, "layers": [5, 16, 3], 0: None}, "ema": torch.arange(2)}
    fa.save(tmp_path / "ckpt.pt", {"w": torch.ones(1)}, metadata=metadata)
    loaded = fa.load(tmp_path / "ckpt.pt").metadata
    assert loaded["config"] == metadata["config"]
    assert torch.equal(loaded["ema"], metadata["ema"])


def test_save_refuses_what_a_safe_load_could_not_read(tmp_path: Path) -> None:
    with pytest.raises(fa.FuncaccumError, match=r"metadata\['config'\]\['path'\] is a PosixPath"):
        fa.save(tmp_path / "a.pt", {}, metadata={"config": {"path": tmp_path}})
    with pytest.raises(fa.FuncaccumError, match=r"cannot save state\['w'\]\[1\]: .* got set"):
        fa.save(tmp_path / "b.pt", {"w": [torch.ones(1), {1, 2}]})
    with pytest.raises(
        fa.FuncaccumError, match=r"cannot save state: .*str or int, got 1.5 \(float"
    ):
        fa.save(tmp_path / "c.pt", {1.5: torch.ones(1)})
    assert not list(tmp_path.iterdir())  # nothing written, not even a partial file


def test_save_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    fa.save(path, {"w": torch.zeros(2)})
    fa.save(path, {"w": torch.ones(2)})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert torch.equal(fa.load(path).state["w"], torch.ones(2))


# A checkpoint of another configuration fails at the first path that differs.


def adamw_checkpoint(tmp_path: Path) -> Path:
    step = fa.train_step(mlp_loss, optimizer=fa.optim.adamw(1e-2))
    fa.save(tmp_path / "adamw.pt", trained(step, steps=1))
    return tmp_path / "adamw.pt"


def test_another_optimizer_fails_at_the_optimizer_state(tmp_path: Path) -> None:
    sgd = fa.train_step(mlp_loss, optimizer=fa.optim.sgd(0.1, momentum=0.9))
    with pytest.raises(fa.FuncaccumError) as error:
        fa.load(adamw_checkpoint(tmp_path), like=sgd.init(mlp_params()))
    message = str(error.value)
    assert "does not match the template (like=) at state.opt_state:" in message
    assert "(ScaleByAdamState, AddDecayedWeightsState, ScaleByLearningRateState)" in message
    assert "(TraceState, ScaleByLearningRateState)" in message


def test_a_params_tree_with_another_key_fails_at_that_dict(tmp_path: Path) -> None:
    step = fa.train_step(mlp_loss, optimizer=fa.optim.adamw(1e-2))
    params = mlp_params()
    params["head"] = params.pop("layer1")
    with pytest.raises(fa.FuncaccumError) as error:
        fa.load(adamw_checkpoint(tmp_path), like=step.init(params))
    message = str(error.value)
    assert "at state.params:" in message
    assert "only in the checkpoint: ['layer1']; only in the template: ['head']" in message


def test_another_shape_fails_at_that_leaf(tmp_path: Path) -> None:
    step = fa.train_step(mlp_loss, optimizer=fa.optim.adamw(1e-2))
    with pytest.raises(fa.FuncaccumError) as error:
        fa.load(adamw_checkpoint(tmp_path), like=step.init(mlp_params(sizes=(5, 8, 3))))
    message = str(error.value)
    assert "at state.params['layer0']['w']:" in message
    assert (
        "torch.float64 tensor of shape (5, 16), the template a torch.float64 tensor of " in message
    )
    assert "shape (5, 8)" in message


def test_another_dtype_or_reducer_fails_too(tmp_path: Path) -> None:
    path = adamw_checkpoint(tmp_path)
    step = fa.train_step(mlp_loss, optimizer=fa.optim.adamw(1e-2))
    with pytest.raises(fa.FuncaccumError, match=r"params\['layer0'\]\['w'\]: .*torch\.float32"):
        fa.load(path, like=step.init(mlp_params(dtype=torch.float32)))
    adaptive = fa.train_step(
        mlp_loss,
        optimizer=fa.optim.adamw(1e-2),
        accumulation=fa.Accumulation(reducer=fa.adaptive()),
    )
    with pytest.raises(fa.FuncaccumError, match=r"at state.reducer_carry: .*empty tuple.*Adaptive"):
        fa.load(path, like=adaptive.init(mlp_params()))


def test_a_failed_load_restores_nothing(tmp_path: Path) -> None:
    path = adamw_checkpoint(tmp_path)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    with pytest.raises(fa.FuncaccumError):
        fa.load(path, like=fa.train_step(mlp_loss, optimizer=fa.optim.sgd(0.1)).init(mlp_params()))
    assert torch.equal(torch.get_rng_state(), before)


# Loading is safe: torch.load(weights_only=True), and nothing else.


class Payload:
    """Code that would run on unpickling, were the file unpickled unsafely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.makedirs, (str(self.marker),)


def test_load_reads_with_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fa.save(tmp_path / "ckpt.pt", {"w": torch.ones(1)})
    calls: list[dict[str, Any]] = []
    original = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    fa.load(tmp_path / "ckpt.pt")
    assert len(calls) == 1
    assert calls[0]["weights_only"] is True


def test_a_file_with_an_arbitrary_class_fails_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    good = tmp_path / "good.pt"
    fa.save(good, {"w": torch.ones(1)})
    payload = torch.load(good, weights_only=True)
    payload["metadata"] = {"x": Payload(marker)}
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(fa.FuncaccumError, match=r"weights_only=True.*GLOBAL os\.makedirs"):
        fa.load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_a_pickled_train_state_is_refused_with_advice(tmp_path: Path) -> None:
    step = fa.train_step(mlp_loss, optimizer=fa.optim.sgd(0.1))
    torch.save(step.init(mlp_params()), tmp_path / "pickled.pt")
    with pytest.raises(fa.FuncaccumError, match=r"funcaccum.save.*TrainState"):
        fa.load(tmp_path / "pickled.pt")
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.pt")
    with pytest.raises(fa.FuncaccumError, match="is not a funcaccum checkpoint"):
        fa.load(tmp_path / "plain.pt")


# Random-number states.


def test_the_global_generator_is_restored_by_default(tmp_path: Path) -> None:
    torch.manual_seed(0)
    fa.save(tmp_path / "ckpt.pt", {})
    expected = torch.randn(4)
    fa.load(tmp_path / "ckpt.pt")
    assert torch.equal(torch.randn(4), expected)
    fa.load(tmp_path / "ckpt.pt", restore_rng=False)
    assert not torch.equal(torch.randn(4), expected)


def test_saving_draws_no_random_numbers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    expected = torch.randn(4)
    torch.manual_seed(0)
    fa.save(tmp_path / "ckpt.pt", {"w": torch.ones(1)})
    assert torch.equal(torch.randn(4), expected)


def test_a_user_generator_for_dp_noise_resumes_exactly(tmp_path: Path) -> None:
    noise = torch.Generator().manual_seed(0)
    step = fa.train_step(
        mlp_loss,
        optimizer=fa.optim.sgd(0.1),
        accumulation=fa.Accumulation(
            reducer=fa.clipped_mean(1.0, noise_multiplier=1.0, denominator=12, generator=noise),
            microbatch_size=1,
        ),
    )
    state = trained(step, steps=2)
    fa.save(tmp_path / "ckpt.pt", state, generators={"noise": noise})
    batch = classification_batch(12, seed=5)
    expected, _ = step(state, batch)
    noise.manual_seed(99)
    with pytest.raises(fa.FuncaccumError, match=r"generator states \['noise'\]; pass generators="):
        fa.load(tmp_path / "ckpt.pt", like=state)  # restoring the global state alone is not enough
    with pytest.raises(fa.FuncaccumError, match=r"not in the checkpoint: \['other'\]"):
        fa.load(tmp_path / "ckpt.pt", like=state, generators={"noise": noise, "other": noise})
    with pytest.raises(fa.FuncaccumError, match="not with restore_rng=False"):
        fa.load(tmp_path / "ckpt.pt", like=state, restore_rng=False, generators={"noise": noise})
    loaded = fa.load(tmp_path / "ckpt.pt", like=state, generators={"noise": noise})
    assert_trees_equal(step(loaded.state, batch)[0], expected)


def test_generators_must_be_generators(tmp_path: Path) -> None:
    with pytest.raises(fa.FuncaccumError, match=r"torch\.Generator"):
        fa.save(tmp_path / "ckpt.pt", {}, generators={"noise": 0})  # type: ignore[dict-item]


def trained_checkpoint(tmp_path: Path) -> tuple[Path, fa.TrainState, fa.TrainStep]:
    step = fa.train_step(mlp_loss, optimizer=fa.optim.adamw(0.1))
    state, _ = step(step.init(mlp_params()), classification_batch(8))
    path = tmp_path / "ckpt.pt"
    fa.save(path, state, metadata={"epoch": 12345})
    return path, state, step


def flip_byte(path: Path, record: str, offset: int = 0) -> None:
    """Flip one bit of the byte at ``offset`` in the zip entry whose name ends with ``record``."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(record))
    start = info.header_offset + 30 + int.from_bytes(data[info.header_offset + 26:][:2], "little")
    start += int.from_bytes(data[info.header_offset + 28:][:2], "little")
    data[start + offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_tensor_is_found_and_the_tensor_named(tmp_path: Path) -> None:
    """torch.load reads such a file without a word: the per-tensor checksum does not."""
    path, _, step = trained_checkpoint(tmp_path)
    flip_byte(path, "data/1")  # the second tensor saved: params['layer0']['b']
    like = step.init(mlp_params())
    with pytest.raises(fa.FuncaccumError, match=re.escape(
        f"the checkpoint {path} is corrupt: the checksum of state.params['layer0']['b'] (a "
        "torch.float64 tensor of shape (16,)) differs from the one saved"
    )):  # fmt: skip
        fa.load(path, like=like, restore_rng=False)
    payload = torch.load(path, weights_only=True)  # not vacuous: torch itself loads it
    assert payload["format"] == "funcaccum-checkpoint"


def test_a_changed_value_outside_the_tensors_fails_the_file_digest(tmp_path: Path) -> None:
    path, _, _ = trained_checkpoint(tmp_path)
    path.write_bytes(path.read_bytes().replace(b"epoch", b"epocx", 1))  # a metadata key
    with pytest.raises(fa.FuncaccumError, match="corrupt: its digest differs"):
        fa.load(path, restore_rng=False)


def test_a_truncated_checkpoint_is_named_not_an_oserror(tmp_path: Path) -> None:
    path, _, _ = trained_checkpoint(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(fa.FuncaccumError, match=re.escape(f"cannot read {path}: it is truncated")):
        fa.load(path)


def test_save_names_the_path_it_cannot_write(tmp_path: Path) -> None:
    state = {"w": torch.zeros(2)}
    with pytest.raises(fa.FuncaccumError, match=r"its directory .*nodir does not exist"):
        fa.save(tmp_path / "nodir" / "ckpt.pt", state)
    with pytest.raises(fa.FuncaccumError, match="it is a directory"):
        fa.save(tmp_path, state)
    unwritable = re.escape("cannot write the checkpoint /sys/ckpt.pt")
    with pytest.raises(fa.FuncaccumError, match=unwritable):
        fa.save("/sys/ckpt.pt", state)  # a read-only file system, even for root
    with pytest.raises(fa.FuncaccumError, match=r"path must be a str or an os.PathLike"):
        fa.save(42, state)  # type: ignore[arg-type]
    with pytest.raises(fa.FuncaccumError, match="state\\['w'\\]: it is a meta tensor"):
        fa.save(tmp_path / "meta.pt", {"w": torch.zeros(2, device="meta")})


def test_a_version_1_checkpoint_without_checksums_still_loads(tmp_path: Path) -> None:
    path, state, step = trained_checkpoint(tmp_path)
    payload = torch.load(path, weights_only=True)
    del payload["checksums"]
    payload["version"] = 1
    torch.save(payload, path)
    loaded = fa.load(path, like=step.init(mlp_params()), restore_rng=False)
    assert_trees_equal(loaded.state, state)
