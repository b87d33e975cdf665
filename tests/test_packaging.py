"""Packaging: one version, the license, and extras that cover what the benchmarks import."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

import funcaccum

ROOT = Path(__file__).resolve().parent.parent


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_version_has_one_source() -> None:
    project = pyproject()
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "funcaccum.__version__"}
    assert importlib.metadata.version("funcaccum") == funcaccum.__version__


def test_the_license_is_apache_2() -> None:
    project = pyproject()
    assert project["project"]["license"] == "Apache-2.0"
    assert project["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0")
    assert "END OF TERMS AND CONDITIONS" in text


def test_the_bench_extra_covers_what_the_benchmarks_import() -> None:
    project = pyproject()
    extras = project["project"]["optional-dependencies"]
    bench = requirement_names(extras["bench"])
    for extra in re.findall(r"funcaccum\[(\w+)\]", " ".join(extras["bench"])):
        bench |= requirement_names(extras[extra])
    provided = requirement_names(project["project"]["dependencies"]) | bench
    local = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} | {"funcaccum", "recipes"}
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in local:
                    continue
                assert top in provided, f"{script.name} imports {top}, which no extra installs"
