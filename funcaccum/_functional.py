"""From an ``nn.Module`` to a pure function of parameter and buffer pytrees."""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from ._compile import regions_wanted
from ._errors import FuncaccumError
from ._validate import describe

__all__ = ["functional_model", "hold_parametrizations", "load_into", "refuse_sharded"]

Apply = Callable[..., Any]

# Where apply() leaves its reparametrizations open, while hold_parametrizations() runs.
_held = threading.local()


class hold_parametrizations:  # noqa: N801  (a context manager, named as one is used)
    """Keep every module ``apply`` reparametrizes in this block so until the block ends.

    ``torch.func.functional_call`` swaps the params in for one forward call and
    swaps them out again before the backward runs. Activation checkpointing
    recomputes the forward during the backward and reads the module's
    attributes then: outside the swap, the module's own (stale) weights, and a
    silently wrong gradient. funcaccum runs each microbatch's forward and
    backward inside this block, so the recomputation sees the same params.
    (A class, not a generator: it is entered once per microbatch.)
    """

    __slots__ = ("outer",)

    def __enter__(self) -> None:
        self.outer = getattr(_held, "exits", None)
        _held.exits = []

    def __exit__(self, *exc: object) -> None:
        exits, _held.exits = _held.exits, self.outer
        for exit_ in reversed(exits):
            exit_()


class _Slots:
    """Where each of a module's tensors lives, found once, to swap values in per call.

    ``torch.func.functional_call`` finds them again on every call (it walks the
    module tree to untie shared weights), which costs more than a small
    model's microbatch. This holds, for every parameter and buffer name, tied
    aliases included, the dict it lives in and its key there, so a swap is a
    dict assignment per tensor, as torch's own swap does, undone afterwards.
    A call whose names differ from the module's, or a traced call, goes
    through ``functional_call``'s own path.
    """

    def __init__(self, module: nn.Module) -> None:
        canonical: dict[int, str] = {}
        self.slots: list[tuple[str, dict[str, Any], str]] = []
        members = [
            *((n, t, "_parameters") for n, t in module.named_parameters(remove_duplicate=False)),
            *((n, t, "_buffers") for n, t in module.named_buffers(remove_duplicate=False)),
        ]
        for name, tensor, where in members:
            owner, _, attr = name.rpartition(".")
            store = getattr(module.get_submodule(owner), where)
            # A tied tensor takes the value given for its first name, as tie_weights=True does.
            self.slots.append((canonical.setdefault(id(tensor), name), store, attr))
        self.names = set(canonical.values())

    def fits(self, values: dict[str, torch.Tensor]) -> bool:
        """Whether ``values`` names exactly the module's tensors (each tie once)."""
        return len(values) == len(self.names) and values.keys() == self.names

    @contextlib.contextmanager
    def swap(self, values: dict[str, torch.Tensor]) -> Iterator[None]:
        saved = [(store, attr, store[attr]) for _, store, attr in self.slots]
        try:
            for name, store, attr in self.slots:
                store[attr] = values[name]
            yield
        finally:
            for store, attr, original in reversed(saved):
                store[attr] = original


class _Regions:
    """A module's repeated blocks, compiled once each when a step asks (``compile="regions"``).

    A block is a child of an ``nn.ModuleList`` that shares its class with a
    sibling (a transformer's layers). Each block gets its own compiled call,
    made at first use, but they share one traced graph: Dynamo guards a block
    by the layout of its tensors, not their identity, so the siblings and the
    tensors swapped in at every call reuse it. The module itself is not
    changed outside a call: the compiled calls are engaged (as
    ``nn.Module.compile`` engages one) while the call runs, and taken off after.

    A region is compiled through its own attributes, not through
    ``torch.compiler.nested_compile_region``: that reuses the first block's
    traced subgraph with the first block's tensors for every sibling when the
    tensors were swapped in (``functional_call``), a silently wrong result
    (docs/concepts.md, "Compiling", has the reproduction).
    """

    def __init__(self, module: nn.Module) -> None:
        self.blocks: list[nn.Module] = []
        for sub in module.modules():
            if isinstance(sub, nn.ModuleList):
                kinds = [type(child) for child in sub]
                self.blocks += [child for child in sub if kinds.count(type(child)) > 1]
        self.calls: dict[int, Callable[..., Any]] = {}

    @contextlib.contextmanager
    def engaged(self) -> Iterator[None]:
        if not self.blocks or not regions_wanted():
            yield
            return
        for block in self.blocks:
            call = self.calls.get(id(block))
            if call is None:
                call = _quietly(torch.compile(block._call_impl, fullgraph=True, dynamic=False))
                self.calls[id(block)] = call
            block._compiled_call_impl = call
        try:
            yield
        finally:
            for block in self.blocks:
                block._compiled_call_impl = None


def _quietly(compiled_call: Callable[..., Any]) -> Callable[..., Any]:
    """A compiled block's call without the warning Dynamo raises reading its input's ``.grad``.

    A block after the first takes a non-leaf input; tracing it, Dynamo (torch
    2.13) reads the input's ``.grad`` and torch warns that a non-leaf's
    ``.grad`` is never filled, which is true and concerns nothing funcaccum does.
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NON_LEAF_GRAD, category=UserWarning)
            return compiled_call(*args, **kwargs)

    return call


_NON_LEAF_GRAD = "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed"


def _sharded_part(module: nn.Module) -> str | None:
    """Where ``module`` is sharded: its first FSDP2 submodule or DTensor tensor, or None.

    Neither can exist before torch's FSDP or DTensor module was imported, so
    nothing is imported here (importing them takes about half a second).
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    dtensor = sys.modules.get("torch.distributed.tensor")
    if fsdp is not None:
        for name, sub in module.named_modules():
            if isinstance(sub, fsdp.FSDPModule):
                which = f"its submodule {name!r}" if name else "the module itself"
                return f"{which} went through FSDP2's fully_shard"
    if dtensor is not None:
        tensors = [*module.named_parameters(), *module.named_buffers()]
        for name, tensor in tensors:
            if isinstance(tensor, dtensor.DTensor):
                return f"the DTensor {name!r}"
    return None


def refuse_sharded(module: object, what: str) -> None:
    """Raise if ``module`` is sharded by FSDP2 or holds DTensor parameters or buffers.

    :func:`torch.func.functional_call` on such a module ignores the params it
    is given (FSDP's hooks swap in their own), so every gradient would come
    back zero without an error; ``what`` names the caller in the message.
    """
    if not isinstance(module, nn.Module):
        return
    where = _sharded_part(module)
    if where is not None:
        raise FuncaccumError(
            f"{what} cannot take a sharded module ({where}): torch.func.functional_call on a "
            "module sharded with FSDP2 ignores the params it is given, so the gradients would "
            "come back zero without an error. Train it with "
            "funcaccum.distributed.FullyShardedStep(module, loss_fn, ...), which runs each "
            "microbatch's backward through FSDP's own hooks (docs/scaling.md, \"Sharded "
            'parameters").'
        )


def _batch_norms_in_training(module: nn.Module) -> list[str]:
    """Batch norms that write running statistics (one with ``track_running_stats=False`` keeps
    none: it normalises each call with its batch's statistics, in either mode)."""
    return [
        name or type(module).__name__
        for name, sub in module.named_modules()
        if isinstance(sub, nn.modules.batchnorm._BatchNorm)
        and sub.training
        and sub.track_running_stats
    ]


def _modes(modules: list[nn.Module]) -> list[bool]:
    return [sub.training for sub in modules]


def _mode_error(module: nn.Module, captured: list[bool]) -> FuncaccumError:
    changed = [
        (name or type(module).__name__, was)
        for (name, sub), was in zip(module.named_modules(), captured, strict=True)
        if sub.training != was
    ]
    was = changed[0][1]
    now, then = ("eval", "training") if was else ("training", "eval")
    fix = "model.train()" if was else "model.eval()"
    return FuncaccumError(
        f"the module was made functional in {then} mode and is now in {now} mode (at "
        f"{[n for n, _ in changed][:3]}): model.{'eval' if was else 'train'}() was called "
        f"since. Its apply runs the mode it was made in, and only that one, so that it never "
        f"trains in eval mode (no dropout, frozen batch norm) nor writes running statistics "
        f"into the module's buffers by mistake: call {fix} before using it again; to run the "
        f"module in the other mode, make an apply for it: "
        f"functional_model(model.{'eval' if was else 'train'}())."
    )


def _mismatch(
    module: nn.Module,
    params: Any,
    buffers: Any,
    expected: dict[str, torch.Tensor],
    error: BaseException,
) -> FuncaccumError | None:
    """Why ``params`` and ``buffers`` do not fit ``module``, or None (for an error's message)."""
    for name, given in (("params", params), ("buffers", buffers)):
        if not isinstance(given, dict):
            return FuncaccumError(
                f"apply(params, buffers, ...) takes dicts of tensors by name (what "
                f"functional_model returned); {name} is {describe(given)}"
            )
    given = {**params, **buffers}
    missing = sorted(expected.keys() - given.keys())
    extra = sorted(given.keys() - expected.keys())
    if missing or extra:
        return FuncaccumError(
            f"the params and buffers (the step's model_state) given to apply do not fit the "
            f"{type(module).__name__}: missing {missing[:5]}, not in the module {extra[:5]}. "
            "Pass the trees functional_model returned (or a state of the same module)"
        )
    dtypes = {
        v.dtype for v in given.values() if isinstance(v, torch.Tensor) and v.is_floating_point()
    }
    for name, want in expected.items():
        got = given[name]
        if not isinstance(got, torch.Tensor):
            return FuncaccumError(f"apply: {name!r} must be a tensor, got {describe(got)}")
        if got.shape != want.shape:
            return FuncaccumError(
                f"apply: {name!r} has shape {tuple(got.shape)}, where the module's is "
                f"{tuple(want.shape)}: a state of another model?"
            )
        about_dtypes = any(word in str(error) for word in ("dtype", "scalar type"))
        if about_dtypes and len(dtypes) > 1 and got.dtype != want.dtype and got.is_floating_point():
            return FuncaccumError(
                f"apply: {name!r} is {got.dtype}, where the module's is {want.dtype}, beside "
                f"tensors of {sorted(str(d) for d in dtypes - {got.dtype})}, and torch "
                f"refused the mix ({str(error).splitlines()[0]}): give params and buffers "
                "one dtype (module.to(dtype) first)"
            )
    return None


_ONE_VALUE = "Expected more than 1 value per channel"


def _check_module(module: object) -> None:
    refuse_sharded(module, "functional_model")
    if isinstance(module, type):
        raise FuncaccumError(
            f"functional_model needs a module instance, got the class {module.__name__}: "
            f"make one first, functional_model({module.__name__}(...))"
        )
    if not isinstance(module, nn.Module):
        hint = (
            ": a plain function has no parameters; write the loss as loss_fn(params, batch) "
            "and give the params to accumulate or train_step directly"
            if callable(module)
            else ""
        )
        raise FuncaccumError(
            f"functional_model needs a torch.nn.Module, got {describe(module)}{hint}"
        )
    if not any(p.requires_grad for p in module.parameters()):
        # torch.optim refuses an empty parameter list; training nothing is a mistake here too.
        raise FuncaccumError(
            f"the {type(module).__name__} has no trainable parameters (none with "
            "requires_grad=True), so there is nothing to train"
        )


def functional_model(
    module: nn.Module, *, has_state: bool = False
) -> tuple[Apply, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a module into a pure ``apply`` and its ``params`` and ``buffers`` pytrees.

    ``apply(params, buffers, *args, **kwargs)`` runs ``module.forward`` through
    :func:`torch.func.functional_call`, so a loss can be a pure function
    ``loss_fn(params, batch)`` that closes over ``apply`` and ``buffers``.

    ``params`` holds the trainable parameters (``requires_grad=True``), detached:
    they share storage with the module, as in the :mod:`torch.func` examples, and
    funcaccum never writes into them. Frozen parameters go with the buffers.
    Tied weights appear once. :func:`load_into` writes trained values back.

    The train/eval mode of every submodule is captured with the module and
    checked at every call: after ``module.eval()`` (for an evaluation, say)
    ``apply`` refuses to run until ``module.train()`` restores the mode it was
    made in, so a step never trains in eval mode by mistake, nor does an
    ``apply`` made in eval mode write running statistics into the module's
    buffers. Make one ``apply`` per mode if you need both.

    Batch norm in training mode normalises each microbatch with its own
    statistics and updates its running statistics in place, so it is model
    state. With ``has_state=True``, ``apply(params, buffers, *args)`` returns
    ``(output, new_buffers)``: the forward runs on fresh copies of the
    buffers, which it may update (the caller's tensors are never written), and
    those copies come back as the new state. A loss built on it declares
    ``has_state=True`` to :func:`~funcaccum.train_step`, which feeds each
    microbatch the state the one before it left, as the hand-written loop
    does. Without ``has_state``, such a module is refused: call
    ``module.eval()`` to normalise with the running statistics, or use a
    per-example norm (LayerNorm, GroupNorm). A batch norm with
    ``track_running_stats=False`` keeps no state, and is accepted without
    ``has_state``: each microbatch is normalised with its own statistics,
    as in a hand-written loop (not the full batch's gradient).

    Args:
        module: the model.
        has_state: ``apply`` also returns the buffers the forward updated.

    Returns:
        ``(apply, params, buffers)``.

    Raises:
        FuncaccumError: ``module`` is not an ``nn.Module`` instance, it has no
            trainable parameters, a batch-norm layer that tracks running
            statistics is in training mode and ``has_state`` is False, or it
            is sharded (FSDP2's ``fully_shard``, DTensor parameters): train
            that with :class:`funcaccum.distributed.FullyShardedStep`; from
            ``apply``, a mode changed since, or params and buffers that do not
            fit the module (named).

    Example:
        >>> model = nn.Linear(3, 2)
        >>> apply, params, buffers = functional_model(model)
        >>> sorted(params)
        ['bias', 'weight']
        >>> x = torch.randn(5, 3)                       # (batch, features)
        >>> apply(params, buffers, x).shape             # (batch, outputs)
        torch.Size([5, 2])
        >>> bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> apply, params, state = functional_model(bn, has_state=True)
        >>> out, new_state = apply(params, state, x)
        >>> int(new_state["1.num_batches_tracked"]), int(state["1.num_batches_tracked"])
        (1, 0)
    """
    _check_module(module)
    if (names := _batch_norms_in_training(module)) and not has_state:
        raise FuncaccumError(
            f"batch norm in training mode at {names}: it normalises each microbatch with its "
            "own statistics and writes running statistics into its buffers. Use "
            "functional_model(module, has_state=True) and a loss with has_state=True to train "
            "it as a hand-written loop does, call module.eval() to normalise with the running "
            "statistics, or replace it with a per-example norm (LayerNorm, GroupNorm)."
        )
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in module.named_buffers()}
    state_names = set(buffers)
    buffers |= {n: p.detach() for n, p in module.named_parameters() if not p.requires_grad}
    expected = {**params, **buffers}
    # The train/eval flag of every submodule is part of the function: captured now, checked
    # at every call (a Python comparison, no device work).
    modules = list(module.modules())
    captured = _modes(modules)

    slots, regions = _Slots(module), _Regions(module)

    def forward(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                args: tuple, kwargs: dict) -> Any:  # fmt: skip
        values = {**params, **buffers}
        swap = (
            slots.swap(values)
            if slots.fits(values) and not torch.compiler.is_compiling()
            else _reparametrize_module(module, values, tie_weights=True, strict=True)
        )
        exits = getattr(_held, "exits", None)
        if exits is None or torch.compiler.is_compiling():
            with swap, regions.engaged():  # functional_call's own behaviour
                return module(*args, **kwargs)
        swap.__enter__()
        exits.append(lambda: swap.__exit__(None, None, None))
        with regions.engaged():
            return module(*args, **kwargs)

    def call(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
             args: tuple, kwargs: dict) -> Any:  # fmt: skip
        if _modes(modules) != captured:
            raise _mode_error(module, captured)
        if torch.compiler.is_compiling():
            return forward(params, buffers, args, kwargs)
        try:
            return forward(params, buffers, args, kwargs)
        except (RuntimeError, ValueError, TypeError, AttributeError, KeyError) as error:
            if isinstance(error, FuncaccumError):
                raise
            mismatch = _mismatch(module, params, buffers, expected, error)
            if mismatch is not None:
                raise mismatch from error
            if _ONE_VALUE in str(error):
                raise FuncaccumError(
                    f"batch norm in training mode got one value per channel ({error}): a "
                    "microbatch of one example has no batch statistics. Use microbatches of "
                    "2 or more examples (a larger microbatch_size, fewer num_microbatches; "
                    "a batch of one example: DataLoader(drop_last=True)), module.eval() to "
                    "normalise with the running statistics, or a per-example norm "
                    "(LayerNorm, GroupNorm)"
                ) from error
            raise

    if not has_state:

        def apply(
            params: dict[str, torch.Tensor],
            buffers: dict[str, torch.Tensor],
            *args: Any,
            **kwargs: Any,
        ) -> Any:
            return call(params, buffers, args, kwargs)

        return apply, params, buffers

    def apply_with_state(
        params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], *args: Any, **kwargs: Any
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        if not isinstance(buffers, dict):
            raise FuncaccumError(
                "apply(params, buffers, ...) takes the buffers (a step's model_state) as a dict by "
                f"name, as functional_model returned them; got {describe(buffers)}"
            )
        # The module updates buffers in place: give it copies, and return them.
        fresh = {n: b.clone() if n in state_names else b for n, b in buffers.items()}
        return call(params, fresh, args, kwargs), fresh

    return apply_with_state, params, buffers


def load_into(
    module: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Write trained ``params`` (and ``buffers``) back into ``module``, in place.

    The inverse of :func:`functional_model`: after training, the module (for
    ``module(x)``, ``state_dict()``, saving or export) holds ``state.params``
    and, for a step with ``has_state``, ``state.model_state``. Tied weights
    stay tied (the shared parameter is written once). Names, shapes and
    dtypes must match the module's exactly.

    Args:
        module: the module ``params`` came from.
        params: parameter values by name, such as ``TrainState.params``.
        buffers: buffer (or frozen parameter) values by name, or None.

    Returns:
        ``module``.

    Raises:
        FuncaccumError: a name the module does not have, a shape or dtype
            that differs, or a sharded module (FSDP2: use
            ``FullyShardedStep.load_into(state)``).

    Example:
        >>> model = nn.Linear(2, 1)
        >>> apply, params, buffers = functional_model(model)
        >>> trained = {k: v + 1 for k, v in params.items()}
        >>> _ = load_into(model, trained)
        >>> torch.equal(model.weight, trained["weight"])
        True
    """
    refuse_sharded(module, "load_into")
    targets: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    targets |= dict(module.named_buffers(remove_duplicate=False))
    values = {**params, **(buffers or {})}
    for name, value in values.items():
        if name not in targets:
            raise FuncaccumError(
                f"load_into: the {type(module).__name__} has no parameter or buffer {name!r}"
            )
        target = targets[name]
        if target.shape != value.shape or target.dtype != value.dtype:
            raise FuncaccumError(
                f"load_into: {name!r} is {tuple(target.shape)} {target.dtype} in the module, "
                f"got {tuple(value.shape)} {value.dtype}"
            )
    with torch.no_grad():
        for name, value in values.items():
            targets[name].copy_(value)
    return module
