"""Running one test eagerly, compiled and on CUDA, and catching recompiles."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from .._compile import compiled
from .._tree import PyTree

__all__ = ["Variant", "assert_max_compiles", "variants"]


class Variant(NamedTuple):
    """One way to run a function under test: eagerly or compiled, on a device.

    Call it on a function to get that function as this variant runs it, and
    use :meth:`to` to put the inputs on its device.

    Attributes:
        name: ``"eager"``, ``"compiled"``, ``"cuda"`` or ``"cuda-compiled"``.
        device: where the inputs go.
        compiled: whether the function runs compiled as funcaccum compiles
            (``torch.compile(fullgraph=True, dynamic=False)``).
    """

    name: str
    device: torch.device
    compiled: bool

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return compiled(fn, self.compiled)

    def to(self, tree: PyTree) -> PyTree:
        """Every tensor of ``tree`` moved to this variant's device."""
        return optree.tree_map(
            lambda x: x.to(self.device) if isinstance(x, torch.Tensor) else x, tree
        )


def variants(*, compiled: bool = True, cuda: bool | None = None) -> list[Variant]:
    """The variants to run a test under: eager on the CPU, compiled, and on CUDA when present.

    Args:
        compiled: include the compiled variants.
        cuda: include CUDA variants; None: when CUDA is available.

    Example:
        >>> [v.name for v in variants(cuda=False)]
        ['eager', 'compiled']
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    devices = [("", torch.device("cpu"))] + ([("cuda", torch.device("cuda"))] if cuda else [])
    found = []
    for prefix, device in devices:
        found.append(Variant(prefix or "eager", device, False))
        if compiled:
            found.append(Variant(f"{prefix}-compiled" if prefix else "compiled", device, True))
    return found


def assert_max_compiles(
    fn: Callable[..., Any], n: int, *, backend: str = "inductor", fullgraph: bool = True
) -> Callable[..., Any]:
    """``fn`` compiled, raising ``AssertionError`` as soon as it has compiled more than ``n`` times.

    Every compilation after the first is a recompile: a guard failed, often
    because a Python number that should be a 0-d tensor changed, or a shape did.

    Example:
        >>> def scale(x, factor):
        ...     return x * factor
        >>> checked = assert_max_compiles(scale, 1, backend="eager")
        >>> _ = checked(torch.ones(2), torch.tensor(2.0))
        >>> _ = checked(torch.ones(2), torch.tensor(3.0))  # a new tensor value: same graph
        >>> checked.compiles()
        1
        >>> _ = checked(torch.ones(3), torch.tensor(3.0))  # a new shape: a second graph
        Traceback (most recent call last):
        ...
        AssertionError: scale compiled 2 times, at most 1 allowed...
    """
    compile_graph = torch._dynamo.lookup_backend(backend)
    count = [0]

    def counting_backend(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        count[0] += 1
        return compile_graph(graph, example_inputs)

    compiled = torch.compile(fn, backend=counting_backend, fullgraph=fullgraph)
    name = getattr(fn, "__qualname__", repr(fn))

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        out = compiled(*args, **kwargs)
        if count[0] > n:
            code = getattr(fn, "__code__", None)
            reasons = [str(r) for r in torch._dynamo.utils.guard_failures.get(code, [])]
            raise AssertionError(
                f"{name} compiled {count[0]} times, at most {n} allowed"
                + (f"; the guards that failed: {reasons[-3:]}" if reasons else "")
            )
        return out

    checked.compiles = lambda: count[0]  # type: ignore[attr-defined]
    return checked
