"""The public surface: every module has __all__, and docs/api.md names every public name."""

from __future__ import annotations

import ast
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


def test_the_top_level_is_small_enough_to_hold_in_ones_head() -> None:
    """What a user trains with; the protocols for writing strategies live in funcaccum.extend."""
    assert len(funcaccum.__all__) <= 35, sorted(funcaccum.__all__)
    for name in ("Folder", "Reducer", "Strategy", "FoldState", "Control", "Maximum"):
        assert name not in funcaccum.__all__
        assert name in funcaccum.extend.__all__


def _package_imports() -> dict[str, set[str]]:
    """Each module of funcaccum and the funcaccum modules it imports, type-only imports included."""
    package = ROOT / "funcaccum"
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        base = name.split(".") if is_package else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                anchor = base[: len(base) - node.level + 1] if node.level else []
                target = ".".join([*anchor, *(node.module or "").split(".")]).strip(".")
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in modules else target)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_the_package_has_no_import_cycle() -> None:
    """Imports run one way (type-only ones count too); a package's __init__ may import down."""
    graph = _package_imports()
    assert "funcaccum._fold" in graph["funcaccum._folder"]  # the walk sees relative imports
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = [*path[path.index(target) :], target] if target in path else [target]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
