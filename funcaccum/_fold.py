"""The pieces a strategy folds microbatches with: the loss's parts, its gradient, the add."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import optree
import torch
from torch.func import grad_and_value

from ._errors import FuncaccumError
from ._functional import hold_parametrizations
from ._tree import PyTree

if TYPE_CHECKING:
    from ._accumulate import Accumulation

__all__ = ["FoldState", "Folder", "LossFn", "MicrobatchOutput", "compiled"]

LossFn = Callable[..., Any]


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


class MicrobatchOutput(NamedTuple):
    """What the loss gave for one microbatch (or, stacked, for several), besides its gradient.

    Attributes:
        loss: the microbatch's mean loss, detached.
        weight: its weight: examples, or what a ``has_weight`` loss returned.
        aux: its auxiliary outputs; ``()`` without ``has_aux``.
        model_state: the model state it left; ``()`` without ``has_state``.
    """

    loss: torch.Tensor
    weight: torch.Tensor
    aux: Any = ()
    model_state: Any = ()


def compiled(fn: Callable[..., Any], enabled: bool = True) -> Callable[..., Any]:
    """``fn`` compiled as funcaccum compiles (one whole graph, static shapes), or ``fn``."""
    return torch.compile(fn, fullgraph=True, dynamic=False) if enabled else fn


def _pair(out: Any, flag: str) -> tuple[Any, Any]:
    if not (isinstance(out, tuple) and len(out) == 2):
        raise FuncaccumError(
            f"with {flag}=True, loss_fn must return a pair, got {type(out).__name__}"
        )
    return out


_DETACHED = (
    "the loss does not depend on the params: loss_fn detached it (.detach(), .item(), "
    "torch.no_grad()) or never used params, so every gradient would be zero"
)

Forward = Callable[[PyTree, PyTree, PyTree, int], tuple[torch.Tensor, MicrobatchOutput]]
ValueAndGrad = Callable[[PyTree, PyTree, PyTree, int], tuple[PyTree, MicrobatchOutput]]


class Folder:
    """What a :class:`~funcaccum.Strategy` builds its group runner from.

    One is made per loss, :class:`~funcaccum.Accumulation` and compile
    setting, and a strategy's ``build`` is called with it once, so whatever
    the strategy compiles is compiled once. Every gradient function takes
    ``(params, model_state, microbatch, size)``, where ``microbatch`` has
    ``size`` examples along its leading axis (``model_state`` is ``()``
    without ``has_state``), and returns ``(grads, output)`` with a
    :class:`MicrobatchOutput`.

    Attributes:
        loss_fn: the loss as the user wrote it.
        options: the accumulation's options (reducer, flags, split).
        grad: the gradient by :func:`torch.func.grad`: use it under
            :func:`torch.func.vmap` or inside a traced (compiled) region.
        autograd: the gradient by plain autograd on fresh leaves, the loss
            compiled when the step is: for one microbatch at a time, eagerly.
        add: ``add(state, grads, output) -> state``: fold one microbatch (0-d
            weight) or a stacked chunk into a :class:`FoldState`, compiled with
            ``compile_update``.
        compile_enabled: whether :meth:`compile` compiles.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        options: Accumulation,
        *,
        compile: bool = False,
        compile_update: bool = False,
    ) -> None:
        self.loss_fn = loss_fn
        self.options = options
        self.compile_enabled = compile
        forward = self._forward
        self.grad: ValueAndGrad = _func_value_and_grad(forward)
        self.autograd: ValueAndGrad = _autograd_value_and_grad(compiled(forward, compile))
        self.add: Callable[[FoldState, PyTree, MicrobatchOutput], FoldState] = compiled(
            self._add, compile_update
        )

    def compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` compiled if this step compiles its loss, else ``fn``."""
        return compiled(fn, self.compile_enabled)

    def _forward(
        self, params: PyTree, model_state: PyTree, microbatch: PyTree, size: int
    ) -> tuple[torch.Tensor, MicrobatchOutput]:
        """The loss and its output, the loss checked: 0-d, floating, with a 0-d weight."""
        options = self.options
        microbatch = options.to_layout(microbatch)
        new_state: Any = ()
        if options.has_state:
            out, new_state = _pair(self.loss_fn(params, model_state, microbatch), "has_state")
            new_state = optree.tree_map(torch.Tensor.detach, new_state)
        else:
            out = self.loss_fn(params, microbatch)
        aux: Any = ()  # vmap and scan need tensor outputs; () stands for "no aux"
        if options.has_aux:
            out, aux = _pair(out, "has_aux")
        loss, weight = _pair(out, "has_weight") if options.has_weight else (out, size)
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
        return loss, MicrobatchOutput(loss.detach(), weight, aux, new_state)

    def _add(self, state: FoldState, grads: PyTree, output: MicrobatchOutput) -> FoldState:
        weight = output.weight.to(state.weight_sum.dtype)
        present = weight != 0
        if self.options.has_weight:
            # A microbatch the loss gives zero weight (all padding) adds exactly nothing,
            # even when its loss and gradient are 0/0 = NaN.
            grads = optree.tree_map(
                lambda g: torch.where(
                    present.reshape(present.shape + (1,) * (g.ndim - present.ndim)), g, 0
                ),
                grads,
            )
        weighted_loss = torch.where(present, weight * output.loss.to(weight.dtype), 0)
        return FoldState(
            self.options.reducer.update(state.reducer, grads, weight),
            state.loss_sum + weighted_loss.sum(),
            state.weight_sum + weight.sum(),
        )


def _autograd_value_and_grad(forward: Forward) -> ValueAndGrad:
    """One microbatch's gradient by plain autograd, on fresh leaves that alias the params.

    Eagerly this is the hand-written loop's forward and backward, without the
    per-op cost of the ``torch.func`` transforms; it also lets ``forward`` be a
    compiled function (forward and backward graphs, as ``torch.compile(model)``
    gives the loop), and activation checkpointing and compiled regions work
    inside the loss. The params are not modified: the leaves are new tensor
    objects, and ``torch.autograd.grad`` returns the gradients instead of
    writing ``.grad``.
    """

    def value_and_grad(
        params: PyTree, model_state: PyTree, microbatch: PyTree, size: int
    ) -> tuple[PyTree, MicrobatchOutput]:
        leaves, treedef = optree.tree_flatten(params)
        inputs = [leaf.detach().requires_grad_() for leaf in leaves]
        # The backward runs with the forward's params in place (checkpointing recomputes).
        with torch.enable_grad(), hold_parametrizations():
            loss, output = forward(
                optree.tree_unflatten(treedef, inputs), model_state, microbatch, size
            )
            if not loss.requires_grad:
                raise FuncaccumError(_DETACHED)
            grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
        return optree.tree_unflatten(treedef, list(grads)), output

    return value_and_grad


def _func_value_and_grad(forward: Forward) -> ValueAndGrad:
    """One microbatch's gradient by :func:`torch.func.grad`, for ``vmap`` and a traced scan."""

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
