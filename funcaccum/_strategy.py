"""Strategies: how a group of equal-size microbatches is turned into gradients and folded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import optree
import torch
from torch.func import vmap as _vmap

from ._errors import FuncaccumError
from ._fold import Folder, FoldState, MicrobatchOutput
from ._microbatch import MicrobatchGroup
from ._model_state import CombineStates
from ._tree import PyTree
from ._validate import check_int

try:  # A private API: compiles a sequential fold once, whatever its length.
    from torch._higher_order_ops.scan import scan as _scan_hop
except ImportError:  # pragma: no cover - older torch: an unrolled loop instead
    _scan_hop = None

__all__ = [
    "Chunked",
    "GroupRunner",
    "Randomness",
    "Scan",
    "Strategy",
    "Vmap",
    "as_strategy",
    "check_randomness",
    "chunked",
    "concat",
    "scan",
    "stack",
    "under_vmap",
    "vmap",
]

Randomness = Literal["error", "different", "same"]
_RANDOMNESS = ("error", "different", "same")

GroupRunner = Callable[
    [PyTree, FoldState, MicrobatchGroup, PyTree], tuple[FoldState, MicrobatchOutput, PyTree]
]
"""``run(params, state, group, model_state) -> (state, outputs, model_state)``.

Folds every microbatch of ``group`` into ``state`` and returns the stacked
:class:`~funcaccum.MicrobatchOutput` (leading axis ``group.count``) and the
model state the last microbatch left.
"""


@runtime_checkable
class Strategy(Protocol):
    """How microbatch gradients are computed and folded: the protocol every strategy meets.

    ``build(folder)`` is called once per loss, accumulation and compile
    setting, and returns the :data:`GroupRunner` that every step then calls
    on each group of equal-size microbatches. The :class:`~funcaccum.Folder`
    gives what a strategy needs: the gradient of one microbatch (by autograd,
    or by ``torch.func`` for vmap and tracing), ``add`` to fold gradients
    into the state, and ``compile`` to compile a piece when the step does.

    Example:
        The smallest strategy, one that delegates (docs/concepts.md, "Writing
        a strategy", has one that folds a group last to first)::

            class Plain(NamedTuple):
                def build(self, folder):
                    return fa.scan().build(folder)

        A strategy of one's own usually loops over ``group.count``
        microbatches, takes each gradient with ``folder.autograd`` (or
        ``folder.grad`` under vmap) and folds it with ``folder.add``.
    """

    def build(self, folder: Folder) -> GroupRunner: ...


def stack(outputs: list[Any]) -> Any:
    """Stack a list of equal-shaped pytrees along a new leading axis."""
    return optree.tree_map(lambda *ys: torch.stack(ys), *outputs)


def _scan(body: Callable[[Any, Any], tuple[Any, Any]], carry: Any, xs: PyTree) -> tuple[Any, Any]:
    """``for x in xs: carry, y = body(carry, x)`` traced once, for a step compiled whole.

    The ``scan`` higher-order op traces the body once whatever the length.
    Without it (older torch) the loop is unrolled.
    """
    if _scan_hop is None:  # pragma: no cover - older torch
        ys = []
        for i in range(optree.tree_leaves(xs)[0].shape[0]):
            carry, y = body(carry, optree.tree_map(lambda x, i=i: x[i], xs))
            ys.append(y)
        return carry, stack(ys)
    # The op's body may return only tensors, lists, tuples and dicts: flatten our NamedTuples.
    leaves, treedef = optree.tree_flatten(carry)

    def flat_body(leaves: list[torch.Tensor], x: Any) -> tuple[list[torch.Tensor], Any]:
        carry, y = body(optree.tree_unflatten(treedef, leaves), x)
        return optree.tree_leaves(carry), y

    leaves, ys = _scan_hop(flat_body, leaves, xs)
    return optree.tree_unflatten(treedef, leaves), ys


def check_randomness(randomness: str) -> Randomness:
    if randomness not in _RANDOMNESS:
        raise FuncaccumError(f"randomness must be one of {_RANDOMNESS}, got {randomness!r}")
    return randomness  # type: ignore[return-value]


def under_vmap(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a vmapped ``fn``; a failure inside vmap gets an error that says what to do."""
    if torch.compiler.is_compiling():
        return fn(*args)
    try:
        return fn(*args)
    except RuntimeError as error:
        if "randomness" in str(error):
            raise FuncaccumError(
                "loss_fn draws random numbers (dropout?) under vmap. Choose what microbatches "
                "see: vmap(randomness='different') (independent draws, as a sequential loop "
                "gives) or vmap(randomness='same') (one draw shared by every microbatch)."
            ) from error
        raise FuncaccumError(
            f"loss_fn failed under torch.func.vmap, which the vmap and chunked strategies "
            f"use: {str(error).splitlines()[0]}\nIf the loss runs without vmap, the model uses "
            "something vmap cannot batch (data-dependent control flow such as a padding-mask "
            "check, an in-place write into an unbatched tensor, an op without a batching rule; "
            "nn.LSTM is one): use strategy=scan(), which runs each microbatch as it is."
        ) from error


class Scan(NamedTuple):
    """One microbatch at a time: gradient memory independent of ``K``. From :func:`scan`."""

    def build(self, folder: Folder) -> GroupRunner:
        """Eagerly a Python loop over plain autograd; traced, the ``scan`` op over torch.func."""

        def run(
            params: PyTree, state: FoldState, group: MicrobatchGroup, model_state: PyTree
        ) -> tuple[FoldState, MicrobatchOutput, PyTree]:
            if torch.compiler.is_compiling():

                def body(carry: tuple, microbatch: PyTree) -> tuple[tuple, tuple]:
                    state, model_state = carry
                    grads, out = folder.grad(params, model_state, microbatch, group.size)
                    new_carry = (folder.add(state, grads, out), out.model_state)
                    return new_carry, (out.loss, out.weight, out.aux)  # a plain tuple for scan

                (state, model_state), ys = _scan(body, (state, model_state), group.batch)
                return state, MicrobatchOutput(*ys), model_state
            outputs = []
            for i in range(group.count):
                microbatch = optree.tree_map(lambda x, i=i: x[i], group.batch)
                grads, out = folder.autograd(params, model_state, microbatch, group.size)
                state = folder.add(state, grads, out)
                # Each microbatch sees the model state the one before it left.
                model_state = out.model_state
                outputs.append(MicrobatchOutput(out.loss, out.weight, out.aux))
            return state, stack(outputs), model_state

        return run


def scan() -> Scan:
    """The sequential strategy, the default: one microbatch's gradient at a time.

    Memory for gradients is one microbatch's plus the accumulator, whatever
    ``K``; each microbatch sees the model state the one before it left, as a
    hand-written loop does. Eagerly each gradient comes from plain autograd
    (checkpointing and compiled regions work in the loss); inside a step
    compiled whole it is the ``scan`` higher-order op, traced once.

    Example:
        >>> import funcaccum as fa
        >>> def loss_fn(params, batch):                 # batch: (m, 3)
        ...     return torch.mean((batch @ params["w"]) ** 2)
        >>> params, batch = {"w": torch.ones(3)}, torch.randn(8, 3)
        >>> result = fa.accumulate(loss_fn, params, batch, num_microbatches=4, strategy=fa.scan())
        >>> result.grads["w"].shape
        torch.Size([3])
    """
    return Scan()


def _chunk_runner(
    folder: Folder, randomness: Randomness, combine: CombineStates | None
) -> Callable[..., Any]:
    """Fold a stacked chunk of microbatches, their gradients taken together under vmap."""
    has_state = folder.options.has_state
    if has_state and combine is None:
        raise FuncaccumError(
            "has_state=True (batch norm's running statistics, say) under vmap needs to know how "
            "the microbatches' states combine: model_state=fa.running_stats(module) for batch "
            "norm; or strategy=scan(), where each microbatch sees the state the one before "
            "it left, in order"
        )

    def chunk_step(
        params: PyTree, state: FoldState, model_state: PyTree, chunk: PyTree, size: int
    ) -> tuple[FoldState, MicrobatchOutput, PyTree]:
        count = optree.tree_leaves(chunk)[0].shape[0]
        # Every microbatch starts from the same state, a copy each (layers update it in place).
        starts = optree.tree_map(lambda x: x.expand(count, *x.shape), model_state)
        batched = _vmap(folder.grad, in_dims=(None, 0, 0, None), randomness=randomness)
        grads, out = under_vmap(batched, params, starts, chunk, size)
        if has_state:
            model_state = combine(model_state, out.model_state)
        # The state is returned apart; torch 2.11's Dynamo cannot trace NamedTuple._replace.
        outputs = MicrobatchOutput(out.loss, out.weight, out.aux)
        return folder.add(state, grads, out), outputs, model_state

    compiled_step = folder.compile(chunk_step)

    def run_chunk(
        params: PyTree, state: FoldState, model_state: PyTree, chunk: PyTree, size: int
    ) -> tuple[FoldState, MicrobatchOutput, PyTree]:
        # Inside a caller's compiled region the plain function is traced into its graph.
        step = chunk_step if torch.compiler.is_compiling() else compiled_step
        return step(params, state, model_state, chunk, size)

    return run_chunk


class Vmap(NamedTuple):
    """Every microbatch of a group at once, under ``torch.func.vmap``. From :func:`vmap`."""

    randomness: Randomness = "error"
    model_state: CombineStates | None = None

    def build(self, folder: Folder) -> GroupRunner:
        """One vmapped gradient per group (compiled with the step's loss)."""
        run_chunk = _chunk_runner(folder, self.randomness, self.model_state)

        def run(
            params: PyTree, state: FoldState, group: MicrobatchGroup, model_state: PyTree
        ) -> tuple[FoldState, MicrobatchOutput, PyTree]:
            return run_chunk(params, state, model_state, group.batch, group.size)

        return run


def vmap(*, randomness: Randomness = "error", model_state: CombineStates | None = None) -> Vmap:
    """All microbatches of a group at once: fastest for small models, memory grows with ``K``.

    Args:
        randomness: what random operations (dropout) do under vmap:
            ``"error"`` (raise), ``"different"`` (independent draws per
            microbatch, as a loop gives) or ``"same"`` (one draw shared).
        model_state: with ``has_state``, how the states the microbatches
            leave, each from the same start, combine into the one a loop
            would leave: :func:`~funcaccum.running_stats` for batch norm.

    Example:
        >>> import funcaccum as fa
        >>> def loss_fn(params, batch):                 # batch: (m, 3)
        ...     return torch.mean((batch @ params["w"]) ** 2)
        >>> params, batch = {"w": torch.ones(3)}, torch.randn(8, 3)
        >>> result = fa.accumulate(loss_fn, params, batch, num_microbatches=4, strategy=fa.vmap())
        >>> result.weight.item()
        8.0
    """
    return Vmap(check_randomness(randomness), _check_combine(model_state))


class Chunked(NamedTuple):
    """``size`` microbatches at a time under vmap, folded in turn. From :func:`chunked`."""

    size: int
    randomness: Randomness = "error"
    model_state: CombineStates | None = None

    def build(self, folder: Folder) -> GroupRunner:
        """Whole chunks in a loop (the ``scan`` op when traced), then one partial chunk."""
        run_chunk = _chunk_runner(folder, self.randomness, self.model_state)
        size = self.size

        def run(
            params: PyTree, state: FoldState, group: MicrobatchGroup, model_state: PyTree
        ) -> tuple[FoldState, MicrobatchOutput, PyTree]:
            whole, rest_count = divmod(group.count, size)
            outputs = []
            if whole:
                chunks = optree.tree_map(
                    lambda x: x[: whole * size].unflatten(0, (whole, size)), group.batch
                )
                if torch.compiler.is_compiling():

                    def body(carry: tuple, chunk: PyTree) -> tuple[tuple, tuple]:
                        state, y, model_state = run_chunk(params, *carry, chunk, group.size)
                        return (state, model_state), tuple(y)  # a plain tuple for scan

                    (state, model_state), ys = _scan(body, (state, model_state), chunks)
                    ys = MicrobatchOutput(*ys)
                else:
                    parts = []
                    for i in range(whole):
                        chunk = optree.tree_map(lambda x, i=i: x[i], chunks)
                        state, y, model_state = run_chunk(
                            params, state, model_state, chunk, group.size
                        )
                        parts.append(y)
                    ys = stack(parts)
                outputs.append(optree.tree_map(lambda y: y.flatten(0, 1), ys))
            if rest_count:
                remainder = optree.tree_map(lambda x: x[whole * size :], group.batch)
                state, ys, model_state = run_chunk(
                    params, state, model_state, remainder, group.size
                )
                outputs.append(ys)
            return state, concat(outputs), model_state

        return run


def chunked(
    size: int, *, randomness: Randomness = "error", model_state: CombineStates | None = None
) -> Chunked:
    """``size`` microbatches at a time under vmap: memory set by ``size``, not by ``K``.

    Args:
        size: microbatches per chunk, >= 1.
        randomness: as for :func:`vmap`.
        model_state: as for :func:`vmap`; applied chunk after chunk.

    Example:
        >>> import funcaccum as fa
        >>> def loss_fn(params, batch):                 # batch: (m, 3)
        ...     return torch.mean((batch @ params["w"]) ** 2)
        >>> params, batch = {"w": torch.ones(3)}, torch.randn(10, 3)
        >>> strategy = fa.chunked(2)                    # K = 5: chunks of 2, 2 and 1
        >>> result = fa.accumulate(loss_fn, params, batch, microbatch_size=2, strategy=strategy)
        >>> result.weight.item()
        10.0
    """
    return Chunked(
        check_int("size", size, low=1), check_randomness(randomness), _check_combine(model_state)
    )


def _check_combine(model_state: Any) -> CombineStates | None:
    if model_state is not None and not callable(model_state):
        raise FuncaccumError(
            "model_state must be combine(old, stacked) -> state, such as "
            f"fa.running_stats(module), or None; got {type(model_state).__name__}"
        )
    return model_state


def concat(outputs: list[Any]) -> Any:
    """Concatenate stacked outputs along their leading axis, with a clear error for aux."""
    if len(outputs) == 1:
        return outputs[0]
    try:
        return optree.tree_map(lambda *ys: torch.cat(ys), *outputs)
    except RuntimeError as error:
        raise FuncaccumError(
            "the loss's aux outputs differ in shape between microbatches of different sizes; "
            "return per-microbatch statistics (same shape for every microbatch) as aux"
        ) from error


_SHORTHANDS: dict[str, Callable[[], Strategy]] = {"scan": scan, "vmap": vmap}


def as_strategy(strategy: Strategy | str) -> Strategy:
    """A strategy object, from itself or from its shorthand ``"scan"`` or ``"vmap"``."""
    if isinstance(strategy, str):
        if strategy not in _SHORTHANDS:
            hint = " (use chunked(size))" if strategy == "chunked" else ""
            raise FuncaccumError(
                f"strategy must be a Strategy (scan(), vmap(), chunked(size), ghost(module)) or "
                f"one of {tuple(_SHORTHANDS)}, got {strategy!r}{hint}"
            )
        return _SHORTHANDS[strategy]()
    if not isinstance(strategy, Strategy):
        raise FuncaccumError(
            "strategy must have a build(folder) method (the Strategy protocol), got "
            f"{type(strategy).__name__}"
        )
    return strategy
