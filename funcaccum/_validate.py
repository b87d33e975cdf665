"""Checks for arguments and states, shared so every refusal reads the same.

Each check raises :class:`~funcaccum.FuncaccumError` with a message that names
the argument, what it accepts, and what it got; none raises a bare
``TypeError`` or ``ValueError``. The checks run where a value enters (a
factory, ``init``, ``set_hyperparams``), so a bad value fails there, not as a
NaN many steps later. The ones that run inside a step (:func:`check_state`)
are pure-Python ``isinstance`` tests, which cost nothing under
``torch.compile``.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable
from typing import Any

import optree
import torch

from ._errors import FuncaccumError
from ._tree import PyTree, leaf_paths

__all__ = [
    "HYPERPARAM_RULES",
    "check_bool",
    "check_callable",
    "check_dtype",
    "check_hyperparam",
    "check_int",
    "check_params",
    "check_real",
    "check_state",
    "describe",
    "maker_of",
]


def describe(value: object) -> str:
    """``value`` for a message: its repr, and its type where the repr does not show it.

    >>> describe(0.5), describe("0.5"), describe(torch.zeros(2))
    ('0.5', "'0.5' (a str)", 'a tensor of shape (2,)')
    """
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 and not value.is_meta:
            return f"{value!r} (a 0-d tensor)"
        return f"a tensor of shape {tuple(value.shape)}"
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{shown} (a {type(value).__name__})"


def _interval(
    low: float | None, high: float | None, low_inclusive: bool, high_inclusive: bool
) -> str:
    if low is not None and high is not None:
        left, right = "[" if low_inclusive else "(", "]" if high_inclusive else ")"
        return f" in {left}{low}, {high}{right}"
    if low is not None:
        return f" {'>=' if low_inclusive else '>'} {low}"
    if high is not None:
        return f" {'<=' if high_inclusive else '<'} {high}"
    return ""


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_none: bool = False,
    allow_schedule: bool = False,
) -> Any:
    """Raise unless ``value`` is a finite real number in the range; return it unchanged.

    A Python number (not a bool) or a 0-d real tensor passes; with
    ``allow_schedule`` any callable passes too (a schedule of the step count,
    whose values cannot be known before it runs), with ``allow_none`` None.
    Under ``torch.compile`` a tensor's value is not read (that would break the
    graph); only its shape and dtype are checked.

    >>> check_real("lr", 0.1, low=0)
    0.1
    >>> check_real("b1", 1.0, low=0, high=1, high_inclusive=False)
    Traceback (most recent call last):
    ...
    funcaccum._errors.FuncaccumError: b1 must be in [0, 1) (a Python number or a 0-d tensor), \
got 1.0
    """
    if value is None and allow_none:
        return value
    if allow_schedule and callable(value) and not isinstance(value, torch.Tensor):
        return value
    accepted = "a Python number or a 0-d tensor"
    if allow_schedule:
        accepted = "a Python number, a 0-d tensor or a schedule"
    if allow_none:
        accepted += ", or None"
    if low is not None and high is not None:
        what = _interval(low, high, low_inclusive, high_inclusive)
    elif low is not None or high is not None:
        what = f"{_interval(low, high, low_inclusive, high_inclusive)} and finite"
    else:
        what = " a finite number"
    message = f"{name} must be{what} ({accepted}), got {describe(value)}"
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or value.is_meta or value.dtype == torch.bool or value.is_complex():
            raise FuncaccumError(message)
        if torch.compiler.is_compiling():
            return value
        number = value.item()
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    else:
        raise FuncaccumError(message)
    ok = math.isfinite(number)
    if ok and low is not None:
        ok = number >= low if low_inclusive else number > low
    if ok and high is not None:
        ok = number <= high if high_inclusive else number < high
    if not ok:
        raise FuncaccumError(message)
    return value


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """Raise unless ``value`` is an int (not a bool, not a float) in ``[low, high]``; return it.

    >>> check_int("transition_steps", 10, low=1)
    10
    >>> check_int("num_examples", 10.5, low=1)
    Traceback (most recent call last):
    ...
    funcaccum._errors.FuncaccumError: num_examples must be an int >= 1, got 10.5
    """
    interval = _interval(low, high, True, True)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise FuncaccumError(f"{name} must be an int{interval}, got {describe(value)}")
    number = int(value)
    if (low is not None and number < low) or (high is not None and number > high):
        raise FuncaccumError(f"{name} must be{interval}, got {value}")
    return number


def check_bool(name: str, value: Any) -> bool:
    """Raise unless ``value`` is True or False (a truthy string is not a flag); return it."""
    if not isinstance(value, bool):
        raise FuncaccumError(f"{name} must be True or False, got {describe(value)}")
    return value


def check_dtype(name: str, value: Any, *, allow_none: bool = True) -> torch.dtype | None:
    """Raise unless ``value`` is a floating-point ``torch.dtype`` (or None); return it.

    A sum kept in an integer dtype would truncate every gradient, so only
    floating dtypes are accepted; a string such as ``"float32"`` gets a hint.

    >>> check_dtype("accum_dtype", torch.float64)
    torch.float64
    >>> check_dtype("accum_dtype", "float32")
    Traceback (most recent call last):
    ...
    funcaccum._errors.FuncaccumError: accum_dtype must be a floating-point torch.dtype \
(such as torch.float32) or None, got 'float32' (a str); use torch.float32
    """
    if value is None and allow_none:
        return value
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    hint = ""
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        hint = f"; use torch.{value}"
    raise FuncaccumError(
        f"{name} must be a floating-point torch.dtype (such as torch.float32)"
        f"{' or None' if allow_none else ''}, got {describe(value)}{hint}"
    )


# The accepted range of each optimizer hyperparameter, by name: the factories
# and set_hyperparams check with the same rules, so no route lets a bad value in.
HYPERPARAM_RULES: dict[str, dict[str, Any]] = {
    "learning_rate": {"low": 0},
    "b1": {"low": 0, "high": 1, "high_inclusive": False},
    "b2": {"low": 0, "high": 1, "high_inclusive": False},
    "momentum": {"low": 0, "high": 1, "high_inclusive": False},
    "weight_decay": {"low": 0},
    "eps": {"low": 0},
    "max_norm": {"low": 0, "low_inclusive": False},
}


def check_hyperparam(name: str, value: Any, *, allow_schedule: bool = False) -> Any:
    """:func:`check_real` with the range :data:`HYPERPARAM_RULES` gives ``name`` (else finite).

    >>> check_hyperparam("momentum", -0.9)
    Traceback (most recent call last):
    ...
    funcaccum._errors.FuncaccumError: momentum must be in [0, 1) (a Python number or a 0-d \
tensor), got -0.9
    """
    return check_real(name, value, allow_schedule=allow_schedule, **HYPERPARAM_RULES.get(name, {}))


_FLOAT8 = {getattr(torch, name) for name in dir(torch) if name.startswith("float8_")}


def _bad_param(leaf: Any) -> str | None:
    """Why ``leaf`` cannot be an optimized param, or None if it can."""
    if not isinstance(leaf, torch.Tensor):
        hint = " (convert it with torch.from_numpy)" if type(leaf).__module__ == "numpy" else ""
        return f"is a {type(leaf).__name__}{hint}; params must be torch tensors"
    if not leaf.is_floating_point():
        return (
            f"is a {leaf.dtype} tensor; only floating-point params can be optimized "
            "(keep integer tensors out of params, as buffers or in the batch)"
        )
    if leaf.dtype in _FLOAT8:
        return (
            f"is a {leaf.dtype} tensor, which has no arithmetic to train in; keep float32 "
            "params and cast them in the loss"
        )
    if leaf.is_meta:
        return (
            "is on the meta device, where it holds no values; materialise the model first "
            "(module.to_empty(device=...) and initialise it)"
        )
    return None


def check_params(params: PyTree, root: str = "params") -> None:
    """Raise, naming the leaf's path, unless every leaf is a floating tensor with storage.

    None leaves are absent params (see :mod:`funcaccum.tree`) and pass.

    >>> check_params({"w": torch.zeros(2), "steps": torch.tensor(3)})
    Traceback (most recent call last):
    ...
    funcaccum._errors.FuncaccumError: params['steps'] is a torch.int64 tensor; ...
    """
    # Fast path: walk the leaves without building paths; paths only for the message.
    if all(_bad_param(leaf) is None for leaf in optree.tree_leaves(params)):
        return
    for path, leaf in leaf_paths(params, root):
        if (why := _bad_param(leaf)) is not None:
            raise FuncaccumError(f"{path} {why}")


_MADE_BY = re.compile(r"State of :func:`~?(?:[\w.]+\.)?(\w+)`")


def maker_of(state_type: type) -> str | None:
    """The factory whose ``init`` makes ``state_type``, read from its docstring, or None.

    Every state class's docstring begins "State of :func:`maker`".

    >>> from funcaccum.extend import ClippedMeanState
    >>> maker_of(ClippedMeanState)
    'clipped_mean()'
    """
    found = _MADE_BY.match(state_type.__doc__ or "")
    return f"{found.group(1)}()" if found else None


def check_state(
    state: Any, expected: type | tuple[type, ...], *, owner: str, role: str = "update"
) -> None:
    """Raise unless ``state`` is an ``expected`` (a NamedTuple state type); trace-safe.

    Args:
        state: what the caller passed as the state.
        expected: the state type(s) that ``owner``'s init makes.
        owner: who is checking, for the message, such as ``"mean()"``.
        role: the function that got the state (``"update"``, ``"finalize"``, ``"fold"``).

    >>> from funcaccum.extend import MeanState
    >>> check_state({"w": torch.zeros(1)}, MeanState, owner="mean()", role="finalize")
    Traceback (most recent call last):
    ...
    funcaccum._errors.FuncaccumError: mean()'s finalize got dict where its own MeanState ...
    """
    if isinstance(state, expected):
        return
    wanted = expected if isinstance(expected, tuple) else (expected,)
    names = " or ".join(t.__name__ for t in wanted)
    maker = maker_of(type(state)) if isinstance(state, tuple) else None
    if maker is not None:
        hint = f"; that state was made by {maker}, so use {maker}'s {role}"
    elif isinstance(state, dict) and role == "update":
        hint = "; a dict looks like params or gradients: it is update(updates, state, params)"
    else:
        hint = f"; pass the state that {owner}'s init returned"
    raise FuncaccumError(
        f"{owner}'s {role} got {type(state).__name__} where its own {names} belongs{hint}"
    )


def check_callable(name: str, value: Any, what: str) -> Callable[..., Any]:
    """Raise unless ``value`` is callable; ``what`` says what it should be."""
    if not callable(value):
        raise FuncaccumError(f"{name} must be {what}, got {describe(value)}")
    return value
