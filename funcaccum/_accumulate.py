"""The accumulation driver: per-microbatch gradients folded by a reducer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import optree
import torch
from torch.func import grad_and_value, vmap

from ._errors import FuncaccumError
from ._mean import mean
from ._microbatch import MicrobatchGroup, split_microbatches
from ._reducer import Reducer, scalar_zeros
from ._tree import PyTree

try:  # A private API: compiles a sequential fold once, whatever its length.
    from torch._higher_order_ops.scan import scan as _scan_hop
except ImportError:  # pragma: no cover - older torch: an unrolled loop instead
    _scan_hop = None

__all__ = [
    "Accumulated",
    "FoldState",
    "MicrobatchGrads",
    "Strategy",
    "accumulate",
    "finalize",
    "fold",
    "init_fold",
    "merge",
    "microbatch_grads",
]

Strategy = Literal["vmap", "scan", "chunked"] | Any  # or a strategy object: ghost(module)
Randomness = Literal["error", "different", "same"]
LossFn = Callable[..., Any]
_STRATEGIES = ("vmap", "scan", "chunked")
_RANDOMNESS = ("error", "different", "same")


class Accumulated(NamedTuple):
    """What :func:`accumulate` returns.

    Attributes:
        grads: the reduced gradient, shaped like the params, in the
            accumulation dtype (at least float32).
        loss: the exact weighted mean loss of the whole batch,
            ``sum_i w_i L_i / sum_i w_i`` (not the last microbatch's).
        weight: ``sum_i w_i``: examples, or valid tokens for a weighted loss.
        stats: the reducer's statistics (clip fraction, norms, ...).
        aux: the loss's auxiliary outputs stacked along a leading microbatch
            axis, or None.
    """

    grads: PyTree
    loss: torch.Tensor
    weight: torch.Tensor
    stats: dict[str, torch.Tensor]
    aux: PyTree = None


class FoldState(NamedTuple):
    """A partial accumulation: sums only, so two states merge by addition.

    Attributes:
        reducer: the reducer's state.
        loss_sum: ``sum_i w_i L_i``.
        weight_sum: ``sum_i w_i``.
    """

    reducer: Any
    loss_sum: torch.Tensor
    weight_sum: torch.Tensor


class MicrobatchGrads(NamedTuple):
    """What :func:`microbatch_grads` returns; every leaf has a leading microbatch axis ``K``.

    Attributes:
        grads: the gradient of each microbatch's mean loss, ``(K, *param.shape)``.
        losses: each microbatch's mean loss, ``(K,)``.
        weights: each microbatch's weight, ``(K,)``.
        aux: the stacked auxiliary outputs, or None.
    """

    grads: PyTree
    losses: torch.Tensor
    weights: torch.Tensor
    aux: PyTree = None


def _split_output(out: Any, flag: str) -> tuple[Any, Any]:
    if not (isinstance(out, tuple) and len(out) == 2):
        raise FuncaccumError(
            f"with {flag}=True, loss_fn must return a pair, got {type(out).__name__}"
        )
    return out


def _value_and_grad(
    loss_fn: LossFn, *, has_aux: bool, has_weight: bool
) -> Callable[[PyTree, PyTree, int], tuple[PyTree, tuple[torch.Tensor, torch.Tensor, PyTree]]]:
    """``f(params, microbatch, size) -> (grads, (loss, weight, aux))`` for one microbatch."""

    def loss_weight_aux(params: PyTree, microbatch: PyTree, size: int) -> tuple[torch.Tensor, Any]:
        out = loss_fn(params, microbatch)
        aux: Any = ()  # vmap and scan need tensor outputs; () stands for "no aux"
        if has_aux:
            out, aux = _split_output(out, "has_aux")
        loss, weight = _split_output(out, "has_weight") if has_weight else (out, size)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            hint = (
                " (return a pair? pass has_aux=True or has_weight=True)"
                if isinstance(loss, tuple)
                else ""
            )
            raise FuncaccumError(
                "loss_fn must return a 0-d tensor, the mean loss over its microbatch; "
                f"got {got}{hint}"
            )
        weight = torch.as_tensor(weight, device=loss.device)
        if weight.ndim != 0:
            raise FuncaccumError(
                f"the weight loss_fn returns must be 0-d, got shape {tuple(weight.shape)}"
            )
        return loss, (loss.detach(), weight, aux)

    def value_and_grad(params: PyTree, microbatch: PyTree, size: int) -> Any:
        grads, (_, rest) = grad_and_value(loss_weight_aux, has_aux=True)(params, microbatch, size)
        return grads, rest

    return value_and_grad


def _sequential(
    body: Callable[[Any, Any], tuple[Any, Any]], carry: Any, xs: PyTree
) -> tuple[Any, Any]:
    """``for x in xs: carry, y = body(carry, x)``, returning the carry and the stacked ys.

    Under ``torch.compile`` this is the ``scan`` higher-order op, which traces
    the body once whatever the length (even for one microbatch it measured
    faster on the CPU than the body inlined); eagerly it is a plain loop.
    """
    length = optree.tree_leaves(xs)[0].shape[0]
    if _scan_hop is not None and torch.compiler.is_compiling():
        # The op's body may return only tensors, lists, tuples and dicts: flatten our NamedTuples.
        leaves, treedef = optree.tree_flatten(carry)

        def flat_body(leaves: list[torch.Tensor], x: Any) -> tuple[list[torch.Tensor], Any]:
            carry, y = body(optree.tree_unflatten(treedef, leaves), x)
            return optree.tree_leaves(carry), y

        leaves, ys = _scan_hop(flat_body, leaves, xs)
        return optree.tree_unflatten(treedef, leaves), ys
    ys = []
    for i in range(length):
        carry, y = body(carry, optree.tree_map(lambda x, i=i: x[i], xs))
        ys.append(y)
    return carry, optree.tree_map(lambda *y: torch.stack(y), *ys)


class _Folding(NamedTuple):
    """How one call folds its microbatches."""

    reducer: Reducer
    loss_fn: LossFn
    value_and_grad: Callable[..., Any]
    strategy: Strategy
    chunk_size: int
    randomness: Randomness
    has_weight: bool


def _fold_units(how: _Folding, state: FoldState, grads: PyTree, rest: Any) -> FoldState:
    loss, weight, _ = rest
    weight = weight.to(state.weight_sum.dtype)
    present = weight != 0
    if how.has_weight:
        # A microbatch the loss gives zero weight (all padding) adds exactly nothing,
        # even when its loss and gradient are 0/0 = NaN.
        grads = optree.tree_map(
            lambda g: torch.where(
                present.reshape(present.shape + (1,) * (g.ndim - present.ndim)), g, 0
            ),
            grads,
        )
    weighted_loss = torch.where(present, weight * loss.to(weight.dtype), 0)
    return FoldState(
        how.reducer.fold(state.reducer, grads, weight),
        state.loss_sum + weighted_loss.sum(),
        state.weight_sum + weight.sum(),
    )


def _fold_group(
    how: _Folding, state: FoldState, group: MicrobatchGroup, params: PyTree
) -> tuple[FoldState, Any]:
    """Fold one group of equal-size microbatches; also returns the per-microbatch outputs."""
    if not isinstance(how.strategy, str):  # a strategy object, such as ghost(module)
        return how.strategy.fold_group(how, state, group, params)

    def chunk_step(state: FoldState, chunk: PyTree) -> tuple[FoldState, Any]:
        batched = vmap(how.value_and_grad, in_dims=(None, 0, None), randomness=how.randomness)
        grads, rest = _raise_on_randomness(batched, params, chunk, group.size)
        return _fold_units(how, state, grads, rest), rest

    def microbatch_step(state: FoldState, microbatch: PyTree) -> tuple[FoldState, Any]:
        grads, rest = how.value_and_grad(params, microbatch, group.size)
        return _fold_units(how, state, grads, rest), rest

    if how.strategy == "vmap":
        return chunk_step(state, group.batch)
    if how.strategy == "scan":
        return _sequential(microbatch_step, state, group.batch)
    chunk_size = how.chunk_size
    whole, rest_count = divmod(group.count, chunk_size)
    outputs = []
    if whole:
        chunks = optree.tree_map(
            lambda x: x[: whole * chunk_size].unflatten(0, (whole, chunk_size)), group.batch
        )
        state, ys = _sequential(chunk_step, state, chunks)
        outputs.append(optree.tree_map(lambda y: y.flatten(0, 1), ys))
    if rest_count:
        state, ys = chunk_step(
            state, optree.tree_map(lambda x: x[whole * chunk_size :], group.batch)
        )
        outputs.append(ys)
    return state, _concat(outputs)


def _raise_on_randomness(fn: Callable[..., Any], *args: Any) -> Any:
    if torch.compiler.is_compiling():
        return fn(*args)
    try:
        return fn(*args)
    except RuntimeError as error:
        if "randomness" not in str(error):
            raise
        raise FuncaccumError(
            "loss_fn draws random numbers (dropout?) under vmap. Choose what microbatches see: "
            "randomness='different' (independent draws, as a sequential loop gives) or "
            "randomness='same' (one draw shared by every microbatch)."
        ) from error


def _concat(outputs: list[Any]) -> Any:
    if len(outputs) == 1:
        return outputs[0]
    try:
        return optree.tree_map(lambda *ys: torch.cat(ys), *outputs)
    except RuntimeError as error:
        raise FuncaccumError(
            "the loss's aux outputs differ in shape between microbatches of different sizes; "
            "return per-microbatch statistics (same shape for every microbatch) as aux"
        ) from error


def _check_randomness(randomness: str) -> None:
    if randomness not in _RANDOMNESS:
        raise FuncaccumError(f"randomness must be one of {_RANDOMNESS}, got {randomness!r}")


def _check_options(
    reducer: Reducer, strategy: str, chunk_size: int | None, randomness: str
) -> None:
    if not isinstance(reducer, Reducer):
        raise FuncaccumError(f"reducer must be a funcaccum Reducer, got {type(reducer).__name__}")
    if isinstance(strategy, str) or not hasattr(strategy, "fold_group"):
        if strategy not in _STRATEGIES:
            raise FuncaccumError(
                f"strategy must be one of {_STRATEGIES} or ghost(module), got {strategy!r}"
            )
        if (strategy == "chunked") != (chunk_size is not None):
            raise FuncaccumError("chunk_size is required by strategy='chunked' and only by it")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise FuncaccumError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    _check_randomness(randomness)
    if randomness == "same" and strategy == "scan":
        raise FuncaccumError("randomness='same' needs a vmap strategy ('vmap' or 'chunked')")


def _fold_with_outputs(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    reducer: Reducer,
    state: FoldState | None,
    num_microbatches: int | None,
    microbatch_size: int | None,
    strategy: Strategy,
    chunk_size: int | None,
    has_aux: bool,
    has_weight: bool,
    randomness: Randomness,
) -> tuple[FoldState, Any]:
    _check_options(reducer, strategy, chunk_size, randomness)
    if num_microbatches is None and microbatch_size is None:
        num_microbatches = 1
    groups = split_microbatches(
        batch, num_microbatches=num_microbatches, microbatch_size=microbatch_size
    )
    if state is None:
        state = init_fold(params, reducer=reducer)
    how = _Folding(
        reducer,
        loss_fn,
        _value_and_grad(loss_fn, has_aux=has_aux, has_weight=has_weight),
        strategy,
        chunk_size or 1,
        randomness,
        has_weight,
    )
    outputs = []
    for group in groups:
        state, ys = _fold_group(how, state, group, params)
        outputs.append(ys)
    return state, _concat(outputs)


def init_fold(params: PyTree, *, reducer: Reducer | None = None) -> FoldState:
    """An empty :class:`FoldState` for ``params``: what :func:`fold` starts from.

    A process with no examples in a step contributes this to the merge.

    >>> state = init_fold({"w": torch.zeros(3)})
    >>> state.weight_sum
    tensor(0.)
    """
    reducer = mean() if reducer is None else reducer
    return FoldState(reducer.init(params), *scalar_zeros(params, 2))


_FOLD_ARGS = """Args:
        loss_fn: ``loss_fn(params, microbatch)``, pure, returning the mean loss
            over the microbatch as a 0-d tensor; with ``has_weight`` it returns
            ``(loss, weight)`` (for example the number of valid tokens), with
            ``has_aux`` it returns ``(loss_or_pair, aux)``.
        params: the parameter pytree.
        batch: a pytree of tensors sharing the leading batch dimension ``N``.
        reducer: how microbatch gradients combine; default :func:`mean`.
        num_microbatches: split into ``K`` microbatches as evenly as possible.
        microbatch_size: split into microbatches of ``m``, the last one partial.
            With neither, the batch is one microbatch.
        strategy: ``"scan"``: one microbatch at a time, gradient memory
            independent of ``K``; ``"vmap"``: all microbatches at once;
            ``"chunked"``: ``chunk_size`` microbatches at a time under vmap.
        chunk_size: microbatches per chunk, for ``strategy="chunked"``.
        has_aux: ``loss_fn`` also returns auxiliary outputs.
        has_weight: ``loss_fn`` also returns its weight; default weight is the
            microbatch's number of examples.
        randomness: what random operations do under vmap: ``"error"`` (raise),
            ``"different"`` (independent per microbatch) or ``"same"``. The
            ``"scan"`` strategy draws independently per microbatch.
"""


def _with_args(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn.__doc__ = (fn.__doc__ or "").replace("{args}\n", _FOLD_ARGS)
    return fn


@_with_args
def fold(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    reducer: Reducer | None = None,
    state: FoldState | None = None,
    num_microbatches: int | None = None,
    microbatch_size: int | None = None,
    strategy: Strategy = "scan",
    chunk_size: int | None = None,
    has_aux: bool = False,
    has_weight: bool = False,
    randomness: Randomness = "error",
) -> FoldState:
    """Fold the microbatches of ``batch`` into ``state``, for streaming accumulation.

    Use it when microbatches arrive one loader batch at a time; merge partial
    states (from other chunks or processes) with :func:`merge` and finish with
    :func:`finalize`. :func:`accumulate` is ``finalize(fold(...))``; ``fold``
    drops auxiliary outputs.

    {args}
        state: the state to fold into; None starts a new one.

    Returns:
        The new :class:`FoldState`; ``state`` is not modified.

    Example:
        >>> def loss_fn(params, batch):
        ...     x, y = batch
        ...     return torch.mean((x @ params["w"] - y) ** 2)
        >>> params = {"w": torch.zeros(3)}
        >>> state = None
        >>> for _ in range(4):                          # four loader batches, 8 examples each
        ...     x, y = torch.randn(8, 3), torch.randn(8)
        ...     state = fold(loss_fn, params, (x, y), state=state)
        >>> result = finalize(state)
        >>> result.weight.item()
        32.0
    """
    reducer = mean() if reducer is None else reducer
    state, _ = _fold_with_outputs(
        loss_fn, params, batch, reducer=reducer, state=state,
        num_microbatches=num_microbatches, microbatch_size=microbatch_size,
        strategy=strategy, chunk_size=chunk_size, has_aux=has_aux,
        has_weight=has_weight, randomness=randomness,
    )  # fmt: skip
    return state


def merge(a: FoldState, b: FoldState, *, reducer: Reducer | None = None) -> FoldState:
    """Merge two partial states of the same reducer (from chunks, or processes)."""
    reducer = mean() if reducer is None else reducer
    return FoldState(
        reducer.merge(a.reducer, b.reducer), a.loss_sum + b.loss_sum, a.weight_sum + b.weight_sum
    )


def finalize(
    state: FoldState, *, reducer: Reducer | None = None, aux: PyTree = None
) -> Accumulated:
    """Finish an accumulation: the reduced gradient, the exact mean loss, the stats."""
    reducer = mean() if reducer is None else reducer
    grads, stats = reducer.finalize(state.reducer)
    return Accumulated(grads, state.loss_sum / state.weight_sum, state.weight_sum, stats, aux)


@_with_args
def accumulate(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    reducer: Reducer | None = None,
    num_microbatches: int | None = None,
    microbatch_size: int | None = None,
    strategy: Strategy = "scan",
    chunk_size: int | None = None,
    has_aux: bool = False,
    has_weight: bool = False,
    randomness: Randomness = "error",
) -> Accumulated:
    """The reduced gradient of ``loss_fn`` over ``batch``, microbatch by microbatch.

    With the default :func:`mean` reducer the result is the gradient of the
    whole batch's weighted mean loss, exactly (up to float rounding), for any
    split: uneven microbatches, a partial last one, or token-weighted losses
    whose microbatches hold different numbers of valid tokens.

    {args}
    Returns:
        :class:`Accumulated` ``(grads, loss, weight, stats, aux)``.

    Raises:
        FuncaccumError: bad options, a malformed batch (see
            :func:`split_microbatches`), or a loss that does not return a 0-d
            tensor.

    Example:
        >>> def loss_fn(params, batch):
        ...     x, y = batch                            # x: (m, 3), y: (m,)
        ...     return torch.mean((x @ params["w"] - y) ** 2)
        >>> params = {"w": torch.zeros(3, dtype=torch.float64)}
        >>> x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
        >>> result = accumulate(loss_fn, params, (x, y), num_microbatches=3)  # sizes 4, 3, 3
        >>> full = torch.func.grad(loss_fn)(params, (x, y))
        >>> torch.allclose(result.grads["w"], full["w"], rtol=1e-12, atol=0)
        True
    """
    reducer = mean() if reducer is None else reducer
    state, (_, _, aux) = _fold_with_outputs(
        loss_fn, params, batch, reducer=reducer, state=None,
        num_microbatches=num_microbatches, microbatch_size=microbatch_size,
        strategy=strategy, chunk_size=chunk_size, has_aux=has_aux,
        has_weight=has_weight, randomness=randomness,
    )  # fmt: skip
    return finalize(state, reducer=reducer, aux=aux if has_aux else None)


def microbatch_grads(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    num_microbatches: int | None = None,
    microbatch_size: int | None = None,
    has_aux: bool = False,
    has_weight: bool = False,
    randomness: Randomness = "error",
) -> MicrobatchGrads:
    """Every microbatch's gradient, stacked along a leading axis ``K``, computed with vmap.

    Per-example gradients are the case ``microbatch_size=1``. Memory grows
    with ``K``; to reduce them instead of keeping them, use :func:`accumulate`.

    Example:
        >>> def loss_fn(params, batch):
        ...     return torch.mean((batch @ params["w"]) ** 2)
        >>> params = {"w": torch.ones(3)}
        >>> out = microbatch_grads(loss_fn, params, torch.randn(5, 3), microbatch_size=1)
        >>> out.grads["w"].shape, out.losses.shape       # (examples, 3), (examples,)
        (torch.Size([5, 3]), torch.Size([5]))
    """
    value_and_grad = _value_and_grad(loss_fn, has_aux=has_aux, has_weight=has_weight)
    _check_randomness(randomness)
    if num_microbatches is None and microbatch_size is None:
        num_microbatches = 1
    outputs = []
    for group in split_microbatches(
        batch, num_microbatches=num_microbatches, microbatch_size=microbatch_size
    ):
        batched = vmap(value_and_grad, in_dims=(None, 0, None), randomness=randomness)
        outputs.append(_raise_on_randomness(batched, params, group.batch, group.size))
    grads, (losses, weights, aux) = _concat(outputs)
    return MicrobatchGrads(grads, losses, weights, aux if has_aux else None)
