"""Data parallelism on torch.distributed: one all-reduce of the reducer state per optimizer step."""

from __future__ import annotations

import datetime
import functools
import hashlib
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
import torch.distributed as dist

from .._errors import FuncaccumError
from .._fold import Folded
from .._reducer import Maximum
from .._train import StepMetrics, TrainState, TrainStep
from .._tree import PyTree, Tree, leaf_paths, tree_device
from .._validate import check_real, describe

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


def _floating_then_by_dtype(tensors: list[torch.Tensor]) -> list[tuple[torch.dtype, list[int]]]:
    """Buffers for a sum: every floating-point tensor in one, in the widest of their dtypes.

    Upcasting is exact and the sum is rounded once back to each tensor's own
    dtype, so a float32 leaf summed in a float64 buffer is as accurate as
    summed in float32 (more, over many ranks). Other dtypes (integers, which a
    float could not hold exactly) keep a buffer each; no shipped state has them.
    """
    floating = [i for i, t in enumerate(tensors) if t.is_floating_point()]
    groups: list[tuple[torch.dtype, list[int]]] = []
    if floating:
        widest = functools.reduce(torch.promote_types, (tensors[i].dtype for i in floating))
        groups.append((widest, floating))
    others: dict[torch.dtype, list[int]] = {}
    for i, tensor in enumerate(tensors):
        if not tensor.is_floating_point():
            others.setdefault(tensor.dtype, []).append(i)
    return groups + list(others.items())


def _all_reduce_sum(
    tensors: list[torch.Tensor], run: Callable[[torch.Tensor], None]
) -> list[torch.Tensor]:
    """``run`` an in-place sum on one packed buffer (see above); new tensors, same shapes."""
    out = list(tensors)
    for dtype, indices in _floating_then_by_dtype(tensors):
        buffer = torch.cat([tensors[i].reshape(-1).to(dtype) for i in indices])
        run(buffer)
        sizes = [tensors[i].numel() for i in indices]
        for i, chunk in zip(indices, buffer.split(sizes), strict=True):
            out[i] = chunk.view(tensors[i].shape).to(tensors[i].dtype, copy=True)
    return out


def _broadcast_bytes(
    tensors: list[torch.Tensor], run: Callable[[torch.Tensor], None]
) -> list[torch.Tensor]:
    """``run`` a broadcast on the tensors' bytes, all dtypes in one buffer (a copy needs no sum)."""
    if not tensors:
        return []
    raw = [t.detach().reshape(-1).contiguous().view(torch.uint8) for t in tensors]
    buffer = torch.cat(raw)
    run(buffer)
    return [
        # clone first: a chunk's offset in the buffer need not suit a wider dtype's view
        chunk.clone().view(t.dtype).view(t.shape)
        for t, chunk in zip(tensors, buffer.split([r.numel() for r in raw]), strict=True)
    ]


def all_reduce_state(
    state: Tree, *, group: Any = None, timeout: float | None = None, what: str = "the all-reduce"
) -> Tree:
    """Sum a reducer state (or a :class:`~funcaccum.FoldState`) over the ranks of ``group``.

    Every leaf is added across ranks, except :class:`~funcaccum.Maximum`
    fields, which take the maximum; all of them travel in **one** collective:
    the floating-point leaves are flattened into one buffer in the widest of
    their dtypes (a float32 loss sum rides, upcast exactly, with ``adaptive``'s
    float64 gradient sum) and come back in their own dtypes. Each maximum sits
    in its rank's own slot of a ``world_size``-long segment, zero elsewhere,
    so the sum delivers every rank's value and the maximum is taken after.
    Integer leaves, which no shipped reducer has, take one more collective
    per integer dtype.

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

    summed = _all_reduce_sum([to_send(leaf) for leaf in leaves], run)
    merged = [
        Maximum(total.amax(0)) if _is_maximum(leaf) else total
        for leaf, total in zip(leaves, summed, strict=True)
    ]
    return optree.tree_unflatten(treedef, merged)


def broadcast_state(
    state: Tree, *, src: int = 0, group: Any = None, timeout: float | None = None
) -> Tree:
    """Every rank's copy of ``state`` replaced by rank ``src``'s, in one collective.

    The leaves travel as bytes in one buffer, whatever their dtypes (a copy,
    unlike a sum, does not care what the bytes mean), so params and a model
    state with integer counters go together.
    """
    leaves, treedef = optree.tree_flatten(state)

    def run(buffer: torch.Tensor) -> None:
        _wait(dist.broadcast(buffer, src=src, group=group, async_op=True), timeout, "the broadcast")

    return optree.tree_unflatten(treedef, _broadcast_bytes(leaves, run))


class _ModelStateShare(NamedTuple):
    """One rank's model state as it rides in the step's all-reduce: sums only.

    Attributes:
        microbatches: ``K_r``, the microbatches (forward passes) this rank ran.
        leaves: per model-state leaf, for a floating-point one ``K_r s_r`` (its
            state after them, weighted); for an integer one (a counter such as
            ``num_batches_tracked``) its increment over this step.
    """

    microbatches: torch.Tensor
    leaves: list[torch.Tensor]


def _check_model_state(model_state: PyTree) -> None:
    """Raise unless every leaf is a real floating-point or an integer tensor.

    Those are the two kinds :class:`DataParallel` knows how to merge across
    ranks (averaged, or counted); a boolean or complex leaf has no rule.
    """
    for path, leaf in leaf_paths(model_state, "model_state"):
        if not isinstance(leaf, torch.Tensor):
            raise FuncaccumError(f"{path} must be a tensor, got {describe(leaf)}")
        if leaf.is_complex() or leaf.dtype == torch.bool:
            raise FuncaccumError(
                f"{path} is a {leaf.dtype} tensor; DataParallel merges model-state leaves that "
                "are real floating-point (averaged over ranks) or integer (counters, summed)"
            )


def _share(
    before: PyTree, after: PyTree, microbatches: int, dtype: torch.dtype
) -> _ModelStateShare:
    """This rank's :class:`_ModelStateShare`; ``dtype`` is the step's weight dtype (>= float32)."""

    def share(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        if not new.is_floating_point():
            return (new - old).to(dtype)  # a step's increments are small: exact in any float
        wide = torch.promote_types(new.dtype, dtype)
        # A rank without examples sends zeros, not 0 * state (NaN where the state is Inf).
        return new.to(wide) * microbatches if microbatches else torch.zeros_like(new, dtype=wide)

    leaves = [share(o, n) for o, n in zip(_leaves(before), _leaves(after), strict=True)]
    count = torch.tensor(float(microbatches), dtype=dtype, device=leaves[0].device)
    return _ModelStateShare(count, leaves)


def _merged_model_state(before: PyTree, summed: _ModelStateShare) -> PyTree:
    """The rule: floats ``sum_r K_r s_r / sum_r K_r``; integers ``s + sum_r (s_r - s)``."""
    total = summed.microbatches
    treedef = optree.tree_structure(before)

    def merge(old: torch.Tensor, total_share: torch.Tensor) -> torch.Tensor:
        if not old.is_floating_point():
            return old + total_share.round().to(old.dtype)
        # No rank ran a microbatch (every rank had None): the state stays.
        return torch.where(total > 0, total_share / total, old).to(old.dtype)

    merged = [merge(o, t) for o, t in zip(_leaves(before), summed.leaves, strict=True)]
    return optree.tree_unflatten(treedef, merged)


def _leaves(tree: PyTree) -> list[torch.Tensor]:
    return optree.tree_leaves(tree)


def _tree_device(tree: PyTree) -> torch.device:
    leaves = [x for x in optree.tree_leaves(tree) if isinstance(x, torch.Tensor)]
    return leaves[0].device if leaves else torch.device("cpu")


def _layout_of(tree: PyTree, root: str) -> str:
    """Each leaf's path, shape and dtype, as text."""
    return repr([
        (path, tuple(leaf.shape), str(leaf.dtype)) if isinstance(leaf, torch.Tensor)
        else (path, type(leaf).__qualname__)
        for path, leaf in leaf_paths(tree, root)
    ])  # fmt: skip


def _code(text: str) -> int:
    """A 62-bit fingerprint of ``text`` (so its negation fits an int64 too)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 2


_PLAIN = (bool, int, float, str, type(None), torch.dtype)


def _config(value: Any, depth: int = 0, seen: set[int] | None = None) -> str:
    """What configures ``value``, as text: the functions it is made of (by qualified name) and
    the numbers, strings and dtypes in their closures, walked a few levels deep.

    An update rule or a reducer is a NamedTuple of closures over its hyperparameters
    (``sgd(0.1)``'s rate, ``clipped_mean(1.0)``'s norm), so two ranks built with different
    factories or values give different text. Modules, generators and other objects count
    by their type only.
    """
    seen = set() if seen is None else seen
    if isinstance(value, _PLAIN):
        return repr(value)
    if depth > 8 or id(value) in seen:
        return "..."
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        shown = value.tolist() if value.numel() == 1 and not value.is_meta else ""
        return f"tensor{tuple(value.shape)}{value.dtype}{shown}"
    if isinstance(value, functools.partial):
        return f"partial({_config(value.func, depth + 1, seen)}, {_config(value.args, depth + 1, seen)}, {_config(value.keywords, depth + 1, seen)})"  # noqa: E501
    if isinstance(value, tuple | list):
        name = type(value).__qualname__
        return f"{name}({', '.join(_config(v, depth + 1, seen) for v in value)})"
    if isinstance(value, dict):
        items = ", ".join(f"{k!r}: {_config(v, depth + 1, seen)}" for k, v in value.items())
        return f"{{{items}}}"
    code = getattr(value, "__code__", None)
    if code is not None:  # a function: its name, and what its closure holds
        cells = []
        for cell in getattr(value, "__closure__", None) or ():
            try:
                cells.append(_config(cell.cell_contents, depth + 1, seen))
            except ValueError:  # an empty cell
                cells.append("-")
        return f"{getattr(value, '__qualname__', code.co_name)}[{', '.join(cells)}]"
    return type(value).__qualname__


def check_ranks_agree(
    step: TrainStep,
    params: PyTree,
    model_state: PyTree = (),
    *,
    group: Any = None,
    timeout: float | None = None,
    owner: str = "DataParallel",
    extra: dict[str, str] | None = None,
    values: str = "their values may differ: rank 0's are taken",
) -> None:
    """Refuse ranks built otherwise: one all-reduce (MAX of each fingerprint and of its
    negation) over what configures ``step`` and the layout of ``params`` and ``model_state``.

    Every rank raises :class:`~funcaccum.FuncaccumError` naming what differs; ranks that
    went on would diverge silently, or abort in a collective. ``extra`` adds aspects of
    the caller's own (a sharded step's ``sync`` and ``gather``), by name; ``values``
    says what happens to the params' values, in the error.
    """
    accumulation = step.accumulation
    options = (
        accumulation.strategy, accumulation.num_microbatches, accumulation.microbatch_size,
        accumulation.has_aux, accumulation.has_weight, accumulation.has_state,
        accumulation.batch_dim,
    )  # fmt: skip
    aspects = {
        "the params (names, shapes, dtypes)": _layout_of(params, "params"),
        "the model_state (names, shapes, dtypes)": _layout_of(model_state, "model_state"),
        "the optimizer (its rules and hyperparameters)": _config(step.optimizer),
        "the reducer (its kind and options)": _config(accumulation.reducer),
        "the accumulation's options (strategy, split, has_aux, has_weight, has_state)": (
            _config(options)
        ),
        "compute_dtype and schedule_clock": repr((step.compute_dtype, step.schedule_clock)),
        **(extra or {}),
    }
    codes = [_code(text) for text in aspects.values()]
    device = _tree_device(params)
    both = torch.tensor(codes + [-c for c in codes], dtype=torch.int64, device=device)
    work = dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group, async_op=True)
    _wait(work, timeout, f"the check that every rank was built alike ({owner}.init)")
    highest, lowest = both[: len(codes)].tolist(), [-v for v in both[len(codes) :].tolist()]
    differ = [name for name, high, low in zip(aspects, highest, lowest, strict=True) if high != low]
    if differ:
        raise FuncaccumError(
            f"rank {dist.get_rank(group)}: the ranks of this {owner} were not built alike; "
            f"they differ in {', '.join(differ)}. Every rank must build the same step (same "
            "optimizer, reducer, accumulation, compute_dtype) on params of the same tree, "
            f"shapes and dtypes ({values})"
        )


class DataParallel:
    """A :class:`~funcaccum.TrainStep` across processes, with one all-reduce per optimizer step.

    Each rank folds the microbatches of its own share of the batch
    (:meth:`TrainStep.fold <funcaccum.TrainStep.fold>`), one all-reduce sums
    the folded states (states are sums, so merging is addition; see
    :func:`all_reduce_state`), and every rank applies the same update
    (:meth:`TrainStep.apply <funcaccum.TrainStep.apply>`), so the params stay
    identical. That is one collective per optimizer step whatever the number
    of microbatches, where DDP without ``no_sync`` all-reduces once per
    microbatch. The result is the exact global weighted mean, for any
    reducer, also when ranks hold different numbers of examples; a rank with
    none passes ``None`` and still takes part, so nobody waits forever.

    A step with ``has_state`` (batch norm's running statistics) keeps one
    model state, the same on every rank. Each rank threads the state through
    its own microbatches, in order, as one process would; then, in the same
    all-reduce as the gradients, the floating-point leaves are averaged over
    the ranks, each weighted by its microbatch count ``K_r``
    (``sum_r K_r s_r / sum_r K_r``: a rank without examples counts for
    nothing), and integer leaves (``num_batches_tracked``) add up every rank's
    increment, so they count every microbatch of the step, as one process
    running them all would. Batch statistics stay per microbatch, so the
    gradients, and the params, are those of one process running the same
    microbatches. A skipped step keeps the old state on every rank.
    docs/scaling.md compares this with DDP's and ``SyncBatchNorm``'s choices.

    A noised reducer (``clipped_mean(noise_multiplier=...)``) adds its noise
    after the merge, on every rank: it needs its own generator, which
    :meth:`init` puts in rank 0's state everywhere, so every rank draws the
    same noise even when the ranks are seeded apart; torch's global generator
    is refused (docs/privacy.md).

    When a peer dies or stalls, the collective fails or times out after
    ``timeout`` seconds, and every surviving rank raises :class:`FuncaccumError`
    instead of hanging. ``fold`` and ``apply`` run compiled as the step's
    ``compile`` says; the collective runs between them, eagerly. The metrics
    cover every rank, except ``aux``, which is this rank's own.

    Args:
        step: the training step, from :func:`~funcaccum.train_step`.
        group: the process group (default: the world, which must be initialised).
        timeout: seconds a collective may wait for the other ranks.

    Example (in each process started by ``torchrun --nproc-per-node 2``)::

        dist.init_process_group("gloo")
        accumulation = fa.Accumulation(num_microbatches=4)
        step = fa.train_step(loss_fn, optimizer=fa.optim.adamw(1e-3), accumulation=accumulation)
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
    ) -> None:
        if not isinstance(step, TrainStep):
            raise FuncaccumError(
                f"step must be a TrainStep (from funcaccum.train_step), got {describe(step)}"
            )
        # A timeout <= 0 would fail every collective at once; None waits forever.
        check_real("timeout", timeout, low=0, low_inclusive=False, allow_none=True)
        mechanism = step.accumulation.reducer.privacy
        if mechanism is not None and mechanism.generator is None:
            raise FuncaccumError(
                "a noised clipped_mean under DataParallel needs its own generator: every rank "
                "adds the noise after the merge, and torch's global generator differs between "
                "ranks seeded apart (as for dropout), so the params would diverge. Pass "
                "clipped_mean(..., generator=torch.Generator()); DataParallel.init gives it rank "
                "0's state everywhere, and it then draws the same noise on every rank."
            )
        self._noise = None if mechanism is None else mechanism.generator
        if not dist.is_available() or not dist.is_initialized():
            raise FuncaccumError(
                "DataParallel needs torch.distributed initialised: call "
                "torch.distributed.init_process_group first (torchrun sets the environment)"
            )
        self.step, self.group, self.timeout = step, group, timeout
        self.calls = 0  # optimizer steps attempted, to name one in an error

    def init(self, params: PyTree, model_state: PyTree = ()) -> TrainState:
        """The step's initial state, built from rank 0's params (and model state) on every rank.

        ``model_state`` is for a step with ``has_state``, as in
        :meth:`TrainStep.init`; both travel in one broadcast, with, for a
        noised reducer, its noise generator's state, so every rank then draws
        the same noise. Before it, one small all-reduce checks that every rank
        was built alike: the params' names, shapes and dtypes, the model
        state's, the update rule and the reducer (their kinds and
        hyperparameters), the accumulation's options, ``compute_dtype`` and
        ``schedule_clock``. Ranks that differ would diverge silently, or abort
        in the collective; here every rank raises
        :class:`~funcaccum.FuncaccumError` naming what differs.
        """
        _check_model_state(model_state)
        check_ranks_agree(
            self.step, params, model_state, group=self.group, timeout=self.timeout,
            owner="DataParallel",
        )  # fmt: skip
        tensors: tuple[Any, ...] = optree.tree_map(torch.Tensor.detach, (params, model_state))
        if self._noise is not None:  # the noise generator's state rides in the same broadcast
            device = tree_device(params) or torch.device("cpu")
            tensors = (*tensors, self._noise.get_state().to(device))
        params, model_state, *noise = broadcast_state(
            tensors, group=self.group, timeout=self.timeout
        )
        if self._noise is not None:
            self._noise.set_state(noise[0].cpu())
        return self.step.init(params, model_state)

    def __call__(
        self, state: TrainState, local_batch: PyTree | None
    ) -> tuple[TrainState, StepMetrics]:
        """One optimizer step on every rank's local batch (None: this rank has no examples)."""
        step = self.step
        if local_batch is None:
            folded = Folded(step.accumulation.init(state.params), state.model_state)
        else:
            folded = step.fold(state, local_batch)
        self.calls += 1
        what = f"the all-reduce of optimizer step {self.calls} (since init)"
        if not step.accumulation.has_state:
            merged = all_reduce_state(
                folded.state, group=self.group, timeout=self.timeout, what=what
            )
            folded = Folded(merged, folded.model_state, folded.aux)
        else:
            _check_model_state(state.model_state)
            count = 0 if local_batch is None else self._microbatches(local_batch)
            share = _share(
                state.model_state, folded.model_state, count, folded.state.weight_sum.dtype
            )
            # The model state rides in the gradients' all-reduce: still one collective.
            merged, share = all_reduce_state(
                (folded.state, share), group=self.group, timeout=self.timeout, what=what
            )
            folded = Folded(merged, _merged_model_state(state.model_state, share), folded.aux)
        state, metrics = step.apply(state, folded)
        step.check_skips(state, metrics)
        return state, metrics

    def _microbatches(self, batch: PyTree) -> int:
        """How many microbatches (forward passes) the step splits ``batch`` into."""
        return sum(count for count, _ in self.step.accumulation.plan(batch))
