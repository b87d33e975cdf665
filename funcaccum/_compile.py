"""How much of a step is compiled: one value, and the one place that asks whether code is traced."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal, TypeVar

import torch

from ._errors import FuncaccumError

__all__ = ["Compile", "CompileMode", "check_compile", "compiled", "traced"]

CompileMode = Literal["loss", "loss+update", "step"]
"""What a step compiles, each piece one ``fullgraph`` graph with static shapes:

- ``"loss"``: each microbatch's forward and backward (the vmapped chunk under
  ``vmap()``/``chunked()``), as ``torch.compile(model)`` compiles a
  hand-written loop's model; the microbatch loop, the fold and the update run
  eagerly. Quick to compile, cached across processes.
- ``"loss+update"``: also the fold into the accumulator and the update
  (finalize, norm, update rule, guard), each one graph.
- ``"step"``: the whole step, one graph, the microbatch loop traced once as a
  ``scan``: the fastest step on small models, the slowest to compile.
"""

Compile = bool | CompileMode
"""``False`` (eager), ``True`` (the same as ``"loss"``), or a :data:`CompileMode`."""

_MODES: tuple[CompileMode, ...] = ("loss", "loss+update", "step")

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
    so it is traced into that graph rather than compiled apart.
    """
    if not enabled:
        return fn
    graph = torch.compile(fn, fullgraph=True, dynamic=False)

    @functools.wraps(fn)
    def call(*args: object, **kwargs: object) -> object:
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        return graph(*args, **kwargs)

    return call  # type: ignore[return-value]
