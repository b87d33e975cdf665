"""Each recipe runs to completion at a tiny size, and its numbers are checked from its summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.recipe, pytest.mark.subprocess]


def run_recipe(
    name: str, tmp_path: Path, *flags: str, launcher: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Run ``python [LAUNCHER] recipes/NAME.py --smoke``; return its summary table, as JSON."""
    summary, metrics = tmp_path / "summary.json", tmp_path / "metrics.jsonl"
    completed = subprocess.run(
        [
            sys.executable,
            *launcher,
            str(ROOT / "recipes" / f"{name}.py"),
            "--smoke",
            "--quiet",
            "--summary",
            str(summary),
            "--metrics",
            str(metrics),
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("┃") > 2, "the rich summary table was not printed"
    result = json.loads(summary.read_text())
    result["stdout"] = completed.stdout
    result["metrics"] = [json.loads(line) for line in metrics.read_text().splitlines()]
    result["by_name"] = {
        row[0]: dict(zip(result["columns"], row, strict=True)) for row in result["rows"]
    }
    return result


def test_emulate_large_batch_matches_batch_128_and_every_mistake_deviates(tmp_path: Path) -> None:
    result = run_recipe("emulate_large_batch", tmp_path)
    rows = result["by_name"]
    assert rows["funcaccum 4 x 32"]["max param deviation"] < 1e-5
    assert rows["funcaccum 4 x 32"]["max gradient error"] < 1e-5
    for mistake in ("no normalisation", "zero_grad every microbatch", "no zero_grad after step"):
        assert rows[mistake]["max param deviation"] > 1e-3
        assert rows[mistake]["max gradient error"] > 1e-3
    assert rows["no normalisation"]["max gradient error"] == pytest.approx(3.0, rel=1e-4)  # K - 1
    assert rows["zero_grad every microbatch"]["max gradient error"] == pytest.approx(1.0)
    assert len(result["metrics"]) == 12


def test_minibatch_modes_report_the_epoch_mean_not_the_last_batch(tmp_path: Path) -> None:
    result = run_recipe("minibatch_modes", tmp_path)
    rows = result["by_name"]
    assert set(rows) == {"batch", "stochastic", "mini-batch", "accumulated"}
    assert rows["batch"]["steps"] == 2  # one step per epoch, two epochs
    assert rows["stochastic"]["steps"] == 300
    assert rows["mini-batch"]["steps"] == 2 * 5  # 150 = 4 * 32 + 22: a partial last batch
    assert rows["accumulated"]["steps"] == 2 * 2  # 150 = 128 + 22
    last_epoch = [m for m in result["metrics"] if m["mode"] == "mini-batch"][-1]
    # The articles print the last (partial, 22-example) batch's loss; it is not the epoch's mean.
    assert last_epoch["epoch_mean_loss"] != pytest.approx(last_epoch["last_batch_loss"], rel=1e-3)
    assert rows["stochastic"]["final full loss"] < rows["batch"]["final full loss"]


@pytest.mark.parametrize("reducer", ["mean", "clipped", "adaptive"])
def test_small_dataset_uses_every_example(tmp_path: Path, reducer: str) -> None:
    result = run_recipe("small_dataset", tmp_path, "--reducer", reducer, "--data", "synthetic")
    assert [row[0].split(" (")[0] for row in result["rows"]] == [
        "final params",
        "EMA of params",
        "best by validation",
    ]
    assert all(0 <= row[2] <= 1 for row in result["rows"])
    assert "funcaccum used 240 of 240" in result["notes"][1]  # 300 examples, 4/5 for training
    per_step = [m["weight"] for m in result["metrics"]]
    assert sum(per_step) == 2 * 240  # two epochs, every example once each
    if reducer == "clipped":
        assert all(0 <= m["clip_fraction"] <= 1 for m in result["metrics"])
    if reducer == "adaptive":
        assert all("step_scale" in m for m in result["metrics"])


@pytest.mark.compile
def test_char_lm_compiles_and_weights_tokens(tmp_path: Path) -> None:
    result = run_recipe("char_lm", tmp_path)
    rows = {row[0]: row[1] for row in result["rows"]}
    assert rows["tokens per second"] > 0
    assert 0 < rows["padding fraction of the corpus"] < 1
    tokens = [m["tokens"] for m in result["metrics"]]
    assert len(set(tokens)) > 1  # each batch holds its own number of real tokens
    assert all(t <= 64 * 32 for t in tokens)


def test_dp_sgd_reports_epsilon_as_opacus_and_accuracy_beside_non_private(
    tmp_path: Path,
) -> None:
    pytest.importorskip("dp_accounting", reason="the recipe's accounting needs dp-accounting")
    pytest.importorskip("sklearn", reason="the recipe's data is scikit-learn's digits")
    opacus = pytest.importorskip("opacus", reason="the comparison needs Opacus (the dev extra)")
    result = run_recipe("dp_sgd", tmp_path)
    rows = result["by_name"]
    assert set(rows) == {"non-private", *(f"DP, target epsilon {t}" for t in (1, 3, 8))}
    for target in (1, 3, 8):
        row = rows[f"DP, target epsilon {target}"]
        assert row["steps"] == rows["non-private"]["steps"] == 10  # 2 epochs of 5 steps
        assert target - 1e-3 <= row["epsilon (RDP)"] <= target  # calibrated, never above
        assert row["epsilon (PLD)"] < row["epsilon (RDP)"]  # PLD is the tighter
        assert 0 < row["test accuracy"] <= 1
        # The same (q, sigma, steps) in Opacus's RDP accountant: equal at a large best order (for
        # epsilon 1); at a small fractional order dp-accounting's series bound is the looser.
        difference = row["ours - Opacus RDP"]
        assert 0 - 1e-6 <= difference <= 5e-3 * target, (opacus.__version__, difference)
    assert abs(rows["DP, target epsilon 1"]["ours - Opacus RDP"]) < 1e-6
    assert 0 < rows["non-private"]["test accuracy"] <= 1
    epsilons = [m["epsilon"] for m in result["metrics"] if m["run"] == "epsilon 1"]
    assert len(epsilons) == 2
    assert 0 < epsilons[0] < epsilons[1]  # spent epoch by epoch, from the ledger


def torchrun() -> tuple[str, ...]:
    """``python -m torch.distributed.run`` for 2 processes on a free local port."""
    return ("-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", free_port())  # fmt: skip


def test_data_parallel_under_torchrun(tmp_path: Path) -> None:
    result = run_recipe("data_parallel", tmp_path, launcher=torchrun())
    assert result["stdout"].count("Data parallel on 2 processes") == 1  # rank 0 alone prints
    rows = {row[0]: row[1] for row in result["rows"]}
    assert rows["all-reduces per step"] == 1
    assert rows["params bit-identical on every rank"] is True
    assert rows["examples per step"] == 64


def test_sharded_under_torchrun_holds_half_of_data_parallel_on_each_rank(tmp_path: Path) -> None:
    result = run_recipe("sharded", tmp_path, "--sync", "step", launcher=torchrun())
    assert result["stdout"].count("FSDP2 on 2 processes") == 1  # rank 0 alone prints
    rows = {row[0]: row[1] for row in result["rows"]}
    assert rows["optimizer steps"] == 4
    assert rows["replicated values equal on every rank"] is True
    assert rows["final loss (global batch)"] < rows["first loss"]
    for what in ("params", "optimizer state"):
        replicated = rows[f"{what}: DataParallel bytes per rank"]
        shards = [rows[f"{what}: sharded bytes, rank {r}"] for r in range(2)]
        scalars = (
            0 if what == "params" else replicated - 2 * rows["params: DataParallel bytes per rank"]
        )
        assert [s - scalars for s in shards] == [(replicated - scalars) // 2] * 2
    assert len(result["metrics"]) == 4


def test_resnet_bn_trains_as_the_seeds_loop(tmp_path: Path) -> None:
    result = run_recipe("resnet_bn", tmp_path)
    rows = result["by_name"]
    ours = rows["funcaccum 4 x 16"]
    assert ours["max param deviation"] < 1e-10
    assert ours["max running-stat deviation"] < 1e-10
    assert ours["eval accuracy"] == pytest.approx(rows["hand-written loop"]["eval accuracy"])
    assert len(result["metrics"]) == 6
