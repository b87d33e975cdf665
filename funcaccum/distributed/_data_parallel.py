"""Data parallelism on torch.distributed: one all-reduce of the reducer state per optimizer step."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Any

import optree
import torch
import torch.distributed as dist

from .._accumulate import FoldState
from .._errors import FuncaccumError
from .._reducer import Maximum
from .._train import Metrics, TrainState, TrainStep
from .._tree import PyTree
from .._validate import check_bool, check_real, describe

__all__ = ["DataParallel", "all_reduce_state", "broadcast_state"]


def _is_maximum(x: Any) -> bool:
    return isinstance(x, Maximum)


def _wait(work: Any, timeout: float | None, what: str) -> None:
    start = time.monotonic()
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout=datetime.timedelta(seconds=timeout))
    except RuntimeError as error:
        elapsed = time.monotonic() - start
        raise FuncaccumError(
            f"rank {dist.get_rank()}: {what} failed after {elapsed:.1f} s (timeout "
            f"{timeout} s): a peer process died or stalled. Stop every rank and resume them "
            f"all from the last checkpoint (docs/scaling.md). The backend said: {error}"
        ) from error


def _collective_by_dtype(
    tensors: list[torch.Tensor], run: Callable[[torch.Tensor], None]
) -> list[torch.Tensor]:
    """``run`` a collective in place on one flat buffer per dtype; new tensors, same shapes."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, tensor in enumerate(tensors):
        by_dtype.setdefault(tensor.dtype, []).append(i)
    out = list(tensors)
    for indices in by_dtype.values():
        buffer = torch.cat([tensors[i].reshape(-1) for i in indices])
        run(buffer)
        sizes = [tensors[i].numel() for i in indices]
        for i, chunk in zip(indices, buffer.split(sizes), strict=True):
            out[i] = chunk.view(tensors[i].shape).clone()
    return out


def all_reduce_state(
    state: PyTree, *, group: Any = None, timeout: float | None = None, what: str = "the all-reduce"
) -> PyTree:
    """Sum a reducer state (or a :class:`~funcaccum.FoldState`) over the ranks of ``group``.

    Every leaf is added across ranks, except :class:`~funcaccum.Maximum`
    fields, which take the maximum; both travel in **one** collective per
    dtype (one in all for funcaccum's reducers, whose states share a dtype):
    the leaves are flattened into one buffer, and each maximum sits in its
    rank's own slot of a ``world_size``-long segment, zero elsewhere, so the
    sum delivers every rank's value and the maximum is taken after.

    Args:
        state: the pytree of tensors to merge.
        group: the process group (default: the world).
        timeout: seconds to wait before raising :class:`FuncaccumError`.
        what: names the collective in that error.

    Returns:
        The merged state, the same on every rank.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    leaves, treedef = optree.tree_flatten(state, is_leaf=_is_maximum)

    def to_send(leaf: Any) -> torch.Tensor:
        if not _is_maximum(leaf):
            return leaf
        slots = leaf.value.new_zeros((world, *leaf.value.shape))
        slots[rank] = leaf.value
        return slots

    def run(buffer: torch.Tensor) -> None:
        work = dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group, async_op=True)
        _wait(work, timeout, what)

    summed = _collective_by_dtype([to_send(leaf) for leaf in leaves], run)
    merged = [
        Maximum(total.amax(0)) if _is_maximum(leaf) else total
        for leaf, total in zip(leaves, summed, strict=True)
    ]
    return optree.tree_unflatten(treedef, merged)


def broadcast_state(
    state: PyTree, *, src: int = 0, group: Any = None, timeout: float | None = None
) -> PyTree:
    """Every rank's copy of ``state`` replaced by rank ``src``'s (one collective per dtype)."""
    leaves, treedef = optree.tree_flatten(state)

    def run(buffer: torch.Tensor) -> None:
        _wait(dist.broadcast(buffer, src=src, group=group, async_op=True), timeout, "the broadcast")

    return optree.tree_unflatten(treedef, _collective_by_dtype(leaves, run))


class DataParallel:
    """A :class:`~funcaccum.TrainStep` across processes, with one all-reduce per optimizer step.

    Each rank folds the microbatches of its own share of the batch
    (:meth:`TrainStep.fold`), one all-reduce sums the folded states (states
    are sums, so merging is addition; see :func:`all_reduce_state`), and every
    rank applies the same update (:meth:`TrainStep.apply`), so the params stay
    identical. That is one collective per optimizer step whatever the number
    of microbatches, where DDP without ``no_sync`` all-reduces once per
    microbatch. The result is the exact global weighted mean, for any
    reducer, also when ranks hold different numbers of examples; a rank with
    none passes ``None`` and still takes part, so nobody waits forever.

    When a peer dies or stalls, the collective fails or times out after
    ``timeout`` seconds, and every surviving rank raises :class:`FuncaccumError`
    instead of hanging.

    Args:
        step: the training step, from :func:`~funcaccum.train_step`.
        group: the process group (default: the world, which must be initialised).
        timeout: seconds a collective may wait for the other ranks.
        compile: compile ``fold`` and ``apply`` with ``torch.compile(fullgraph=True)``
            (the collective runs between them, eagerly).

    Example (in each process started by ``torchrun --nproc-per-node 2``)::

        dist.init_process_group("gloo")
        step = fa.train_step(loss_fn, optimizer=fa.optim.adamw(1e-3), num_microbatches=4)
        parallel = fa.distributed.DataParallel(step, timeout=60)
        state = parallel.init(params)            # rank 0's params, everywhere
        for batch in batches:
            local = shard(batch, dist.get_rank(), dist.get_world_size())
            state, metrics = parallel(state, local)
        fa.distributed.destroy_process_group()   # frees the group: no gloo threads at exit
    """

    def __init__(
        self,
        step: TrainStep,
        *,
        group: Any = None,
        timeout: float | None = 300.0,
        compile: bool = False,
    ) -> None:
        if not isinstance(step, TrainStep):
            raise FuncaccumError(
                f"step must be a TrainStep (from funcaccum.train_step), got {describe(step)}"
            )
        # A timeout <= 0 would fail every collective at once; None waits forever.
        check_real("timeout", timeout, low=0, low_inclusive=False, allow_none=True)
        check_bool("compile", compile)
        if not dist.is_available() or not dist.is_initialized():
            raise FuncaccumError(
                "DataParallel needs torch.distributed initialised: call "
                "torch.distributed.init_process_group first (torchrun sets the environment)"
            )
        if step.has_state:
            raise FuncaccumError(
                "DataParallel does not take a step with has_state=True yet: each rank's model "
                "state (batch norm statistics) would drift apart; train with module.eval() "
                "norms, or on one process"
            )
        self.step, self.group, self.timeout = step, group, timeout
        self.calls = 0  # optimizer steps attempted, to name one in an error
        self._parts = step.parts(compile)

    def init(self, params: PyTree) -> TrainState:
        """The step's initial state, built from rank 0's params on every rank."""
        params = broadcast_state(
            optree.tree_map(torch.Tensor.detach, params), group=self.group, timeout=self.timeout
        )
        return self.step.init(params)

    def __call__(self, state: TrainState, local_batch: PyTree | None) -> tuple[TrainState, Metrics]:
        """One optimizer step on every rank's local batch (None: this rank has no examples)."""
        folded: FoldState = (
            self.step.accumulation.init(state.params)
            if local_batch is None
            else self._parts.fold(state, local_batch)[0]
        )
        self.calls += 1
        what = f"the all-reduce of optimizer step {self.calls} (since init)"
        folded = all_reduce_state(folded, group=self.group, timeout=self.timeout, what=what)
        state, metrics = self._parts.apply(state, folded)
        self.step.check_skips(state, metrics)
        return state, metrics
