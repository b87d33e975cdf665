"""Every public name has a runnable example: a doctest in its own docstring, or docs code.

A name counts as having an example when its own docstring (for a class, the
class docstring) holds a ``>>>`` example, which ``--doctest-modules`` runs; or
when a ```python block of README.md or docs/*.md, which tests/test_docs.py
runs, uses it, bare or as ``module.name`` (a method of the same name does not
count). NamedTuple states and results are met as values, so for them a use in
another public name's doctest counts too: said here explicitly.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import ModuleType

import pytest
from conftest import PUBLIC_MODULES

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
DOCTEST = re.compile(r"^\s*(?:>>>|\.\.\.) ?(.*)$", re.MULTILINE)


def _docs_code() -> str:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n".join(block for p in pages if p.exists() for block in BLOCK.findall(p.read_text()))


def _doctest_code(module: ModuleType) -> str:
    """The ``>>>`` lines of every docstring of the public names of ``module``."""
    code = []
    for name in module.__all__:
        doc = getattr(getattr(module, name), "__doc__", None) or ""
        code.extend(DOCTEST.findall(doc))
    return "\n".join(code)


def _uses(code: str, name: str) -> bool:
    """``name`` used in ``code``: bare (imported by name) or through a module alias.

    A method of the same name (``reducer.merge``) does not count.
    """
    code = re.sub(r"#.*", "", code)  # comments are not uses
    alias = r"\b(?:fa|funcaccum|optim|testing|distributed|tree|extend|privacy)\."
    pattern = rf"(?:(?<![\w.])|{alias}){re.escape(name)}(?!\w)"
    return re.search(pattern, code) is not None


def _is_state_type(obj: object) -> bool:
    """A NamedTuple (a state, a result): met as a value, not called."""
    return isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")


MODULE_OBJECTS = [importlib.import_module(name) for name in PUBLIC_MODULES]


@pytest.mark.parametrize("module", MODULE_OBJECTS, ids=lambda m: m.__name__)
def test_every_public_name_has_a_runnable_example(module: ModuleType) -> None:
    docs_code = _docs_code()
    all_doctests = "\n".join(_doctest_code(m) for m in MODULE_OBJECTS)
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        if isinstance(obj, ModuleType):  # a submodule: its own names are checked
            continue
        if ">>>" in (getattr(obj, "__doc__", None) or ""):  # its own example
            continue
        if _uses(docs_code, name):
            continue
        if _is_state_type(obj) and _uses(all_doctests, name):
            continue
        missing.append(name)
    assert not missing, f"{module.__name__}: no runnable example for {missing}"

