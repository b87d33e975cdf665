"""How much of a step is compiled: one value, and the one place that asks whether code is traced."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Literal, TypeVar

import torch

from ._errors import FuncaccumError

__all__ = [
    "Compile",
    "CompileMode",
    "check_compile",
    "compile_regions",
    "compiled",
    "deterministic_on_cpu",
    "regions_wanted",
    "traced",
]

# Set while a step that compiles regions runs its loss: functional_model's apply reads it.
_regions = threading.local()

CompileMode = Literal["loss", "loss+update", "step", "regions"]
"""What a step compiles, each piece one ``fullgraph`` graph with static shapes:

- ``"loss"``: each microbatch's forward and backward (the vmapped chunk under
  ``vmap()``/``chunked()``), as ``torch.compile(model)`` compiles a
  hand-written loop's model; the microbatch loop, the fold and the update run
  eagerly. Quick to compile, cached across processes.
- ``"loss+update"``: also the fold into the accumulator and the update
  (finalize, norm, update rule, guard), each one graph.
- ``"step"``: the whole step, one graph, the microbatch loop traced once as a
  ``scan``: the fastest step on small models, the slowest to compile.
- ``"regions"``: the repeated blocks of every module the loss runs through
  :func:`~funcaccum.functional_model` (the children of an ``nn.ModuleList``
  that share a class, such as a transformer's layers), each block's graph
  compiled once and reused by its siblings, forward and backward; the rest
  runs eagerly. Compile time stays flat as the model deepens.
"""

Compile = bool | CompileMode
"""``False`` (eager), ``True`` (the same as ``"loss"``), or a :data:`CompileMode`."""

_MODES: tuple[CompileMode, ...] = ("loss", "loss+update", "step", "regions")

F = TypeVar("F", bound=Callable[..., object])


def check_compile(compile: object) -> CompileMode | None:
    """The :data:`CompileMode` ``compile`` names, or None for eager; refuse anything else."""
    if compile is False:
        return None
    if compile is True:
        return "loss"
    if compile in _MODES:
        return compile
    raise FuncaccumError(
        f"compile must be False, True (= 'loss') or one of {_MODES}, got {compile!r}"
    )


class compile_regions:  # noqa: N801  (a context manager, named as one is used)
    """Inside, a module run by ``functional_model``'s ``apply`` runs its repeated blocks compiled.

    ``compile="regions"`` enters it around each microbatch's forward and
    backward, so the blocks of every ``functional_model`` the loss calls are
    compiled once (a block's graph is reused by its siblings) and the rest of
    the loss runs eagerly: compile time flat in depth.
    """

    __slots__ = ("before",)

    def __enter__(self) -> None:
        self.before = getattr(_regions, "on", False)
        _regions.on = True

    def __exit__(self, *exc: object) -> None:
        _regions.on = self.before


def regions_wanted() -> bool:
    """Whether the caller runs inside :class:`compile_regions` (and eagerly)."""
    return getattr(_regions, "on", False) and not torch.compiler.is_compiling()


def traced() -> bool:
    """Whether the caller runs inside a trace: ``torch.compile`` or a ``torch.func`` transform.

    Plain autograd, forward hooks and Python loops over a group need eager
    tensors; under a trace a strategy's pieces switch to ``torch.func`` and
    the ``scan`` op. This is the one question funcaccum asks about its mode.
    """
    # Dynamo folds is_compiling() to True, so it never sees the functorch query after it.
    return torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is not None


def compiled(fn: F, enabled: bool = True) -> F:
    """``fn`` compiled as funcaccum compiles (one whole graph, static shapes), or ``fn``.

    Inside a caller's own trace (a step compiled whole) the plain ``fn`` runs,
    so it is traced into that graph rather than compiled apart. On the CPU the
    graph is compiled and run under torch's deterministic algorithms, so two
    runs are bit-identical (see :func:`deterministic_on_cpu`).
    """
    if not enabled:
        return fn
    graph = torch.compile(fn, fullgraph=True, dynamic=False)

    @functools.wraps(fn)
    def call(*args: object, **kwargs: object) -> object:
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        with deterministic_on_cpu(args):
            return graph(*args, **kwargs)

    return call  # type: ignore[return-value]


class deterministic_on_cpu:  # noqa: N801  (a context manager, named as one is used)
    """torch's deterministic algorithms on while a compiled piece runs on CPU tensors.

    Inductor's CPU kernels sum scattered values (an embedding's gradient, an
    ``index_put`` with ``accumulate=True``) with atomic adds across threads,
    in an order that changes from run to run; with deterministic algorithms
    enabled when a graph is lowered it calls the serial ATen kernel instead,
    and two runs of a compiled step are bit-identical. The setting is torch's
    own global one (in its warning mode: an op with no deterministic kernel
    warns rather than stops the step), restored on exit. On CUDA funcaccum
    leaves it to the user (it needs ``CUBLAS_WORKSPACE_CONFIG`` set before
    CUDA starts, and costs more there): ``torch.use_deterministic_algorithms(True)``
    applies as usual.
    """

    __slots__ = ("args", "before")

    def __init__(self, args: tuple[object, ...]) -> None:
        self.args = args

    def __enter__(self) -> None:
        self.before: tuple[bool, bool] | None = None
        first = _first_tensor(self.args)
        if first is not None and first.device.type == "cpu":
            self.before = (
                torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
            )
            torch.use_deterministic_algorithms(True, warn_only=True)

    def __exit__(self, *exc: object) -> None:
        if self.before is not None:
            torch.use_deterministic_algorithms(self.before[0], warn_only=self.before[1])


def _first_tensor(tree: object) -> torch.Tensor | None:
    """The first tensor in nested tuples, lists and dicts, found without flattening them all."""
    if isinstance(tree, torch.Tensor):
        return tree
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, tuple | list):
        for child in tree:
            found = _first_tensor(child)
            if found is not None:
                return found
    return None
