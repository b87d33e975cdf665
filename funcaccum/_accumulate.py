"""The accumulation driver: per-microbatch gradients folded by a reducer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import optree
import torch
from torch.func import grad_and_value, vmap

from ._errors import FuncaccumError
from ._functional import hold_parametrizations
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


def _loss_parts(
    loss_fn: LossFn, *, has_aux: bool, has_weight: bool, has_state: bool = False
) -> Callable[[PyTree, PyTree, int], tuple[torch.Tensor, tuple[Any, ...]]]:
    """``f(params, microbatch, size) -> (loss, (loss.detach(), weight, aux, new_state))``.

    With ``has_state`` the microbatch argument is ``(model_state, microbatch)``
    and ``loss_fn(params, model_state, microbatch)`` returns ``(out,
    new_model_state)``; ``()`` stands for no aux and for no state.
    """

    def loss_parts(params: PyTree, microbatch: PyTree, size: int) -> tuple[torch.Tensor, Any]:
        new_state: Any = ()
        if has_state:
            model_state, microbatch = microbatch
            out, new_state = _split_output(loss_fn(params, model_state, microbatch), "has_state")
            new_state = optree.tree_map(torch.Tensor.detach, new_state)
        else:
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
        if not loss.is_floating_point():
            raise FuncaccumError(
                f"loss_fn returned a {loss.dtype} loss; a loss must be a floating-point tensor "
                "computed from the params (an integer loss has no gradient)"
            )
        weight = torch.as_tensor(weight, device=loss.device)
        if weight.ndim != 0:
            raise FuncaccumError(
                f"the weight loss_fn returns must be 0-d, got shape {tuple(weight.shape)}"
            )
        return loss, (loss.detach(), weight, aux, new_state)

    return loss_parts


_DETACHED = (
    "the loss does not depend on the params: loss_fn detached it (.detach(), .item(), "
    "torch.no_grad()) or never used params, so every gradient would be zero"
)


def _autograd_value_and_grad(
    forward: Callable[..., tuple[torch.Tensor, Any]],
) -> Callable[[PyTree, PyTree, int], tuple[PyTree, Any]]:
    """One microbatch's gradient by plain autograd, on fresh leaves that alias the params.

    Eagerly this is the hand-written loop's forward and backward, without the
    per-op cost of the ``torch.func`` transforms; it also lets ``forward`` be a
    compiled function (forward and backward graphs, as ``torch.compile(model)``
    gives the loop), and activation checkpointing and compiled regions work
    inside the loss. The params are not modified: the leaves are new tensor
    objects, and ``torch.autograd.grad`` returns the gradients instead of
    writing ``.grad``.
    """

    def value_and_grad(params: PyTree, microbatch: PyTree, size: int) -> tuple[PyTree, Any]:
        leaves, treedef = optree.tree_flatten(params)
        inputs = [leaf.detach().requires_grad_() for leaf in leaves]
        # The backward runs with the forward's params in place (checkpointing recomputes).
        with torch.enable_grad(), hold_parametrizations():
            loss, rest = forward(optree.tree_unflatten(treedef, inputs), microbatch, size)
            if not loss.requires_grad:
                raise FuncaccumError(_DETACHED)
            grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
        return optree.tree_unflatten(treedef, list(grads)), rest

    return value_and_grad


def _func_value_and_grad(
    forward: Callable[..., tuple[torch.Tensor, Any]],
) -> Callable[[PyTree, PyTree, int], tuple[PyTree, Any]]:
    """One microbatch's gradient by :func:`torch.func.grad`, for ``vmap`` and a traced scan."""

    def checked(params: PyTree, microbatch: PyTree, size: int) -> tuple[torch.Tensor, Any]:
        loss, rest = forward(params, microbatch, size)
        if not loss.requires_grad:
            raise FuncaccumError(_DETACHED)
        return loss, rest

    def value_and_grad(params: PyTree, microbatch: PyTree, size: int) -> tuple[PyTree, Any]:
        grads, (_, rest) = grad_and_value(checked, has_aux=True)(params, microbatch, size)
        return grads, rest

    return value_and_grad


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
        return carry, _stack(ys)
    # The op's body may return only tensors, lists, tuples and dicts: flatten our NamedTuples.
    leaves, treedef = optree.tree_flatten(carry)

    def flat_body(leaves: list[torch.Tensor], x: Any) -> tuple[list[torch.Tensor], Any]:
        carry, y = body(optree.tree_unflatten(treedef, leaves), x)
        return optree.tree_leaves(carry), y

    leaves, ys = _scan_hop(flat_body, leaves, xs)
    return optree.tree_unflatten(treedef, leaves), ys


def _stack(outputs: list[Any]) -> Any:
    return optree.tree_map(lambda *ys: torch.stack(ys), *outputs)


class _Driver:
    """How one configuration folds a batch's microbatches: built once, run every step.

    Eagerly (the default) each microbatch's gradient comes from plain autograd
    (``"scan"``) or from ``torch.func.vmap`` over ``torch.func.grad`` (``"vmap"``,
    ``"chunked"``), and a Python loop folds them. With ``compile=True`` the
    pieces that loop calls are compiled apart, each ``fullgraph``: the loss
    (forward and backward graphs) and the vmapped chunk; with
    ``compile_fold=True`` also the fold into the reducer state (otherwise it
    runs as ``foreach`` kernels). Each is one small graph whatever ``K``, and
    all of them go through torch's FX-graph and AOTAutograd caches, so a
    second process starts warm. Traced inside a caller's own ``torch.compile`` (as
    :meth:`TrainStep.step` compiled whole), ``"scan"`` becomes the ``scan``
    higher-order op over ``torch.func.grad`` instead: one graph, traced once
    whatever ``K``.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        *,
        reducer: Reducer,
        strategy: Strategy,
        chunk_size: int | None,
        has_aux: bool,
        has_weight: bool,
        randomness: Randomness,
        has_state: bool = False,
        compile: bool = False,
        compile_fold: bool = False,
    ) -> None:
        _check_options(reducer, strategy, chunk_size, randomness, has_state)
        self.loss_fn = loss_fn
        self.reducer = reducer
        self.strategy = strategy
        self.chunk_size = chunk_size
        self.has_aux = has_aux
        self.has_weight = has_weight
        self.randomness = randomness
        self.has_state = has_state
        forward = _loss_parts(
            loss_fn, has_aux=has_aux, has_weight=has_weight, has_state=has_state
        )
        self.value_and_grad = _func_value_and_grad(forward)
        self._autograd_step = _autograd_value_and_grad(_compiled(forward, compile))
        self._fold_units = _compiled(self.fold_units, compile_fold)
        self._chunk_step = _compiled(self.chunk_step, compile)

    def fold_units(self, state: FoldState, grads: PyTree, rest: Any) -> FoldState:
        """Fold one microbatch (0-d weight) or a stacked chunk of them into ``state``."""
        loss, weight = rest[:2]
        weight = weight.to(state.weight_sum.dtype)
        present = weight != 0
        if self.has_weight:
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
            self.reducer.fold(state.reducer, grads, weight),
            state.loss_sum + weighted_loss.sum(),
            state.weight_sum + weight.sum(),
        )

    def chunk_step(
        self, params: PyTree, state: FoldState, chunk: PyTree, size: int
    ) -> tuple[FoldState, Any]:
        """Fold a stacked chunk of microbatches, their gradients taken together under vmap."""
        batched = vmap(self.value_and_grad, in_dims=(None, 0, None), randomness=self.randomness)
        grads, rest = _under_vmap(batched, params, chunk, size)
        return self.fold_units(state, grads, rest), rest

    def _chunk(
        self, params: PyTree, state: FoldState, chunk: PyTree, size: int
    ) -> tuple[FoldState, Any]:
        # Inside a caller's compiled region the plain function is traced into its graph.
        step = self.chunk_step if torch.compiler.is_compiling() else self._chunk_step
        return step(params, state, chunk, size)

    def run(
        self,
        params: PyTree,
        groups: list[MicrobatchGroup],
        state: FoldState,
        model_state: PyTree = (),
    ) -> tuple[FoldState, Any, PyTree]:
        """Fold every group; returns the state, the stacked aux (or None), the model state."""
        outputs = []
        for group in groups:
            if not isinstance(self.strategy, str):  # a strategy object, such as ghost(module)
                state, ys = self.strategy.fold_group(self, state, group, params)
            elif self.strategy == "vmap":
                state, ys = self._chunk(params, state, group.batch, group.size)
            elif self.strategy == "chunked":
                state, ys = self._chunked(params, state, group)
            else:
                state, ys, model_state = self._sequential(params, state, group, model_state)
            outputs.append(ys)
        aux = _concat([ys[2] for ys in outputs])
        return state, aux if self.has_aux else None, model_state

    def _sequential(
        self, params: PyTree, state: FoldState, group: MicrobatchGroup, model_state: PyTree
    ) -> tuple[FoldState, Any, PyTree]:
        """One microbatch at a time, the model state threaded through them in order."""
        if torch.compiler.is_compiling():

            def body(carry: tuple, microbatch: PyTree) -> tuple[tuple, Any]:
                state, model_state = carry
                inputs = (model_state, microbatch) if self.has_state else microbatch
                grads, rest = self.value_and_grad(params, inputs, group.size)
                return (self.fold_units(state, grads, rest), rest[3]), rest[:3]

            (state, model_state), ys = _scan(body, (state, model_state), group.batch)
            return state, ys, model_state
        outputs = []
        for i in range(group.count):
            microbatch = optree.tree_map(lambda x, i=i: x[i], group.batch)
            inputs = (model_state, microbatch) if self.has_state else microbatch
            grads, rest = self._autograd_step(params, inputs, group.size)
            state = self._fold_units(state, grads, rest)
            model_state = rest[3]
            outputs.append(rest[:3])
        return state, _stack(outputs), model_state

    def _chunked(
        self, params: PyTree, state: FoldState, group: MicrobatchGroup
    ) -> tuple[FoldState, Any]:
        size = self.chunk_size or 1
        whole, rest_count = divmod(group.count, size)
        outputs = []
        if whole:
            chunks = optree.tree_map(
                lambda x: x[: whole * size].unflatten(0, (whole, size)), group.batch
            )
            if torch.compiler.is_compiling():

                def body(state: FoldState, chunk: PyTree) -> tuple[FoldState, Any]:
                    return self.chunk_step(params, state, chunk, group.size)

                state, ys = _scan(body, state, chunks)
            else:
                parts = []
                for i in range(whole):
                    chunk = optree.tree_map(lambda x, i=i: x[i], chunks)
                    state, y = self._chunk_step(params, state, chunk, group.size)
                    parts.append(y)
                ys = _stack(parts)
            outputs.append(optree.tree_map(lambda y: y.flatten(0, 1), ys))
        if rest_count:
            remainder = optree.tree_map(lambda x: x[whole * size :], group.batch)
            state, ys = self._chunk(params, state, remainder, group.size)
            outputs.append(ys)
        return state, _concat(outputs)

    def fold(
        self,
        params: PyTree,
        batch: PyTree,
        state: FoldState | None,
        *,
        num_microbatches: int | None,
        microbatch_size: int | None,
        model_state: PyTree = (),
    ) -> tuple[FoldState, Any, PyTree]:
        """Split ``batch`` and fold every microbatch into ``state`` (None: a new one)."""
        if num_microbatches is None and microbatch_size is None:
            num_microbatches = 1
        groups = split_microbatches(
            batch, num_microbatches=num_microbatches, microbatch_size=microbatch_size
        )
        if state is None:
            state = init_fold(params, reducer=self.reducer)
        return self.run(params, groups, state, model_state)


def _compiled(fn: Callable[..., Any], enabled: bool) -> Callable[..., Any]:
    """``fn`` compiled as funcaccum compiles (one whole graph, static shapes), or ``fn``."""
    return torch.compile(fn, fullgraph=True, dynamic=False) if enabled else fn


def _under_vmap(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a vmapped ``fn``; a failure inside vmap gets an error that says what to do."""
    if torch.compiler.is_compiling():
        return fn(*args)
    try:
        return fn(*args)
    except RuntimeError as error:
        if "randomness" in str(error):
            raise FuncaccumError(
                "loss_fn draws random numbers (dropout?) under vmap. Choose what microbatches "
                "see: randomness='different' (independent draws, as a sequential loop gives) or "
                "randomness='same' (one draw shared by every microbatch)."
            ) from error
        raise FuncaccumError(
            f"loss_fn failed under torch.func.vmap, which the 'vmap' and 'chunked' strategies "
            f"use: {str(error).splitlines()[0]}\nIf the loss runs without vmap, the model uses "
            "something vmap cannot batch (data-dependent control flow such as a padding-mask "
            "check, an in-place write into an unbatched tensor, an op without a batching rule; "
            "nn.LSTM is one): use strategy='scan', which runs each microbatch as it is."
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
    reducer: Reducer,
    strategy: str,
    chunk_size: int | None,
    randomness: str,
    has_state: bool = False,
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
    if has_state and strategy != "scan":
        raise FuncaccumError(
            "has_state=True (batch norm's running statistics, say) needs strategy='scan': "
            "each microbatch must see the state the one before it left, in order"
        )


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
    driver = _Driver(
        loss_fn, reducer=mean() if reducer is None else reducer, strategy=strategy,
        chunk_size=chunk_size, has_aux=has_aux, has_weight=has_weight, randomness=randomness,
    )  # fmt: skip
    state, _, _ = driver.fold(
        params, batch, state, num_microbatches=num_microbatches, microbatch_size=microbatch_size
    )
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
    driver = _Driver(
        loss_fn, reducer=reducer, strategy=strategy, chunk_size=chunk_size, has_aux=has_aux,
        has_weight=has_weight, randomness=randomness,
    )  # fmt: skip
    state, aux, _ = driver.fold(
        params, batch, None, num_microbatches=num_microbatches, microbatch_size=microbatch_size
    )
    return finalize(state, reducer=reducer, aux=aux)


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
    value_and_grad = _func_value_and_grad(
        _loss_parts(loss_fn, has_aux=has_aux, has_weight=has_weight)
    )
    _check_randomness(randomness)
    if num_microbatches is None and microbatch_size is None:
        num_microbatches = 1
    outputs = []
    for group in split_microbatches(
        batch, num_microbatches=num_microbatches, microbatch_size=microbatch_size
    ):
        batched = vmap(value_and_grad, in_dims=(None, 0, None), randomness=randomness)
        outputs.append(_under_vmap(batched, params, group.batch, group.size))
    grads, (losses, weights, aux, _) = _concat(outputs)
    return MicrobatchGrads(grads, losses, weights, aux if has_aux else None)
