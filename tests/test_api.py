"""The public surface: every module has __all__, and docs/api.md names every public name."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

from conftest import PUBLIC_MODULES

import funcaccum

ROOT = Path(__file__).resolve().parent.parent


def test_every_module_declares_all() -> None:
    for info in pkgutil.walk_packages(funcaccum.__path__, "funcaccum."):
        module = importlib.import_module(info.name)
        assert hasattr(module, "__all__"), f"{info.name} has no __all__"
        for name in module.__all__:
            assert hasattr(module, name), f"{info.name}.__all__ names {name}, which it lacks"


def test_docs_api_names_every_public_name() -> None:
    page = (ROOT / "docs" / "api.md").read_text()
    documented = {part for name in re.findall(r"`([\w.]+)", page) for part in name.split(".")}
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        missing = sorted(set(module.__all__) - documented)
        assert not missing, f"docs/api.md does not name {module_name}.{missing}"
