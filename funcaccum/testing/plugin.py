"""The funcaccum pytest plugin, registered through the ``pytest11`` entry point."""

from __future__ import annotations

import pytest

__all__ = ["pytest_configure"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "compile: a test that runs torch.compile (slow on the CPU; deselect with -m 'not compile')",
    )
