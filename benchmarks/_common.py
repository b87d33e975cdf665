"""Shared helpers for the benchmarks: timing, peak memory, the environment, tables."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

__all__ = [
    "ROOT",
    "alternating_medians_ms",
    "environment",
    "peak_memory",
    "print_table",
    "run_worker",
    "synchronize",
    "time_to_first_call",
    "timed_median_ms",
    "write_results",
]

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the benchmarks import recipes.models
    sys.path.insert(0, str(ROOT))


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_median_ms(
    fn: Callable[[], Any], *, device: str = "cpu", warmup: int = 3, repeat: int = 20
) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def alternating_medians_ms(
    calls: dict[str, Callable[[], Any]],
    *,
    device: str = "cpu",
    rounds: int = 5,
    repeat: int = 20,
) -> dict[str, float]:
    """Each call's median ms over ``rounds`` rounds that time every call in turn.

    Alternating the sides spreads a noisy machine's drift over all of them,
    so their ratio means more than two back-to-back timings would.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(timed_median_ms(call, device=device, repeat=repeat))
    return {name: statistics.median(values) for name, values in times.items()}


def time_to_first_call(fn: Callable[[], Any], device: str = "cpu") -> float:
    """Seconds for the first call (compilation included)."""
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _rss_high_water_kib() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
    return rss, hwm


@contextmanager
def peak_memory(device: str) -> Iterator[dict[str, float]]:
    """Peak memory the block adds over what was allocated before it, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the process's resident-set
    high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) minus
    the resident set before the block. This follows tensor memory only when
    large allocations are mmapped and returned on free, which
    :func:`run_worker` arranges by pinning glibc's ``MALLOC_MMAP_THRESHOLD_``
    (glibc otherwise raises the threshold after frees and keeps memory resident).
    """
    result: dict[str, float] = {}
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result["mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        return
    Path("/proc/self/clear_refs").write_text("5")
    before, _ = _rss_high_water_kib()
    yield result
    _, high = _rss_high_water_kib()
    result["mib"] = (high - before) / 1024


def environment(device: str) -> dict[str, str]:
    """What a reader needs to rerun a measurement: versions, device, threads."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else platform.processor() or "cpu",
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
    }
    if device == "cpu":
        model = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        info["device"] = model.group(1).strip() if model else info["device"]
    return info


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if column != columns[0] else "left")
    for row in rows:
        table.add_row(*[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row])
    Console().print(table)


def write_results(name: str, results: dict[str, Any]) -> None:
    """Save a benchmark's results (environment and command included) as results/NAME.json."""
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path.relative_to(ROOT)}")


def run_worker(
    script: str, config: dict[str, Any], timeout: float = 900, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``script --worker CONFIG`` in a fresh process; its last stdout line is a JSON result.

    A fresh process per configuration keeps compile caches and memory peaks apart;
    ``env`` adds variables (a compile cache directory, say).
    """
    # A fixed mmap threshold makes every allocation over 64 KiB an mmap returned on free,
    # so the resident set follows live tensors (see peak_memory).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", **(env or {})}
    completed = subprocess.run(
        [sys.executable, script, "--worker", json.dumps(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"worker {config} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])
