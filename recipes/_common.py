"""What every recipe shares: flags, the device, progress, metrics files, the summary table."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import funcaccum as fa

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python recipes/NAME.py` puts recipes/ on the path, not the root
    sys.path.insert(0, str(ROOT))

__all__ = ["Recipe", "add_step_flags", "parser", "pick_device", "strategy"]


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every recipe takes; each adds its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--metrics", type=Path, help="write per-step metrics here, one JSON object a line"
    )
    p.add_argument("--summary", type=Path, help="write the summary table here as JSON")
    p.add_argument("--smoke", action="store_true", help="a tiny run, to check the recipe works")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def add_step_flags(
    p: argparse.ArgumentParser, *, strategy: bool = True, compile_by_default: bool = False
) -> None:
    """``--strategy`` (unless the recipe has no choice) and ``--compile`` / ``--no-compile``."""
    if strategy:
        p.add_argument(
            "--strategy",
            default="scan",
            choices=["scan", "vmap", "chunked"],
            help="how microbatches are folded (chunked: 2 at a time)",
        )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=compile_by_default,
        help="torch.compile(fullgraph=True) the step",
    )


def strategy(args: argparse.Namespace) -> fa.extend.Strategy | str:
    """The accumulation's ``strategy`` from ``--strategy`` (``chunked``: chunks of 2)."""
    return fa.chunked(2) if args.strategy == "chunked" else args.strategy


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda, got {name!r}")
    return torch.device(name)


def start_distributed(device_name: str, timeout: float) -> torch.device:
    """This torchrun process's device, with the process group started on it (NCCL or gloo)."""
    import datetime
    import os

    import torch.distributed as dist

    device = pick_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        timeout=datetime.timedelta(seconds=timeout),
    )
    return device


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


class Recipe:
    """Progress bar, metrics log and summary table for one recipe run."""

    def __init__(self, title: str, args: argparse.Namespace, *, show: bool = True) -> None:
        self.title, self.args, self.show = title, args, show
        # Not a terminal (a pipe, a CI log): wide enough that tables do not wrap.
        self.console = Console(width=None if sys.stdout.isatty() else 120)
        self._metrics_file: TextIO | None = None
        self.started = time.perf_counter()
        torch.manual_seed(args.seed)

    def log(self, **metrics: Any) -> None:
        """Append one line of metrics (tensors become numbers) to ``--metrics``."""
        if self.args.metrics is None:
            return
        if self._metrics_file is None:
            self.args.metrics.parent.mkdir(parents=True, exist_ok=True)
            self._metrics_file = self.args.metrics.open("w")
        self._metrics_file.write(json.dumps({k: _plain(v) for k, v in metrics.items()}) + "\n")

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[Any]:
        """A progress bar over ``total`` steps; ``update(loss=...)`` shows the live loss."""
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
        ]
        with Progress(
            *columns, console=self.console, disable=self.args.quiet, transient=False
        ) as bar:
            task = bar.add_task(description, total=total, loss="-")

            def advance(**fields: Any) -> None:
                shown = {k: f"{_plain(v):.4f}" for k, v in fields.items()}
                bar.update(task, advance=1, **shown)

            yield advance

    def summary(
        self, columns: Sequence[str], rows: Sequence[Sequence[Any]], notes: Sequence[str] = ()
    ) -> None:
        """Print the summary table and write it to ``--summary`` as JSON."""
        table = Table(title=self.title)
        for i, column in enumerate(columns):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*[_format(v) for v in row])
        if self.show:
            self.console.print(table)
            for note in notes:
                self.console.print(note)
        if self.args.summary is not None:
            self.args.summary.parent.mkdir(parents=True, exist_ok=True)
            self.args.summary.write_text(
                json.dumps(
                    {
                        "title": self.title,
                        "columns": list(columns),
                        "rows": [[_plain(v) for v in row] for row in rows],
                        "notes": list(notes),
                        "seconds": time.perf_counter() - self.started,
                    },
                    indent=1,
                )
            )
        if self._metrics_file is not None:
            self._metrics_file.close()


def _format(value: Any) -> str:
    value = _plain(value)
    if isinstance(value, float):
        return (
            f"{value:.3e}" if value and (abs(value) < 1e-3 or abs(value) >= 1e5) else f"{value:.4f}"
        )
    return str(value)
