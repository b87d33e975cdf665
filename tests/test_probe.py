"""The adversarial probe as a table: every bad input is refused clearly, every odd one works.

``tests/probe.py`` holds 305 cases across checkpoints, strategies, model state, schedules,
batches, weights, dtypes, the epoch loop, the testing toolkit, data-parallel ranks and
privacy; ``python tests/probe.py`` prints how each one fares. Here each must be ``clear``:
a ``FuncaccumError`` that names the thing (the words the case lists), or, for an input
that should work, the right answer. Before issue 23, 110 of the first 270 were;
docs/pitfalls.md (14, "Bad input accepted with a wrong answer") has the counts.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist
from probe import CASES, Case, run_case

IN_PROCESS = [pytest.param(case, id=f"{case.group}/{case.name}") for case in CASES
              if not case.isolated]  # fmt: skip
RANK_MARKS = [
    pytest.mark.distributed,
    pytest.mark.subprocess,
    pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed"),
]
RANKS = [
    pytest.param(case, id=f"{case.group}/{case.name}", marks=RANK_MARKS)
    for case in CASES
    if case.isolated
]


@pytest.mark.parametrize("case", IN_PROCESS)
def test_a_bad_input_is_refused_clearly_or_works(case: Case) -> None:
    outcome, detail = run_case(case)
    assert outcome == "clear", f"{case.group}/{case.name}: {outcome}: {detail}"


@pytest.mark.parametrize("case", RANKS)
def test_ranks_built_differently_are_refused_at_init(case: Case) -> None:
    """Two gloo processes, rank 1 built otherwise: both raise naming what differs, no abort."""
    outcome, detail = run_case(case)
    assert outcome == "clear", f"{case.group}/{case.name}: {outcome}: {detail}"


def test_the_probe_covers_every_kind_of_input() -> None:
    groups = {case.group for case in CASES}
    assert groups >= {"checkpoint", "strategy", "model_state", "schedule", "batch", "weight",
                      "dtype", "epoch", "toolkit", "state", "rank", "privacy"}  # fmt: skip
    assert len(CASES) >= 200
    assert len({(case.group, case.name) for case in CASES}) == len(CASES)  # no duplicate ids
