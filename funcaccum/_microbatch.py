"""Splitting a batch pytree into microbatches of static shape."""

from __future__ import annotations

from typing import NamedTuple

import einops
import optree
import torch

from ._errors import FuncaccumError
from ._tree import PyTree, leaf_paths
from ._validate import check_int

__all__ = ["MicrobatchGroup", "batch_size", "plan_microbatches", "split_microbatches"]


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
    count: int
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


def batch_size(batch: PyTree) -> int:
    """The leading dimension every leaf of ``batch`` shares, checked with clear errors."""
    leaves = optree.tree_leaves(batch)
    if leaves and all(isinstance(x, torch.Tensor) and x.ndim > 0 for x in leaves):
        sizes = {x.shape[0] for x in leaves}
        if len(sizes) == 1:
            return sizes.pop()
    # Something is wrong: find it, with each leaf's path for the message.
    leaves = leaf_paths(batch, "batch")
    if not leaves:
        raise FuncaccumError("the batch has no tensor leaves")
    for path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise FuncaccumError(
                f"{path} is a {type(leaf).__name__}; every batch leaf must be a torch.Tensor "
                "with a leading batch dimension"
            )
        if leaf.ndim == 0:
            raise FuncaccumError(
                f"{path} is a 0-d tensor; batch leaves need a leading batch dimension"
            )
    sizes = {leaf.shape[0] for _, leaf in leaves}
    if len(sizes) > 1:
        shapes = ", ".join(f"{path}: {tuple(leaf.shape)}" for path, leaf in leaves)
        raise FuncaccumError(f"batch leaves disagree on the leading (batch) dimension: {shapes}")
    return sizes.pop()


def split_microbatches(
    batch: PyTree, *, num_microbatches: int | None = None, microbatch_size: int | None = None
) -> list[MicrobatchGroup]:
    """Split ``batch`` into at most two groups of equal-size microbatches.

    Every example lands in exactly one microbatch, in order; the groups are
    views of the batch where the memory layout allows.

    Args:
        batch: a pytree of tensors sharing the leading batch dimension ``N``.
        num_microbatches: ``K``, with ``1 <= K <= N``.
        microbatch_size: ``m >= 1``; the last microbatch holds the remainder.

    Returns:
        The groups, in batch order.

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
    n = batch_size(batch)
    groups = []
    start = 0
    for count, size in plan_microbatches(
        n, num_microbatches=num_microbatches, microbatch_size=microbatch_size
    ):
        stop = start + count * size
        stacked = optree.tree_map(
            lambda x, a=start, b=stop, m=size: einops.rearrange(
                x[a:b], "(k m) ... -> k m ...", m=m
            ),
            batch,
        )
        groups.append(MicrobatchGroup(stacked, count, size))
        start = stop
    return groups
