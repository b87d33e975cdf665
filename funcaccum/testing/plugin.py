"""The funcaccum pytest plugin, registered through the ``pytest11`` entry point.

It gives every test session:

- the marker ``compile``, for tests that run ``torch.compile`` (slow on the
  CPU; deselect them with ``-m "not compile"``);
- the fixture ``fa_variant``: a test that takes it runs once per
  :func:`~funcaccum.testing.variants` entry (eager, compiled, and on CUDA
  when present), the compiled ones marked ``compile``;
- the fixture ``fa_rng``: a :class:`torch.Generator` seeded from the test's
  name, and ``torch.manual_seed`` set from the same seed, so every test
  draws the same numbers on every run, whatever runs before it.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from ._variants import Variant, variants

__all__ = ["fa_rng", "fa_variant", "pytest_configure", "pytest_generate_tests"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "compile: a test that runs torch.compile (slow on the CPU; deselect with -m 'not compile')",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "fa_variant" in metafunc.fixturenames:
        metafunc.parametrize(
            "fa_variant",
            [
                pytest.param(v, id=v.name, marks=[pytest.mark.compile] if v.compiled else [])
                for v in variants()
            ],
        )


@pytest.fixture
def fa_variant(request: pytest.FixtureRequest) -> Variant:
    """The variant this run of the test uses (parametrized by the plugin)."""
    variant = request.param
    if variant.compiled:
        torch._dynamo.reset()  # each test compiles afresh, under its own cache budget
    return variant


@pytest.fixture
def fa_rng(request: pytest.FixtureRequest) -> torch.Generator:
    """A generator seeded from the test's node id; the global seed is set too."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
