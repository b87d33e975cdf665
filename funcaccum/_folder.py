"""The pieces a strategy folds microbatches with: the gradient, the loop, vmap, the add.

Every piece chooses its own mode, eager or traced, so a strategy has one body:
eagerly the gradient is plain autograd (the loss compiled when the step
compiles it) and the loop a Python loop; inside ``torch.compile`` or a
``torch.func`` transform the gradient is ``torch.func.grad`` and the loop the
``scan`` op, traced once whatever its length.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import optree
import torch
from torch._higher_order_ops.scan import scan as _scan_op
from torch.func import grad_and_value

from . import _fold
from ._compile import CompileMode, compile_regions, compiled, deterministic_on_cpu, traced
from ._errors import FuncaccumError
from ._fold import FoldState, LossSpec, MicrobatchOutput
from ._functional import hold_parametrizations
from ._microbatch import MicrobatchGroup, to_layout
from ._reducer import Reducer
from ._tree import PyTree, accum_dtype, leaf_paths
from ._validate import describe

__all__ = ["Folder", "LossFn", "Randomness", "check_randomness", "stack"]

LossFn = Callable[..., Any]
"""``loss_fn(params, batch)`` (or ``(params, model_state, batch)`` with ``has_state``): a
0-d mean loss, or the pairs :class:`~funcaccum.Accumulation`'s ``has_*`` flags declare."""

Randomness = Literal["error", "different", "same"]
_RANDOMNESS = ("error", "different", "same")

ValueAndGrad = Callable[[PyTree, PyTree, PyTree, int], tuple[PyTree, MicrobatchOutput]]

Carry = TypeVar("Carry")

_DETACHED = (
    "the loss does not depend on the params: loss_fn detached it (.detach(), .item(), "
    "torch.no_grad()) or never used params, so every gradient would be zero"
)


def check_randomness(randomness: object) -> Randomness:
    """``randomness`` if it is one of ``"error"``, ``"different"``, ``"same"``; else raise."""
    if randomness not in _RANDOMNESS:
        raise FuncaccumError(f"randomness must be one of {_RANDOMNESS}, got {randomness!r}")
    return randomness  # type: ignore[return-value]


def stack(outputs: list[Any]) -> Any:
    """Stack a list of equal-shaped pytrees along a new leading axis."""
    return optree.tree_map(lambda *ys: torch.stack(ys), *outputs)


def _pair(out: object, flag: str) -> tuple[Any, Any]:
    if not (isinstance(out, tuple) and len(out) == 2):
        raise FuncaccumError(
            f"with {flag}=True, loss_fn must return a pair, got {type(out).__name__}"
        )
    return out[0], out[1]


class Folder:
    """What a :class:`~funcaccum.extend.Strategy` builds its group runner from.

    One is made per loss, reducer, loss spec and compile setting, and a
    strategy's ``build`` is called with it once. Every piece works eagerly and
    inside a trace alike, so a strategy written with them has one body, which
    runs eagerly, with ``compile="loss"`` and compiled whole.

    Attributes:
        loss_fn: the loss as the step calls it (params cast to the compute dtype).
        reducer: the reducer the state is folded with.
        spec: the :class:`~funcaccum.extend.LossSpec`: what the loss returns.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        reducer: Reducer,
        spec: LossSpec,
        *,
        compile: CompileMode | None = None,
    ) -> None:
        self.loss_fn = loss_fn
        self.reducer = reducer
        self.spec = spec
        self._compile_loss = compile in ("loss", "loss+update")
        # The loss's own regions compiled (compile="regions"), or the whole loss: run exactly.
        self._regions = compile == "regions"
        self._exact = self._compile_loss or self._regions
        self._compile_add = compile == "loss+update"
        self._by_func = _func_value_and_grad(self._forward)
        self._forward_eagerly = compiled(self._forward, self._compile_loss)
        self._by_autograd = _autograd_value_and_grad(
            self._forward_eagerly, self._exact, self._regions
        )
        self._add = compiled(self._add_plain, self._compile_add)
        # The state this folder made last, eagerly: nobody else holds it, so adding to it
        # may write into its tensors (see `own`).
        self._owned: FoldState | None = None
        self._sizes: dict[tuple[int, torch.device], torch.Tensor] = {}

    def value_and_grad(
        self, params: PyTree, model_state: PyTree, microbatch: PyTree, size: int
    ) -> tuple[PyTree, MicrobatchOutput]:
        """One microbatch's gradient and :class:`~funcaccum.extend.MicrobatchOutput`.

        ``microbatch`` has ``size`` examples along its leading axis;
        ``model_state`` is ``()`` without ``has_state``. Eagerly this is
        plain autograd on fresh leaves (the hand-written loop's backward,
        compiled with the loss when the step compiles it; checkpointing and
        compiled regions work inside the loss); under ``vmap`` or inside a
        compiled step it is :func:`torch.func.grad`.
        """
        take = self._by_func if traced() else self._by_autograd
        return take(params, model_state, microbatch, size)

    def loop(
        self,
        body: Callable[[Carry, PyTree], tuple[Carry, PyTree]],
        carry: Carry,
        xs: PyTree,
    ) -> tuple[Carry, Any]:
        """``for x in xs: carry, y = body(carry, x)``; returns the carry and the ``y`` stacked.

        ``xs`` is sliced along its leading axis. Eagerly a Python loop;
        inside a compiled step the ``scan`` op, which traces ``body`` once
        whatever the length. ``body`` returns tensors, tuples, lists, dicts
        and NamedTuples (the carry is flattened for the op).
        """
        if torch.compiler.is_compiling():
            leaves, treedef = optree.tree_flatten(carry)

            def flat_body(leaves: list[torch.Tensor], x: PyTree) -> tuple[list[torch.Tensor], Any]:
                new, y = body(optree.tree_unflatten(treedef, leaves), x)
                return optree.tree_leaves(new), y

            leaves, ys = _scan_op(flat_body, leaves, xs)
            return optree.tree_unflatten(treedef, leaves), ys
        count = optree.tree_leaves(xs)[0].shape[0]
        outputs = []
        for i in range(count):
            carry, y = body(carry, optree.tree_map(lambda x, i=i: x[i], xs))
            outputs.append(y)
        return carry, stack(outputs)

    def fold_in_order(
        self, params: PyTree, state: FoldState, group: MicrobatchGroup, model_state: PyTree
    ) -> tuple[FoldState, MicrobatchOutput, PyTree]:
        """Fold a group's microbatches one at a time, in order: :func:`~funcaccum.scan`'s body.

        Each microbatch sees the model state the one before it left. It is
        :meth:`loop` over :meth:`value_and_grad` and :meth:`add`, except
        eagerly with a reducer that folds by sums (``Reducer.by_sum``:
        :func:`~funcaccum.mean`, :func:`~funcaccum.adaptive` in the params'
        dtype) and microbatches of one weight (no ``has_weight``): then
        autograd sums the group's gradients into buffers this fold owns, as
        ``.grad`` sums them in a hand-written loop (hooks take each one's
        squared norms where the reducer reads them), and the sum is folded
        once. Returns the state, the stacked outputs and the model state.
        """
        if self._sums_by_autograd(params):
            return self._fold_summed_by_autograd(params, state, group, model_state)

        def body(carry: tuple[FoldState, PyTree], microbatch: PyTree) -> tuple[Any, Any]:
            state, model_state = carry
            grads, out = self.value_and_grad(params, model_state, microbatch, group.size)
            ys = (out.loss, out.weight, out.aux)
            return (self.add(state, grads, out), out.model_state), ys

        (state, model_state), ys = self.loop(body, (state, model_state), group.batch)
        return state, MicrobatchOutput(*ys), model_state

    def _sums_by_autograd(self, params: PyTree) -> bool:
        by_sum = self.reducer.by_sum
        if by_sum is None or self.spec.has_weight or self._compile_add or traced():
            return False
        # Autograd sums in each param's dtype: only where the reducer would sum in it too.
        leaves = optree.tree_leaves(params)
        return all(accum_dtype(p.dtype, by_sum.dtype) == p.dtype for p in leaves)

    def _fold_summed_by_autograd(
        self, params: PyTree, state: FoldState, group: MicrobatchGroup, model_state: PyTree
    ) -> tuple[FoldState, MicrobatchOutput, PyTree]:
        leaves, treedef = optree.tree_flatten(params)
        # New leaves aliasing the params (never written): autograd sums into their .grad.
        inputs = [leaf.detach().requires_grad_() for leaf in leaves]
        fresh = optree.tree_unflatten(treedef, inputs)
        losses, weights, auxes = [], [], []
        by_sum = self.reducer.by_sum
        assert by_sum is not None  # _sums_by_autograd checked
        norms: list[list[torch.Tensor | None]] = []  # per microbatch, per leaf, where wanted
        handles = (
            [x.register_hook(_norm_hook(norms, i)) for i, x in enumerate(inputs)]
            if by_sum.wants_squares
            else []
        )
        # Each leaf's microbatches as views, unbound once for the group.
        columns, batch_def = optree.tree_flatten(group.batch)
        columns = [leaf.unbind(0) for leaf in columns]
        for i in range(group.count):
            if by_sum.wants_squares:
                norms.append([None] * len(inputs))
            microbatch = optree.tree_unflatten(batch_def, [column[i] for column in columns])
            # The backward runs with the forward's params in place (checkpointing recomputes).
            with (
                torch.enable_grad(),
                hold_parametrizations(),
                _exactly(self._exact, inputs),
                _regions_if(self._regions),
            ):
                loss, out = self._forward_eagerly(fresh, model_state, microbatch, group.size)
                if not loss.requires_grad:
                    raise FuncaccumError(_DETACHED)
                torch.autograd.backward(loss, inputs=inputs)
            losses.append(out.loss)
            weights.append(out.weight)
            auxes.append(out.aux)
            model_state = out.model_state
        for handle in handles:
            handle.remove()
        sums = [x.grad if x.grad is not None else torch.zeros_like(x) for x in inputs]
        outputs = MicrobatchOutput(torch.stack(losses), torch.stack(weights), stack(auxes))
        owned = state is self._owned
        state = _fold.add_sum(
            self.reducer,
            state,
            optree.tree_unflatten(treedef, sums),
            outputs.loss,
            weights[0],
            _squares(norms, inputs) if norms else None,
            donate=owned,
        )
        if owned:
            self._owned = state
        return state, outputs, model_state

    def vmap(
        self, fn: Callable[..., Any], in_dims: tuple[int | None, ...], randomness: Randomness
    ) -> Callable[..., Any]:
        """``torch.func.vmap(fn)``, whose failures get an error that says what to do."""

        def call(*args: Any) -> Any:
            batched = torch.func.vmap(fn, in_dims=in_dims, randomness=randomness)
            if torch.compiler.is_compiling():
                return batched(*args)
            try:
                return batched(*args)
            except RuntimeError as error:
                raise _vmap_error(error) from error

        return call

    def add(self, state: FoldState, grads: PyTree, output: MicrobatchOutput) -> FoldState:
        """Fold one microbatch (0-d weight) or a stacked chunk (``(c,)`` weights) into ``state``.

        ``grads`` is a tree like the params: each leaf the param's shape for one
        microbatch, or ``(c, *shape)`` stacked with ``(c,)`` weights.

        ``state`` is consumed: keep the state this returns, not the one given.
        Eagerly, a state this folder made (the fold's own accumulator, from
        :meth:`own` or an earlier ``add``) is summed into in place, as
        autograd accumulates ``.grad`` in a hand-written loop; a state from
        elsewhere is never written.
        """
        if not isinstance(state, FoldState):
            raise FuncaccumError(
                f"folder.add(state, grads, output) folds into a FoldState, got {describe(state)}"
            )
        if not isinstance(output, MicrobatchOutput):
            raise FuncaccumError(
                "folder.add(state, grads, output) takes the MicrobatchOutput that "
                f"folder.value_and_grad returned, got {describe(output)}"
            )
        if self._compile_add or traced():
            return self._add(state, grads, output)
        donate = state is self._owned
        try:
            folded = _fold.add(
                self.reducer, state, grads, output, has_weight=self.spec.has_weight, donate=donate
            )
        except (ValueError, RuntimeError, TypeError) as error:
            if isinstance(error, FuncaccumError):
                raise
            self._owned = None  # it may hold part of a sum: never fold into it again
            shapes = ", ".join(
                f"{path}: {tuple(g.shape) if isinstance(g, torch.Tensor) else describe(g)}"
                for path, g in leaf_paths(grads, "grads")
            )
            raise FuncaccumError(
                "folder.add could not fold these gradients into the reducer's state: "
                f"{str(error).splitlines()[0]}. The gradients must be a tree like the params "
                "(the same keys; each leaf the param's shape for one microbatch with a 0-d "
                "weight, or (c, *shape) for c stacked microbatches with (c,) weights); got "
                f"{shapes or describe(grads)} with weight {tuple(output.weight.shape)}"
            ) from error
        self._owned = folded
        return folded

    def add_by_norms(
        self,
        state: FoldState,
        norms: torch.Tensor,
        weights: torch.Tensor,
        weighted_sum: Callable[[torch.Tensor], PyTree],
        loss_sum: torch.Tensor,
    ) -> FoldState:
        """Fold ``c`` microbatches by their gradient norms; ``state`` is consumed, as in add."""
        if traced():
            return _fold.add_by_norms(self.reducer, state, norms, weights, weighted_sum, loss_sum)
        donate = state is self._owned
        self._owned = _fold.add_by_norms(
            self.reducer, state, norms, weights, weighted_sum, loss_sum, donate=donate
        )
        return self._owned

    def own(self, state: FoldState | None) -> None:
        """Mark ``state`` as this folder's own (a fresh fold's), or clear the mark with None.

        A :class:`~funcaccum.extend.Runner` marks the state it starts a fold
        from and clears the mark when the fold ends, so no state it returns is
        written again. Inside a trace nothing is marked: traced code is pure.
        """
        if not traced():
            self._owned = state

    def compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` compiled if this step compiles its loss, else ``fn`` (plain inside a trace)."""
        return compiled(fn, self._compile_loss)

    def require_eager(self, what: str, instead: str) -> None:
        """Refuse to run inside a trace, for pieces that need eager tensors (forward hooks)."""
        if traced():
            raise FuncaccumError(f"{what} runs eagerly; {instead}")

    def _size_weight(self, size: int, device: torch.device) -> torch.Tensor:
        """A microbatch's example count as a 0-d tensor, made once per size (never written)."""
        key = (size, device)
        if key not in self._sizes:
            self._sizes[key] = torch.tensor(size, device=device)
        return self._sizes[key]

    def _add_plain(self, state: FoldState, grads: PyTree, output: MicrobatchOutput) -> FoldState:
        return _fold.add(self.reducer, state, grads, output, has_weight=self.spec.has_weight)

    def _forward(
        self, params: PyTree, model_state: PyTree, microbatch: PyTree, size: int
    ) -> tuple[torch.Tensor, MicrobatchOutput]:
        """The loss and its output, the loss checked: 0-d, floating, with a 0-d weight."""
        spec = self.spec
        microbatch = to_layout(microbatch, spec.batch_dim)
        new_state: PyTree = ()
        if spec.has_state:
            out, new_state = _pair(self.loss_fn(params, model_state, microbatch), "has_state")
            new_state = optree.tree_map(torch.Tensor.detach, new_state)
        else:
            out = self.loss_fn(params, microbatch)
        aux: PyTree = ()  # vmap and scan need tensor outputs; () stands for "no aux"
        if spec.has_aux:
            out, aux = _pair(out, "has_aux")
            if not all(isinstance(leaf, torch.Tensor) for leaf in optree.tree_leaves(aux)):
                raise FuncaccumError(
                    "the aux loss_fn returns must be a tensor, or a tuple, list or dict of "
                    f"tensors (they are stacked over microbatches), got {describe(aux)}"
                )
        loss, weight = _pair(out, "has_weight") if spec.has_weight else (out, size)
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
        if not isinstance(weight, torch.Tensor) and (
            isinstance(weight, bool) or not isinstance(weight, numbers.Real)
        ):
            raise FuncaccumError(
                "the weight loss_fn returns must be a number or a 0-d real tensor (its count of "
                f"examples or valid tokens), got {describe(weight)}"
            )
        if not spec.has_weight and not traced():
            # The example count: a 0-d int64 tensor made once per size, nothing to check.
            return loss, MicrobatchOutput(
                loss.detach(), self._size_weight(size, loss.device), aux, new_state
            )
        if isinstance(weight, int) and not traced():
            weight = self._size_weight(weight, loss.device)
        weight = torch.as_tensor(weight, device=loss.device).detach()
        if weight.ndim != 0:
            raise FuncaccumError(
                f"the weight loss_fn returns must be 0-d, got shape {tuple(weight.shape)}"
            )
        if weight.dtype == torch.bool or weight.is_complex():
            raise FuncaccumError(
                f"the weight loss_fn returns is a {weight.dtype} tensor; it must be a real count "
                "(of examples or valid tokens): mask.sum(), not a mask or a flag"
            )
        return loss, MicrobatchOutput(loss.detach(), weight, aux, new_state)


def _exactly(
    compiled_loss: bool, inputs: list[torch.Tensor]
) -> deterministic_on_cpu | contextlib.nullcontext[None]:
    """Around a compiled loss's forward and backward: deterministic kernels on the CPU."""
    return deterministic_on_cpu((inputs,)) if compiled_loss else contextlib.nullcontext()


def _regions_if(regions: bool) -> compile_regions | contextlib.nullcontext[None]:
    """Around the forward and backward of a step that compiles the loss's regions."""
    return compile_regions() if regions else contextlib.nullcontext()


def _norm_hook(norms: list[list[torch.Tensor | None]], leaf: int) -> Callable[[torch.Tensor], None]:
    """A gradient hook: the norm of one leaf's gradient, in the microbatch's row."""

    def record(grad: torch.Tensor) -> None:
        norms[-1][leaf] = torch.linalg.vector_norm(grad)

    return record


def _squares(norms: list[list[torch.Tensor | None]], inputs: list[torch.Tensor]) -> torch.Tensor:
    """The hooked norms squared, ``(microbatches, leaves)``; 0 where a leaf got no gradient."""
    zero = inputs[0].new_zeros(())
    rows = [torch.stack([zero if n is None else n for n in row]) for row in norms]
    return torch.stack(rows).square()


def _vmap_error(error: RuntimeError) -> FuncaccumError:
    """What a failure inside vmap means for the user, and what to do."""
    if "randomness" in str(error):
        return FuncaccumError(
            "loss_fn draws random numbers (dropout?) under vmap. Choose what microbatches "
            "see: vmap(randomness='different') (independent draws, as a sequential loop "
            "gives) or vmap(randomness='same') (one draw shared by every microbatch)."
        )
    return FuncaccumError(
        f"loss_fn failed under torch.func.vmap, which the vmap and chunked strategies "
        f"use: {str(error).splitlines()[0]}\nIf the loss runs without vmap, the model uses "
        "something vmap cannot batch (data-dependent control flow such as a padding-mask "
        "check, an in-place write into an unbatched tensor, an op without a batching rule; "
        "nn.LSTM is one): use strategy=scan(), which runs each microbatch as it is."
    )


def _autograd_value_and_grad(
    forward: Callable[..., tuple[torch.Tensor, MicrobatchOutput]], exact: bool, regions: bool
) -> ValueAndGrad:
    """One microbatch's gradient by plain autograd, on fresh leaves that alias the params.

    Eagerly this is the hand-written loop's forward and backward, without the
    per-op cost of the ``torch.func`` transforms; it also lets ``forward`` be a
    compiled function (forward and backward graphs, as ``torch.compile(model)``
    gives the loop), and activation checkpointing and compiled regions work
    inside the loss. The params are not modified: the leaves are new tensor
    objects, and ``torch.autograd.grad`` returns the gradients instead of
    writing ``.grad``. A compiled loss runs, backward included (which
    AOTAutograd compiles at its first call), under :func:`_exactly`.
    """

    def value_and_grad(
        params: PyTree, model_state: PyTree, microbatch: PyTree, size: int
    ) -> tuple[PyTree, MicrobatchOutput]:
        leaves, treedef = optree.tree_flatten(params)
        inputs = [leaf.detach().requires_grad_() for leaf in leaves]
        # The backward runs with the forward's params in place (checkpointing recomputes).
        with (
            torch.enable_grad(),
            hold_parametrizations(),
            _exactly(exact, inputs),
            _regions_if(regions),
        ):
            loss, output = forward(
                optree.tree_unflatten(treedef, inputs), model_state, microbatch, size
            )
            if not loss.requires_grad:
                raise FuncaccumError(_DETACHED)
            grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
        return optree.tree_unflatten(treedef, list(grads)), output

    return value_and_grad


def _func_value_and_grad(
    forward: Callable[..., tuple[torch.Tensor, MicrobatchOutput]],
) -> ValueAndGrad:
    """One microbatch's gradient by :func:`torch.func.grad`, for ``vmap`` and a traced step."""

    def checked(
        params: PyTree, model_state: PyTree, microbatch: PyTree, size: int
    ) -> tuple[torch.Tensor, MicrobatchOutput]:
        loss, output = forward(params, model_state, microbatch, size)
        if not loss.requires_grad:
            raise FuncaccumError(_DETACHED)
        return loss, output

    def value_and_grad(
        params: PyTree, model_state: PyTree, microbatch: PyTree, size: int
    ) -> tuple[PyTree, MicrobatchOutput]:
        grads, (_, output) = grad_and_value(checked, has_aux=True)(
            params, model_state, microbatch, size
        )
        return grads, output

    return value_and_grad
