"""Gradient transformations: optimizers as pure ``init``/``update`` functions."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch

from .._errors import FuncaccumError
from .._tree import PyTree, foreach_map, tree_device
from .._validate import check_hyperparam, check_params, check_state, describe

__all__ = [
    "GradientTransformation",
    "Schedule",
    "ScheduleStep",
    "apply_updates",
    "chain",
    "checked",
    "get_hyperparams",
    "hyperparams",
    "set_hyperparams",
    "with_checks",
    "with_extra_args_support",
]

Schedule = Callable[[torch.Tensor], torch.Tensor]
"""A function of the optimizer-step count (0-d int64 tensor) to a 0-d float64 value."""

ScheduleStep = torch.Tensor | None
"""What schedules read instead of their own step count, or None: their own count."""

# Hyperparameters are 0-d float64 tensors: changing one changes no graph (no
# recompile), and scalar arithmetic such as Adam's bias corrections stays
# exact; multiplying a float32 tensor by a 0-d float64 tensor stays float32.
HYPERPARAM_DTYPE = torch.float64


class _Init(Protocol):
    def __call__(self, params: PyTree) -> Any: ...


Update = Callable[..., tuple[PyTree, Any]]
"""``update(updates, state, params=None, **extra_args) -> (updates, state)``; a rule may take
only the first three, or name the extra keywords it reads (``schedule_step``)."""


class GradientTransformation(NamedTuple):
    """An update rule as two pure functions (the optax interface).

    Attributes:
        init: ``init(params) -> state``, a NamedTuple of tensors.
        update: ``update(updates, state, params=None, **extra_args) ->
            (updates, state)``; the incoming updates are gradients, the
            outgoing ones are added to the params by :func:`apply_updates`.
            Extra arguments come by keyword, as in optax, and a rule takes
            only those it names: funcaccum's schedules read
            ``schedule_step=``, a value to read instead of their own step
            count (``train_step(schedule_clock="progress")`` passes the
            reducer's :attr:`~funcaccum.extend.Control.progress`). A rule
            written as optax writes one, ``update(updates, state,
            params=None)``, works in :func:`chain` and in
            :func:`~funcaccum.train_step` as it is.

    Example:
        A rule that flips the gradient's sign (the learning rate comes later in a chain):

        >>> from funcaccum import optim
        >>> def update(updates, state, params=None):
        ...     return {k: -u for k, u in updates.items()}, state
        >>> negate = optim.GradientTransformation(init=lambda params: (), update=update)
        >>> rule = optim.chain(negate, optim.scale_by_learning_rate(0.5))
        >>> params = {"w": torch.ones(2)}                              # (d,)
        >>> updates, state = rule.update({"w": torch.tensor([1.0, -2.0])}, rule.init(params))
        >>> updates["w"]
        tensor([ 0.5000, -1.0000])
    """

    init: _Init
    update: Update


def extras_taken(update: Update) -> frozenset[str] | None:
    """The extra keywords ``update`` names, or None if it takes any (``**kwargs``)."""
    try:
        parameters = inspect.signature(update).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: the three arguments only
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    named = [p for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    keywords = [p.name for p in named[3:] if p.kind is not inspect.Parameter.POSITIONAL_ONLY]
    return frozenset(keywords)


def with_extra_args_support(transform: GradientTransformation) -> GradientTransformation:
    """``transform`` whose ``update`` takes extra keyword arguments, passing on only those it names.

    As optax's ``with_extra_args_support``: a rule written ``update(updates,
    state, params=None)`` ignores extras; one that names ``schedule_step`` gets
    it. The signature is read once, here, not at every update.

    Example:
        >>> from funcaccum import optim
        >>> def update(updates, state, params=None):               # optax's three arguments
        ...     return {k: 2 * u for k, u in updates.items()}, state
        >>> rule = optim.with_extra_args_support(optim.GradientTransformation(lambda p: (), update))
        >>> rule.update({"w": torch.ones(1)}, (), None, schedule_step=torch.tensor(3))[0]
        {'w': tensor([2.])}
    """
    taken = extras_taken(transform.update)
    if taken is None:
        return transform
    inner = transform.update

    def update(
        updates: PyTree, state: Any, params: PyTree = None, **extra_args: Any
    ) -> tuple[PyTree, Any]:
        return inner(updates, state, params, **{k: v for k, v in extra_args.items() if k in taken})

    return GradientTransformation(transform.init, update)


def hyperparams(params: PyTree, **values: float | torch.Tensor) -> dict[str, torch.Tensor]:
    """Hyperparameters as 0-d float64 tensors on the params' device, for a state to hold."""
    device = tree_device(params)
    return {
        # detached: a rate that requires grad would tie every later step's params to a graph
        name: torch.as_tensor(value, dtype=HYPERPARAM_DTYPE, device=device).detach().clone()
        for name, value in values.items()
    }


def with_checks(
    transform: GradientTransformation,
    state_check: Callable[[Any], None],
    *,
    owner: str,
    needs_params: bool = False,
) -> GradientTransformation:
    """``transform`` with its input checked: ``init`` checks the params, ``update`` the state.

    Wrapping leaves the rule's own ``init`` and ``update`` plain. The update
    checks are ``isinstance`` tests, free under ``torch.compile``.

    Args:
        transform: the transformation to guard.
        state_check: raises :class:`FuncaccumError` for a state the rule did not make.
        owner: the rule, for messages, such as ``"scale_by_adam()"``.
        needs_params: ``update`` must be given the params (weight decay reads them).
    """
    inner_init, inner_update = with_extra_args_support(transform)

    def init(params: PyTree) -> Any:
        check_params(params)
        return inner_init(params)

    def update(
        updates: PyTree, state: Any, params: PyTree = None, **extra_args: Any
    ) -> tuple[PyTree, Any]:
        state_check(state)
        if needs_params and params is None:
            raise FuncaccumError(
                f"{owner} reads the params: call update(updates, state, params), not without them"
            )
        return inner_update(updates, state, params, **extra_args)

    update.checked = True  # type: ignore[attr-defined]  # marks a guarded rule for checked()
    return GradientTransformation(init, update)


def checked(
    state_type: type, *, needs_params: bool = False
) -> Callable[[Callable[..., GradientTransformation]], Callable[..., GradientTransformation]]:
    """Decorate a transformation factory so that what it returns checks its input.

    ``init`` refuses params that are not floating tensors with storage (the
    message names the leaf's path); ``update`` refuses a state that is not a
    ``state_type`` (another rule's state, or the params in its place). A
    factory that returns an already checked transformation (one built from
    others, as ``add_decayed_weights(mask=...)`` is) passes it through.
    """

    def decorate(
        factory: Callable[..., GradientTransformation],
    ) -> Callable[..., GradientTransformation]:
        owner = f"{factory.__name__}()"

        def check(state: Any) -> None:
            check_state(state, state_type, owner=owner)

        @functools.wraps(factory)
        def make(*args: Any, **kwargs: Any) -> GradientTransformation:
            transform = factory(*args, **kwargs)
            if getattr(transform.update, "checked", False):
                return transform
            return with_checks(transform, check, owner=owner, needs_params=needs_params)

        return make

    return decorate


def _chain_state_check(count: int) -> Callable[[Any], None]:
    def check(state: Any) -> None:
        if isinstance(state, tuple) and not hasattr(state, "_fields") and len(state) == count:
            return
        if isinstance(state, tuple) and not hasattr(state, "_fields"):
            got = f"a tuple of {len(state)} ({', '.join(type(s).__name__ for s in state)})"
        elif isinstance(state, dict):
            got = "a dict (params or gradients? the order is update(updates, state, params))"
        else:
            got = describe(state) if not isinstance(state, tuple) else f"a {type(state).__name__}"
        raise FuncaccumError(
            f"chain()'s update got {got}, not the tuple of {count} states its init makes (one "
            "per chained transformation): pass the state this optimizer's own init returned"
        )

    return check


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transformations in order; the state is the tuple of their states.

    Example:
        >>> from funcaccum import optim
        >>> rule = optim.chain(optim.clip_by_global_norm(1.0), optim.scale_by_learning_rate(0.1))
        >>> params = {"w": torch.zeros(2)}
        >>> state = rule.init(params)
        >>> updates, state = rule.update({"w": torch.tensor([3.0, 4.0])}, state, params)
        >>> updates["w"]
        tensor([-0.0600, -0.0800])
    """
    for position, transform in enumerate(transforms):
        if not isinstance(transform, GradientTransformation):
            raise FuncaccumError(
                f"chain's argument {position} must be a GradientTransformation (such as "
                f"optim.sgd(0.1), called), got {describe(transform)}"
            )

    # Extra arguments go by keyword, each member taking those it names (optax's chain).
    members = [with_extra_args_support(t) for t in transforms]

    def init(params: PyTree) -> tuple[Any, ...]:
        return tuple(t.init(params) for t in members)

    def update(
        updates: PyTree, state: tuple[Any, ...], params: PyTree = None, **extra_args: Any
    ) -> tuple[PyTree, Any]:
        new_state = []
        for transform, inner in zip(members, state, strict=True):
            updates, inner = transform.update(updates, inner, params, **extra_args)
            new_state.append(inner)
        return updates, tuple(new_state)

    return with_checks(
        GradientTransformation(init, update), _chain_state_check(len(transforms)), owner="chain()"
    )


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """``params + updates``, leafwise, each result in its param's dtype.

    Updates may be wider (float32 updates of bf16 params); they are added in
    the wider dtype and the sum is rounded once to the param's dtype.

    >>> apply_updates({"w": torch.ones(2)}, {"w": torch.tensor([0.5, -1.0])})
    {'w': tensor([1.5000, 0.0000])}
    """
    return foreach_map(lambda p, u: (p + u).to_dtypes_of(p), params, updates)


Hyperparams = dict[str, torch.Tensor]


def _map_hyperparams(state: Any, fn: Callable[[Hyperparams], Hyperparams]) -> Any:
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        named: Any = state
        if "hyperparams" in named._fields:
            return named._replace(hyperparams=fn(named.hyperparams))
        # A state holding other states (masked, multi_transform): look inside.
        return named._make(_map_hyperparams(inner, fn) for inner in named)
    if isinstance(state, tuple):
        return tuple(_map_hyperparams(inner, fn) for inner in state)
    if type(state) is dict:  # multi_transform's states by label; other mappings are leaves
        return {key: _map_hyperparams(inner, fn) for key, inner in state.items()}
    return state


def get_hyperparams(opt_state: Any) -> dict[str, torch.Tensor]:
    """Every hyperparameter in an optimizer state, by name (the first, if a name repeats).

    Example:
        >>> from funcaccum import optim
        >>> state = optim.adamw(1e-3).init({"w": torch.zeros(2)})
        >>> sorted(optim.get_hyperparams(state))
        ['b1', 'b2', 'eps', 'learning_rate', 'weight_decay']
    """
    found: dict[str, torch.Tensor] = {}

    def collect(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, value in values.items():
            found.setdefault(name, value)
        return values

    _map_hyperparams(opt_state, collect)
    return found


def set_hyperparams(opt_state: Any, **values: float | torch.Tensor) -> Any:
    """A new optimizer state with hyperparameters replaced, by name, wherever they occur.

    The values stay 0-d tensors of the same dtype and device, so a compiled
    step sees the same graph and does not recompile. A learning rate driven
    by a schedule is recomputed at every update, so setting it has no lasting
    effect.

    Each value is checked with the rule its factory applies (``learning_rate``,
    ``weight_decay``, ``eps`` >= 0; ``b1``, ``b2``, ``momentum`` in [0, 1);
    ``max_norm`` > 0; all finite). In a state with several groups
    (:func:`~funcaccum.optim.multi_transform`) a name is set in every group;
    to set one group's, pass that group's state, ``state.inner_states[label]``.

    Raises:
        FuncaccumError: a name the state does not have, or a value out of its range.

    Example:
        >>> from funcaccum import optim
        >>> state = optim.sgd(0.1, momentum=0.9).init({"w": torch.zeros(2)})
        >>> state = optim.set_hyperparams(state, learning_rate=0.01)
        >>> optim.get_hyperparams(state)["learning_rate"].item()
        0.01
    """
    unknown = set(values) - set(get_hyperparams(opt_state))
    if unknown:
        raise FuncaccumError(
            f"the optimizer state has no hyperparameters {sorted(unknown)}; "
            f"it has {sorted(get_hyperparams(opt_state))}"
        )
    for name, value in values.items():
        check_hyperparam(name, value)

    def replace(current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            name: torch.as_tensor(values[name], dtype=old.dtype, device=old.device).clone()
            if name in values
            else old
            for name, old in current.items()
        }

    return _map_hyperparams(opt_state, replace)
