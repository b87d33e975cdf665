"""The ``models`` extra beside torch's CPU build: torchvision's C++ operators it cannot load.

PyPI's Linux torchvision wheel is built against torch's CUDA build
(``libtorch_cuda.so``). Beside the CPU build, which PyPI serves on this
project's machines and CI, its ``_C`` extension does not load. torchvision
tolerates that, except that 0.28 then registers a fake kernel for the
``torchvision::nms`` operator without checking it exists, so ``import
torchvision`` fails with "operator torchvision::nms does not exist", and so
do ``import timm`` and every Hugging Face model class (transformers imports
torchvision when it is installed).

Importing funcaccum installs an import hook that runs once, when torchvision
is first imported: if its ``_C`` extension is there but cannot load, it
declares the two operator schemas torchvision registers unconditionally, and
the import goes through. Nothing else changes: torchvision's ops that need
``_C`` (``nms``, ``roi_align``, ...) still raise torchvision's own "Couldn't
load custom C++ ops"; the models need none of them. Where ``_C`` loads (a
torchvision built for this torch, such as PyTorch's CPU wheels), or
torchvision is absent or already imported, the hook does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["install"]

# Kept alive for the process: dropping the library would remove the declarations.
_declared: list[torch.library.Library] = []


def _declare_ops_torchvision_cannot_load() -> None:
    """Declare ``torchvision::nms`` and ``qnms`` where torchvision's ``_C`` cannot load."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    package = Path(next(iter(spec.submodule_search_locations)))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        extension = package / f"_C{suffix}"
        if extension.exists():
            try:
                torch.ops.load_library(str(extension))
            except (OSError, RuntimeError):
                break
            return  # the ops are there: torchvision imports as it is
    else:
        return  # no extension at all: not the wheel this is about
    library = torch.library.Library("torchvision", "FRAGMENT")
    for name in ("nms", "qnms"):
        library.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _declared.append(library)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs the declaration once, as torchvision is first imported; finds nothing itself."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            _declare_ops_torchvision_cannot_load()
        return None


def install() -> None:
    """Install the hook, unless torchvision is imported already or the hook is there."""
    if "torchvision" in sys.modules or any(
        isinstance(finder, _BeforeTorchvision) for finder in sys.meta_path
    ):
        return
    sys.meta_path.insert(0, _BeforeTorchvision())
