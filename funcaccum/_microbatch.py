"""Splitting a batch pytree into microbatches of static shape."""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Mapping
from typing import Any, NamedTuple

import einops
import optree
import torch

from ._errors import FuncaccumError
from ._tree import PyTree, leaf_paths
from ._validate import check_int

__all__ = [
    "BatchDim",
    "MicrobatchGroup",
    "as_batch",
    "batch_dims",
    "batch_size",
    "plan_microbatches",
    "split_microbatches",
    "to_layout",
]


class MicrobatchGroup(NamedTuple):
    """``count`` microbatches of ``size`` examples each, stacked.

    Attributes:
        batch: the batch pytree with every leaf shaped ``(count, size, ...)``.
        count: the number of microbatches in the group.
        size: the number of examples in each.

    Example:
        >>> import funcaccum as fa
        >>> groups = fa.split_microbatches({"x": torch.zeros(10, 3)}, num_microbatches=4)
        >>> [(g.count, g.size, tuple(g.batch["x"].shape)) for g in groups]  # 3 + 3 + 2 + 2
        [(2, 3, (2, 3, 3)), (2, 2, (2, 2, 3))]
    """

    batch: PyTree
    count: int  # type: ignore[assignment]  # a field named like tuple.count, as optax's states
    size: int


def plan_microbatches(
    num_examples: int, *, num_microbatches: int | None = None, microbatch_size: int | None = None
) -> tuple[tuple[int, int], ...]:
    """The ``(count, size)`` groups that cover ``num_examples`` examples exactly once.

    ``num_microbatches=K`` splits as evenly as possible (the first ``N % K``
    microbatches hold one example more); ``microbatch_size=m`` makes
    microbatches of ``m`` and one last partial microbatch of ``N % m``. Either
    way there are at most two sizes, so every group has one static shape and
    nothing is padded.

    >>> plan_microbatches(10, num_microbatches=4)
    ((2, 3), (2, 2))
    >>> plan_microbatches(10, microbatch_size=4)
    ((2, 4), (1, 2))
    """
    if (num_microbatches is None) == (microbatch_size is None):
        raise FuncaccumError(
            "give exactly one of num_microbatches and microbatch_size, got "
            f"num_microbatches={num_microbatches!r}, microbatch_size={microbatch_size!r}"
        )
    if isinstance(num_examples, int) and num_examples == 0:
        raise FuncaccumError("the batch is empty: its leading dimension is 0")
    check_int("num_examples", num_examples, low=1)
    if num_microbatches is not None:
        k = check_int("num_microbatches", num_microbatches, low=1)
        if k > num_examples:
            raise FuncaccumError(
                f"num_microbatches={k} is more than the batch's {num_examples} examples"
            )
        size, extra = divmod(num_examples, k)
        groups = ((extra, size + 1), (k - extra, size))
    else:
        m = min(check_int("microbatch_size", microbatch_size, low=1), num_examples)
        full, rest = divmod(num_examples, m)
        groups = ((full, m), (1, rest))
    return tuple((count, size) for count, size in groups if count and size)


BatchDim = Any
"""Where each batch leaf holds its examples: an int for every leaf, or a pytree prefix of ints."""

_DICTS = (dict, OrderedDict, defaultdict)  # the mappings optree flattens; other ones are leaves
_CONTAINERS = (Mapping, list, tuple)


def as_batch(batch: Any) -> PyTree:
    """``batch`` with every other Mapping taken as its dict, in dicts, lists and tuples.

    A Hugging Face ``BatchEncoding`` (what its tokenizers and collators
    return), a ``UserDict`` or a ``mappingproxy`` is a Mapping that pytrees
    treat as one leaf; every place a batch enters reads it as the dict of its
    items, so the loss gets a plain dict (``model(**batch)`` works the same).

    >>> from collections import UserDict
    >>> as_batch(UserDict({"x": torch.zeros(2)}))
    {'x': tensor([0., 0.])}
    """
    if isinstance(batch, Mapping) and not isinstance(batch, _DICTS):
        return {key: as_batch(value) for key, value in batch.items()}
    # Containers are rebuilt only where one of them holds a container (cheap per step).
    if type(batch) is dict:
        if any(isinstance(value, _CONTAINERS) for value in batch.values()):
            return {key: as_batch(value) for key, value in batch.items()}
    elif type(batch) in (list, tuple) and any(isinstance(v, _CONTAINERS) for v in batch):
        return type(batch)(as_batch(value) for value in batch)
    return batch


def batch_dims(batch: PyTree, batch_dim: BatchDim = 0) -> PyTree:
    """Each leaf's batch dimension, ``batch_dim`` broadcast over ``batch``'s leaves."""
    if isinstance(batch_dim, int) and not isinstance(batch_dim, bool):
        return optree.tree_map(lambda _: batch_dim, batch)
    try:
        return optree.tree_broadcast_prefix(batch_dim, batch)
    except ValueError as error:
        raise FuncaccumError(
            f"batch_dim must be an int or a pytree prefix of the batch, got {batch_dim!r}: "
            f"{error}"
        ) from error


def batch_size(batch: PyTree, batch_dim: BatchDim = 0) -> int:
    """The batch dimension every leaf of ``batch`` shares, checked with clear errors.

    ``batch_dim`` says where each leaf holds its examples (0: leading). A
    leaf that disagrees with the others is named with its path and shape.
    """
    batch = as_batch(batch)
    leaves = optree.tree_leaves(batch)
    leading = all(isinstance(x, torch.Tensor) and x.ndim > 0 and not x.is_meta for x in leaves)
    if batch_dim == 0 and leaves and leading:
        leading_sizes = {x.shape[0] for x in leaves}
        if len(leading_sizes) == 1:
            return leading_sizes.pop()
    # Something is wrong, or the layout is explicit: check each leaf with its path.
    leaves = leaf_paths(batch, "batch")
    if not leaves:
        raise FuncaccumError("the batch has no tensor leaves")
    dims = optree.tree_leaves(batch_dims(batch, batch_dim))
    sizes: dict[str, tuple[int, tuple[int, ...], int]] = {}
    for (path, leaf), dim in zip(leaves, dims, strict=True):
        if not isinstance(leaf, torch.Tensor):
            raise FuncaccumError(
                f"{path} is a {type(leaf).__name__}; every batch leaf must be a torch.Tensor "
                "with a batch dimension"
            )
        if leaf.ndim == 0:
            raise FuncaccumError(f"{path} is a 0-d tensor; batch leaves need a batch dimension")
        if leaf.is_meta:
            raise FuncaccumError(
                f"{path} is on the meta device, where it holds no values; give the batch's "
                "data on the params' device"
            )
        if not -leaf.ndim <= dim < leaf.ndim:
            raise FuncaccumError(
                f"{path} has shape {tuple(leaf.shape)}, which has no batch dimension {dim} "
                f"(batch_dim={batch_dim!r})"
            )
        sizes[path] = (leaf.shape[dim], tuple(leaf.shape), dim)
    if len({size for size, _, _ in sizes.values()}) > 1:
        shapes = ", ".join(f"{path}: {shape}" for path, (_, shape, _) in sizes.items())
        where = (
            "the leading (batch) dimension"
            if batch_dim == 0
            else "their batch dimensions (batch_dim)"
        )
        hint = (
            "; a sequence-first (T, N) leaf? pass batch_dim=1 for it (a pytree prefix such as "
            "batch_dim=(1, 0) gives each leaf its own)"
            if batch_dim == 0
            else ""
        )
        raise FuncaccumError(f"batch leaves disagree on {where}: {shapes}{hint}")
    return next(iter(sizes.values()))[0]


def to_layout(microbatch: PyTree, batch_dim: BatchDim = 0) -> PyTree:
    """A microbatch (examples leading, as split) back in the batch's own layout."""
    if batch_dim == 0:
        return microbatch
    dims = batch_dims(microbatch, batch_dim)
    return optree.tree_map(lambda x, d: x.movedim(0, d), microbatch, dims)


def split_microbatches(
    batch: PyTree,
    *,
    num_microbatches: int | None = None,
    microbatch_size: int | None = None,
    batch_dim: BatchDim = 0,
) -> list[MicrobatchGroup]:
    """Split ``batch`` into at most two groups of equal-size microbatches.

    Every example lands in exactly one microbatch, in order; the groups are
    views of the batch where the memory layout allows, detached: funcaccum
    differentiates in the params only, so a batch that requires grad (the
    output of a model run outside) carries no graph into the results. A
    Mapping that is not a dict (a Hugging Face ``BatchEncoding``) is taken as
    its dict (:func:`as_batch`).

    Args:
        batch: a pytree of tensors sharing the leading batch dimension ``N``.
        num_microbatches: ``K``, with ``1 <= K <= N``.
        microbatch_size: ``m >= 1``; the last microbatch holds the remainder.
        batch_dim: where each leaf holds its examples: 0 (leading), or an int
            or pytree prefix of ints for other layouts (1 for a
            sequence-first ``(T, N)`` leaf).

    Returns:
        The groups, in batch order, every leaf's batch dimension moved to the
        front: ``(count, size, ...)``.

    Raises:
        FuncaccumError: both or neither of the counts given, a count out of range,
            an empty batch, a non-tensor or 0-d leaf, or leaves whose leading
            dimensions differ (the message lists each leaf's path and shape).

    Example:
        >>> batch = {"x": torch.randn(10, 3), "y": torch.randn(10)}
        >>> groups = split_microbatches(batch, num_microbatches=4)
        >>> [(g.count, g.size, tuple(g.batch["x"].shape)) for g in groups]  # (k, m, d)
        [(2, 3, (2, 3, 3)), (2, 2, (2, 2, 3))]
    """
    batch = as_batch(batch)
    n = batch_size(batch, batch_dim)
    if batch_dim != 0:
        batch = optree.tree_map(lambda x, d: x.movedim(d, 0), batch, batch_dims(batch, batch_dim))
    groups = []
    start = 0
    for count, size in plan_microbatches(
        n, num_microbatches=num_microbatches, microbatch_size=microbatch_size
    ):
        stop = start + count * size
        stacked = optree.tree_map(
            lambda x, a=start, b=stop, m=size: einops.rearrange(
                x[a:b].detach(), "(k m) ... -> k m ...", m=m
            ),
            batch,
        )
        groups.append(MicrobatchGroup(stacked, count, size))
        start = stop
    return groups
