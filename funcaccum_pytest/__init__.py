"""The funcaccum pytest plugin, registered through the ``pytest11`` entry point.

Installing funcaccum registers it in every pytest session of the environment,
so it is cheap to load: this is a top-level module (importing
``funcaccum.testing.plugin`` would import ``funcaccum`` and with it torch),
and it imports neither torch nor funcaccum until a test asks for one of its
fixtures. It gives every test session:

- the marker ``compile``, for tests that run ``torch.compile`` (slow on the
  CPU; deselect them with ``-m "not compile"``);
- the fixture ``fa_variant``: a test that takes it runs once per
  :func:`~funcaccum.testing.variants` entry (eager, compiled, and on CUDA
  when present), the compiled ones marked ``compile``;
- the fixture ``fa_rng``: a :class:`torch.Generator` seeded from the test's
  name, and ``torch.manual_seed`` set from the same seed, so every test
  draws the same numbers on every run, whatever runs before it.

With plugin autoloading off (``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1``), load it
by name: ``pytest -p funcaccum_pytest``, or ``pytest_plugins =
["funcaccum_pytest"]`` in a top-level ``conftest.py``.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # annotations only: torch and funcaccum load when a fixture runs
    import torch

    from funcaccum.testing import Variant

__all__ = ["fa_rng", "fa_variant", "pytest_configure", "pytest_generate_tests"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "compile: a test that runs torch.compile (slow on the CPU; deselect with -m 'not compile')",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "fa_variant" in metafunc.fixturenames:
        from funcaccum.testing import variants

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
        import torch

        torch._dynamo.reset()  # each test compiles afresh, under its own cache budget
    return variant


@pytest.fixture
def fa_rng(request: pytest.FixtureRequest) -> torch.Generator:
    """A generator seeded from the test's node id; the global seed is set too."""
    import torch

    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
