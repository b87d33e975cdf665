"""Parameter groups: a different rule for each labelled group of params."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import optree
import torch  # noqa: F401  (the doctests' namespace)

from .._errors import FuncaccumError
from .._tree import PyTree
from .._validate import check_state, describe
from ._base import GradientTransformation, with_checks, with_extra_args_support
from ._masked import leaf_labels, select_leaves

__all__ = ["MultiTransformState", "multi_transform"]

Labels = PyTree | Callable[[PyTree], PyTree]


class MultiTransformState(NamedTuple):
    """State of :func:`multi_transform`.

    Example:
        >>> from funcaccum import optim
        >>> rule = optim.multi_transform(
        ...     {"fast": optim.sgd(0.1), "slow": optim.sgd(0.01)}, {"a": "fast", "b": "slow"}
        ... )
        >>> state = rule.init({"a": torch.zeros(2), "b": torch.zeros(2)})
        >>> sorted(state.inner_states)
        ['fast', 'slow']
    """

    inner_states: dict[str, Any]  # by label: that group's rule's state, over its leaves only


def multi_transform(
    transforms: Mapping[str, GradientTransformation], param_labels: Labels
) -> GradientTransformation:
    """A rule per group of params, as torch.optim's parameter groups (optax's ``multi_transform``).

    Each param carries a label; the rule ``transforms[label]`` updates the
    params with that label and sees the others as None (absent), so each
    group has its own state and hyperparameters. A torch optimizer with
    groups ``[{"params": a, "lr": 0.1}, {"params": b, "lr": 0.01}]`` is
    ``multi_transform({"a": sgd(0.1), "b": sgd(0.01)}, labels)``.

    :func:`~funcaccum.optim.get_hyperparams` reads the first group's value of
    a name (the first label in ``transforms``); :func:`~funcaccum.optim.set_hyperparams`
    sets a name in every group. To change one group's, replace its state:
    ``state._replace(inner_states={**state.inner_states, label: set_hyperparams(...)})``.

    Args:
        transforms: the rule for each label (a string).
        param_labels: a pytree of labels with the params' structure, or a
            prefix of it (one label for a whole subtree), or a callable that
            returns one: it is called with the params at ``init`` and with the
            params (the updates, if ``update`` gets no params) at each update,
            so it should depend on the tree's keys and shapes only.

    Raises:
        FuncaccumError: a label that is not a key of ``transforms``, or labels
            whose structure differs from the params' (the message names the path).

    Example:
        >>> from funcaccum import optim
        >>> rule = optim.multi_transform(
        ...     {"fast": optim.sgd(1.0), "slow": optim.sgd(0.1)},
        ...     {"head": "fast", "body": "slow"},
        ... )
        >>> params = {"head": torch.zeros(2), "body": torch.zeros(2)}
        >>> state = rule.init(params)
        >>> updates, state = rule.update({"head": torch.ones(2), "body": torch.ones(2)}, state)
        >>> updates
        {'head': tensor([-1., -1.]), 'body': tensor([-0.1000, -0.1000])}
        >>> state = state._replace(inner_states={
        ...     **state.inner_states,
        ...     "slow": optim.set_hyperparams(state.inner_states["slow"], learning_rate=0.5),
        ... })
        >>> rule.update({"head": torch.ones(2), "body": torch.ones(2)}, state)[0]["body"]
        tensor([-0.5000, -0.5000])
    """
    if not isinstance(transforms, Mapping) or not transforms:
        raise FuncaccumError(
            f"transforms must be a non-empty dict of label to GradientTransformation, "
            f"got {describe(transforms)}"
        )
    for label, transform in transforms.items():
        if not isinstance(label, str):
            raise FuncaccumError(f"transforms' labels must be strings, got {describe(label)}")
        if not isinstance(transform, GradientTransformation):
            raise FuncaccumError(
                f"transforms[{label!r}] must be a GradientTransformation (such as "
                f"optim.sgd(0.1), called), got {describe(transform)}"
            )
    transforms = {label: with_extra_args_support(t) for label, t in transforms.items()}
    position = {label: i for i, label in enumerate(transforms)}
    expected = f"one of the labels of transforms, {sorted(transforms)}"

    def labelled(label: str) -> Callable[[Any], bool]:
        return lambda entry: entry == label

    def init(params: PyTree) -> MultiTransformState:
        labels = leaf_labels(
            params,
            param_labels,
            name="param_labels",
            accepts=lambda entry: isinstance(entry, str) and entry in transforms,
            expected=expected,
        )
        return MultiTransformState(
            {
                label: transform.init(select_leaves(params, labels, labelled(label)))
                for label, transform in transforms.items()
            }
        )

    def update(
        updates: PyTree,
        state: MultiTransformState,
        params: PyTree = None,
        **extra_args: Any,
    ) -> tuple[PyTree, MultiTransformState]:
        tree = updates if params is None else params
        labels = param_labels(tree) if callable(param_labels) else param_labels
        outputs, states = [], {}
        for label, transform in transforms.items():
            keep = labelled(label)
            group_updates, states[label] = transform.update(
                select_leaves(updates, labels, keep),
                state.inner_states[label],
                None if params is None else select_leaves(params, labels, keep),
                **extra_args,
            )
            outputs.append(group_updates)
        # Each output holds its group's leaves and None elsewhere: take each leaf from its group.
        updates = optree.tree_map(
            lambda label, *groups: groups[position[label]] if label in position else None,
            labels,
            *outputs,
            none_is_leaf=True,
        )
        return updates, MultiTransformState(states)

    def check(state: Any) -> None:
        check_state(state, MultiTransformState, owner="multi_transform()")
        if not isinstance(state.inner_states, dict) or set(state.inner_states) != set(transforms):
            raise FuncaccumError(
                f"multi_transform()'s update got a state for the labels "
                f"{sorted(state.inner_states) if isinstance(state.inner_states, dict) else '?'}, "
                f"not {sorted(transforms)}: pass the state this rule's own init returned"
            )

    return with_checks(GradientTransformation(init, update), check, owner="multi_transform()")
