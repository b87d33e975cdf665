"""Strategies: how a group of equal-size microbatches is turned into gradients and folded.

Each strategy has one body, written with the :class:`~funcaccum.extend.Folder`'s
pieces, which run eagerly or traced as the step does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import optree
import torch

from ._errors import FuncaccumError
from ._fold import FoldState, MicrobatchOutput
from ._folder import Folder, Randomness, check_randomness
from ._microbatch import MicrobatchGroup
from ._model_state import CombineStates
from ._tree import PyTree
from ._validate import check_int

__all__ = [
    "Chunked",
    "GroupRunner",
    "Scan",
    "Strategy",
    "Vmap",
    "as_strategy",
    "chunked",
    "concat",
    "scan",
    "vmap",
]

GroupRunner = Callable[
    [PyTree, FoldState, MicrobatchGroup, PyTree], tuple[FoldState, MicrobatchOutput, PyTree]
]
"""``run(params, state, group, model_state) -> (state, outputs, model_state)``.

Folds every microbatch of ``group`` into ``state`` and returns the stacked
:class:`~funcaccum.extend.MicrobatchOutput` (leading axis ``group.count``;
its ``model_state`` left ``()``) and the model state the last microbatch left.
"""


@runtime_checkable
class Strategy(Protocol):
    """How microbatch gradients are computed and folded: the protocol every strategy meets.

    ``build(folder)`` is called once per loss, accumulation and compile
    setting, and returns the :data:`GroupRunner` that every step then calls
    on each group of equal-size microbatches. The
    :class:`~funcaccum.extend.Folder` gives what a strategy needs, each piece
    working eagerly and traced alike: ``value_and_grad`` (one microbatch's
    gradient), ``loop`` (a loop over microbatches), ``vmap``, ``add`` (fold
    into the state) and ``compile`` (compile a piece when the step compiles
    its loss). ``build`` may refuse what the strategy cannot do, from
    ``folder.reducer`` and ``folder.spec``.

    Example:
        The smallest strategy, one that delegates (docs/concepts.md, "Writing
        a strategy", has one that folds a group last to first)::

            class Plain(NamedTuple):
                def build(self, folder):
                    return fa.scan().build(folder)
    """

    def build(self, folder: Folder) -> GroupRunner: ...


class Scan(NamedTuple):
    """One microbatch at a time: gradient memory independent of ``K``. From :func:`scan`."""

    def build(self, folder: Folder) -> GroupRunner:
        """One gradient per microbatch, folded in order: :meth:`Folder.fold_in_order`."""
        return folder.fold_in_order


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


ChunkRunner = Callable[
    [PyTree, FoldState, PyTree, PyTree, int], tuple[FoldState, MicrobatchOutput, PyTree]
]


def _chunk_runner(
    folder: Folder, randomness: Randomness, combine: CombineStates | None
) -> ChunkRunner:
    """Fold a stacked chunk of microbatches, their gradients taken together under vmap."""
    has_state = folder.spec.has_state
    if has_state and combine is None:
        raise FuncaccumError(
            "has_state=True (batch norm's running statistics, say) under vmap needs to know how "
            "the microbatches' states combine: model_state=fa.running_stats(module) for batch "
            "norm; or strategy=scan(), where each microbatch sees the state the one before "
            "it left, in order"
        )
    batched = folder.vmap(folder.value_and_grad, (None, 0, 0, None), randomness)

    def chunk_step(
        params: PyTree, state: FoldState, model_state: PyTree, chunk: PyTree, size: int
    ) -> tuple[FoldState, MicrobatchOutput, PyTree]:
        count = optree.tree_leaves(chunk)[0].shape[0]
        # Every microbatch starts from the same state, a copy each (layers update it in place).
        starts = optree.tree_map(lambda x: x.expand(count, *x.shape), model_state)
        grads, out = batched(params, starts, chunk, size)
        if combine is not None:
            model_state = combine(model_state, out.model_state)
        # The state is returned apart; torch 2.11's Dynamo cannot trace NamedTuple._replace.
        outputs = MicrobatchOutput(out.loss, out.weight, out.aux)
        return folder.add(state, grads, out), outputs, model_state

    return folder.compile(chunk_step)


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
        """Whole chunks through :meth:`Folder.loop`, then one partial chunk."""
        run_chunk = _chunk_runner(folder, self.randomness, self.model_state)
        size = self.size

        def run(
            params: PyTree, state: FoldState, group: MicrobatchGroup, model_state: PyTree
        ) -> tuple[FoldState, MicrobatchOutput, PyTree]:
            whole, rest = divmod(group.count, size)
            outputs = []
            if whole:
                chunks = optree.tree_map(
                    lambda x: x[: whole * size].unflatten(0, (whole, size)), group.batch
                )

                def body(carry: tuple[FoldState, PyTree], chunk: PyTree) -> tuple[Any, Any]:
                    state, y, model_state = run_chunk(params, *carry, chunk, group.size)
                    return (state, model_state), tuple(y)  # a plain tuple for scan

                (state, model_state), ys = folder.loop(body, (state, model_state), chunks)
                outputs.append(optree.tree_map(lambda y: y.flatten(0, 1), MicrobatchOutput(*ys)))
            if rest:
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


def _check_combine(model_state: object) -> CombineStates | None:
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
    if isinstance(strategy, type) or not isinstance(strategy, Strategy):
        what = f"the class {strategy.__name__}" if isinstance(strategy, type) else (
            type(strategy).__name__
        )
        name = getattr(strategy, "__name__", "")
        hint = ""
        if isinstance(strategy, type):
            hint = f": make one, {name}(...) (for the built-in ones, scan(), vmap(), ...)"
        elif callable(strategy) and name:
            hint = f": call it, {name}()"
        raise FuncaccumError(
            "strategy must be an object with a build(folder) method (the Strategy protocol), "
            f"got {what}{hint}"
        )
    return strategy
