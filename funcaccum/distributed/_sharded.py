"""Exact accumulation on FSDP2: each microbatch through FSDP's own hooks, the fold on shards.

A module sharded with ``fully_shard`` computes its gradients in its hooks:
all-gather a layer's params before it runs, reduce-scatter its gradient after
the backward. :func:`torch.func.functional_call` cannot drive it (the params
passed are ignored; funcaccum refuses), so :class:`FullyShardedStep` runs
each microbatch as a hand-written loop does (``module(x)``, ``.backward()``)
and folds the reduce-scattered gradient shards into the reducer's state of
sums, as DTensors; the update rule then runs on the shards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, cast

import optree
import torch
import torch.distributed as dist
from torch import nn

from .. import tree
from .._accumulate import Accumulation
from .._adaptive import AdaptiveState
from .._clipped_mean import ClippedMeanState
from .._errors import FuncaccumError
from .._fold import Folded, FoldState
from .._folder import Folder, stack
from .._mean import MeanState
from .._microbatch import batch_dims, batch_size
from .._strategy import Scan, concat
from .._train import ScheduleClock, StepMetrics, TrainState, TrainStep
from .._tree import PyTree, sum_over_leaves
from .._validate import check_real, describe
from ..optim import GradientTransformation
from ._data_parallel import _wait, check_ranks_agree

__all__ = ["FullyShardedStep", "Gather", "Sync", "local_bytes"]

Sync = Literal["microbatch", "step"]
"""When FSDP reduce-scatters gradients: after every microbatch's backward, or once per step."""
Gather = Literal["microbatch", "step"]
"""When FSDP all-gathers params: for every microbatch, or once per step (kept gathered)."""

_KINDS = {MeanState: "mean", ClippedMeanState: "clipped_mean", AdaptiveState: "adaptive"}
_RANDOM_ON_CPU_MESH = (
    "the update drew random numbers (clipped_mean's noise?) for gradient shards on a CPU "
    "mesh, where DTensor draws every rank's shard from that rank's own generator, so the "
    "shards of one noise tensor would repeat each other's numbers; FullyShardedStep does not "
    "support it"
)


def local_bytes(tree_: PyTree) -> int:
    """The bytes this rank holds of a pytree of tensors: a DTensor counts its local shard only.

    Example:
        >>> import funcaccum as fa
        >>> state = {"w": torch.zeros(3, 2), "step": torch.zeros((), dtype=torch.int64)}
        >>> fa.distributed.local_bytes(state)               # 6 float32 and one int64
        32
    """
    total = 0
    for leaf in optree.tree_leaves(tree_):
        if isinstance(leaf, torch.Tensor):
            local = _local(leaf)
            total += local.numel() * local.element_size()
    return total


def _fsdp_modules(module: nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [sub for sub in module.modules() if isinstance(sub, FSDPModule)]


def _check_module(module: object) -> tuple[dict[str, Any], Any]:
    """The module's trainable params (FSDP2 shards, ``Shard(0)`` on one 1-D mesh) and that mesh."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(module, nn.Module):
        raise FuncaccumError(f"module must be a torch.nn.Module, got {describe(module)}")
    if not isinstance(module, FSDPModule):
        raise FuncaccumError(
            f"module must be sharded with FSDP2 at its root: call "
            f"torch.distributed.fsdp.fully_shard(module) (after its submodules), got a plain "
            f"{type(module).__name__}; a model that fits every rank trains with "
            "funcaccum.distributed.DataParallel"
        )
    training_norms = [
        name
        for name, sub in module.named_modules()
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training
    ]
    if training_norms:
        raise FuncaccumError(
            f"batch norm in training mode at {training_norms}: under FSDP every rank updates its "
            "running statistics in its own forwards, padding forwards included, so the ranks' "
            "copies drift apart and no rule merges them here. Call module.eval() on those "
            "layers, use a per-example norm (LayerNorm, GroupNorm), or train with "
            "funcaccum.distributed.DataParallel, which merges them (docs/scaling.md)"
        )
    params: dict[str, Any] = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if not params:
        raise FuncaccumError(f"the {type(module).__name__} has no trainable parameters")
    first = next(iter(params.values()))
    for name, p in params.items():
        if not (isinstance(p, DTensor) and p.device_mesh.ndim == 1 and p.placements == (Shard(0),)):
            got = (
                f"a DTensor placed {p.placements} on a {p.device_mesh.ndim}-d mesh"
                if isinstance(p, DTensor)
                else "a plain tensor (its module was not passed to fully_shard)"
            )
            raise FuncaccumError(
                f"parameter {name!r} is {got}; FullyShardedStep trains params that FSDP2 "
                "shards along dim 0 on one 1-d mesh (fully_shard on an init_device_mesh(..., "
                "(world,)) mesh, the default): call fully_shard on every submodule that holds "
                "params, or on the root"
            )
        if p.device_mesh != first.device_mesh:
            raise FuncaccumError(
                f"parameter {name!r} is sharded on another device mesh than the others; "
                "FullyShardedStep needs one mesh for all"
            )
    return params, first.device_mesh


class FullyShardedStep:
    """A training step for a model sharded with FSDP2: exact accumulation on its shards.

    The model is the user's ``fully_shard``-ed module, trained with FSDP2's
    own machinery: each microbatch runs ``loss_fn(module, microbatch)`` and a
    plain ``.backward()`` through FSDP's hooks, which all-gather each layer's
    params and reduce-scatter its gradient. FSDP's averaging over ranks is
    turned into a sum (``set_gradient_divide_factor(1.0)`` and
    ``set_force_sum_reduction_for_comms(True)``, as torchtitan does), and each
    microbatch's loss is scaled by its weight (examples, or tokens with
    ``has_weight``) before the backward, so the reduce-scattered shard of
    microbatch ``i`` is ``S_i = sum_r w_ri g_ri``, a sum over the ranks. The
    reducer's state stays a state of sums, its gradient leaves DTensor shards;
    the global weight is known only once every rank has folded, so the
    division comes once, at the end: the exact weighted mean over every rank's
    examples or tokens, whatever each rank holds.

    ``sync`` chooses the memory against the communication, explicitly:

    - ``"microbatch"`` (the default, FSDP's and torchtitan's): a
      reduce-scatter after every microbatch's backward; each rank holds
      gradient shards only. Every reducer works: :func:`~funcaccum.mean`,
      :func:`~funcaccum.clipped_mean` and :func:`~funcaccum.adaptive`.
    - ``"step"``: ``set_requires_gradient_sync(False)`` until the last
      microbatch, so one reduce-scatter per step, but every rank holds
      unsharded (full-size) gradients of its own microbatches through the
      step. Only :func:`~funcaccum.mean`: the ranks' microbatches are summed
      before anything sees one, so no per-microbatch norm exists.

    ``gather="step"`` keeps the params gathered from the first forward to the
    last backward (FSDP's ``reshard_after_forward/backward(False)``): one
    all-gather per step, full params on every rank through the step. With
    ``sync="step"`` it is the cheaper shape for params that fit and optimizer
    state that does not: one all-gather and one reduce-scatter per step, the
    update rule's state sharded.

    Under FSDP the unit that :func:`~funcaccum.clipped_mean` clips and
    :func:`~funcaccum.adaptive` counts is a *global microbatch*: the ``i``-th
    microbatch of every rank together (weight ``n_i = sum_r w_ri``, gradient
    ``S_i / n_i``), because the reduce-scatter adds the ranks' ``i``-th
    microbatches before any norm can be taken. (Under ``DataParallel`` it is
    each rank's microbatch.) Each unit's squared norm is completed from the
    ranks' shards: ``clipped_mean`` takes one all-reduce of two numbers per
    microbatch (the clip factor is applied to the shard at once, so memory
    holds one accumulator and one microbatch's shard, never ``K`` gradients);
    ``adaptive`` needs the norms only in its sums, so its ``K`` squared norms
    per parameter ride in the step's one closing all-reduce. Every rank runs
    the same number of microbatches, FSDP's collectives being per layer: a
    rank with fewer (uneven shares) or none runs its extra forwards and
    backwards on a zero-length slice of its batch with zero weight (with
    ``microbatch_size``, one all-reduce agrees on ``K`` first).

    The update runs on the shards: every :mod:`funcaccum.optim` rule, masks,
    schedules, the non-finite guard and the metrics' norm; a global norm
    (``grad_norm``, ``clip_by_global_norm``, the guard's) is one scalar
    all-reduce. The update is :meth:`TrainStep.apply <funcaccum.TrainStep.apply>`
    itself, so skipped steps, ``max_consecutive_skips``, ``adaptive``'s carry
    and ``schedule_clock`` behave as in one process.

    The :class:`~funcaccum.TrainState` holds the params as DTensor shards,
    the optimizer's moments too; every other leaf is the same on every rank.
    The module's own parameters are a working copy: each step loads
    ``state.params`` into them (a local copy, no communication, skipped when
    they already hold them) and leaves the new params there, so the module
    evaluates with the trained params. Save and resume with
    :func:`save_sharded` and :func:`load_sharded`.

    Not here: batch norm in training mode (refused), model state
    (``has_state``), strategies other than :func:`~funcaccum.scan`, random
    draws in the update on a CPU mesh (``clipped_mean``'s noise: refused),
    ``compile`` (compile the module yourself), ``compute_dtype`` (FSDP's
    ``MixedPrecisionPolicy`` does that), and the drivers that take a
    :class:`~funcaccum.TrainStep` (``AdaptiveBatching``, ``run_epoch``).

    Args:
        module: the model, ``fully_shard``-ed (its submodules first, then the
            root), on a 1-d device mesh; its FSDP settings are taken over.
            As for any FSDP model, initialise it alike on every rank (the same
            seed) or load a checkpoint: each rank keeps its own slice.
        loss_fn: ``loss_fn(module, microbatch)``: the mean loss of the
            microbatch as a 0-d tensor, computed by calling ``module``; with
            ``has_weight``, ``(loss, weight)``; with ``has_aux``, ``(loss_or_pair, aux)``.
        optimizer: the update rule, e.g. :func:`funcaccum.optim.adamw`.
        accumulation: the reducer, the split and what the loss returns;
            ``strategy`` must be :func:`~funcaccum.scan` and ``has_state`` False.
        sync: ``"microbatch"`` or ``"step"`` (:data:`Sync`), as above.
        gather: ``"microbatch"`` or ``"step"`` (:data:`Gather`), as above.
        max_consecutive_skips: as for :func:`~funcaccum.train_step`.
        schedule_clock: as for :func:`~funcaccum.train_step`.
        timeout: seconds one of funcaccum's own all-reduces may wait for the
            other ranks before raising :class:`~funcaccum.FuncaccumError`
            (FSDP's collectives wait as the process group says).

    Example (in each process started by ``torchrun --nproc-per-node 2``)::

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        sharded = fa.distributed.FullyShardedStep(
            model, lambda module, batch: cross_entropy(module(batch[0]), batch[1]),
            optimizer=fa.optim.adamw(1e-3),
            accumulation=fa.Accumulation(num_microbatches=4),
        )
        state = sharded.init()                   # params: this rank's shards
        for batch in batches:
            state, metrics = sharded(state, shard(batch, dist.get_rank()))

    docs/scaling.md ("Sharded parameters") runs one, with the numbers.
    """

    def __init__(
        self,
        module: nn.Module,
        loss_fn: Callable[..., Any],
        *,
        optimizer: GradientTransformation,
        accumulation: Accumulation | None = None,
        sync: Sync = "microbatch",
        gather: Gather = "microbatch",
        max_consecutive_skips: int | None = 10,
        schedule_clock: ScheduleClock = "step",
        timeout: float | None = 300.0,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise FuncaccumError(
                "FullyShardedStep needs torch.distributed initialised: call "
                "torch.distributed.init_process_group first (torchrun sets the environment)"
            )
        params, mesh = _check_module(module)
        if not callable(loss_fn):
            raise FuncaccumError(f"loss_fn must be a function, got {describe(loss_fn)}")
        for name, value in (("sync", sync), ("gather", gather)):
            if value not in ("microbatch", "step"):
                raise FuncaccumError(f"{name} must be 'microbatch' or 'step', got {value!r}")
        check_real("timeout", timeout, low=0, low_inclusive=False, allow_none=True)
        accumulation = Accumulation() if accumulation is None else accumulation
        if not isinstance(accumulation, Accumulation):
            raise FuncaccumError(
                f"accumulation must be a funcaccum.Accumulation, got {describe(accumulation)}"
            )
        if not isinstance(accumulation.strategy, Scan):
            raise FuncaccumError(
                "FullyShardedStep runs each microbatch's forward and backward through FSDP's "
                "hooks, one at a time: the strategy must be scan(), got "
                f"{type(accumulation.strategy).__name__}"
            )
        if accumulation.has_state:
            raise FuncaccumError(
                "FullyShardedStep does not thread a model state (has_state=True): under FSDP "
                "each rank's buffers drift apart; keep such layers in eval mode"
            )
        # An empty fold of one-element stand-ins: the reducer, and the dtypes its sums take.
        probe = accumulation.init({n: torch.zeros(1, dtype=p.dtype) for n, p in params.items()})
        kind = _KINDS.get(type(probe.reducer))
        if kind is None:
            raise FuncaccumError(
                "FullyShardedStep folds the built-in reducers, mean(), clipped_mean() and "
                f"adaptive(), on gradient shards; this reducer's state is a "
                f"{type(probe.reducer).__name__}"
            )
        if sync == "step" and kind != "mean":
            raise FuncaccumError(
                f"{kind}() needs each microbatch's gradient norm, and sync='step' never forms a "
                "microbatch's gradient: every rank's microbatches are summed before the one "
                "reduce-scatter. Use sync='microbatch' (a reduce-scatter per microbatch, "
                "gradient shards only), where each global microbatch's norm is completed from "
                "the shards"
            )
        self.module, self.loss_fn, self.sync, self.gather = module, loss_fn, sync, gather
        self.timeout, self.kind, self.mesh = timeout, kind, mesh
        self._probe = probe
        sums = probe.reducer.clipped_sum if kind == "clipped_mean" else probe.reducer.grad_sum
        self._grad_dtypes = {name: leaf.dtype for name, leaf in sums.items()}
        self.group = mesh.get_group()
        self.calls = 0  # optimizer steps attempted, to name one in an error

        def params_loss(params: PyTree, microbatch: PyTree) -> Any:
            return loss_fn(module, microbatch)

        # The update half is TrainStep.apply itself; only its fold is replaced.
        self.step = TrainStep(
            params_loss,
            optimizer=optimizer,
            accumulation=accumulation,
            max_consecutive_skips=max_consecutive_skips,
            schedule_clock=schedule_clock,
        )
        self.accumulation = accumulation
        # The folder checks what the loss returns, as every strategy's does.
        self._folder = Folder(params_loss, accumulation.reducer, accumulation.spec)
        self._params = params
        self._fsdp = _fsdp_modules(module)
        for sub in self._fsdp:  # sums, not means: the reducer's state is sums
            sub.set_gradient_divide_factor(1.0)
            sub.set_force_sum_reduction_for_comms(True)
        self._root: Any = cast(Any, module)  # FSDPModule: its methods
        if gather == "step":
            self._root.set_reshard_after_forward(False)
        self._in_module: Any = None  # the params the module's storage holds now

    def init(self) -> TrainState:
        """The first state: a copy of the module's param shards, a new sharded optimizer state.

        First, one small all-reduce checks that every rank was built alike (the
        params' names, global shapes and dtypes, the update rule, the reducer,
        the accumulation's options, ``sync`` and ``gather``): ranks that differ
        would update their shards differently without a word, so every rank
        raises :class:`~funcaccum.FuncaccumError` naming what differs.
        """
        params = {name: p.detach().clone() for name, p in self._params.items()}
        check_ranks_agree(
            self.step, params, group=self.group, timeout=self.timeout,
            owner="FullyShardedStep", extra={"sync and gather": repr((self.sync, self.gather))},
            values="each rank's shards are its own, from the module it sharded",
        )  # fmt: skip
        state = self.step.init(params)
        self._in_module = state.params
        return state

    def load_into(self, state: TrainState) -> nn.Module:
        """Copy ``state.params`` into the module's shards (local, no communication); the module.

        A step does it itself when given a state the module does not hold
        (one loaded from a checkpoint, say); call it to evaluate such a state.
        """
        self._load(state.params)
        return self.module

    def __call__(self, state: TrainState, local_batch: PyTree) -> tuple[TrainState, StepMetrics]:
        """One optimizer step on every rank's local batch (zero examples: a zero-length slice)."""
        self._load(state.params)
        folded = self._fold(state, local_batch)
        state, metrics = self._apply(state, folded)
        self._store(state.params)
        self.step.check_skips(state, metrics)
        return state, metrics

    def _apply(self, state: TrainState, folded: Folded) -> tuple[TrainState, StepMetrics]:
        """:meth:`TrainStep.apply`, refusing random draws DTensor cannot make right here."""
        # On a CPU mesh DTensor draws each shard from its own rank's generator, so the shards
        # of one tensor repeat each other's numbers: a draw shows as a moved generator.
        before = torch.get_rng_state() if self.mesh.device_type == "cpu" else None
        try:
            result = self.step.apply(state, folded)
        except UserWarning as warning:  # DTensor's own warning about it, under -W error
            raise FuncaccumError(_RANDOM_ON_CPU_MESH + f" ({warning})") from warning
        except RuntimeError as error:
            if "mixed torch.Tensor and DTensor" not in str(error):
                raise
            raise FuncaccumError(
                "the update combined a whole tensor with a parameter's shards: a rule or "
                "reducer made a plain tensor of a parameter's full shape (clipped_mean's "
                "noise with generator= does); under FullyShardedStep every parameter, "
                "gradient and moment is a DTensor shard, so such tensors must be DTensors "
                f"too ({str(error).splitlines()[0]})"
            ) from error
        if before is not None and not torch.equal(before, torch.get_rng_state()):
            raise FuncaccumError(_RANDOM_ON_CPU_MESH)
        return result

    def _load(self, params: Any) -> None:
        for sub in self._fsdp:  # the shards are the truth: drop params an eval forward left
            sub.reshard()
        if params is self._in_module:
            return
        if not isinstance(params, dict) or set(params) != set(self._params):
            raise FuncaccumError(
                "state.params must be the dict of this module's trainable params, by name, "
                "as FullyShardedStep.init() (or load_sharded(like=...)) makes it"
            )
        for name, p in self._params.items():
            value = params[name]
            if not (
                type(value) is type(p.data)
                and value.shape == p.shape
                and value.dtype == p.dtype
                and getattr(value, "placements", None) == p.placements
            ):
                got = (
                    f"a {value.dtype} {type(value).__name__} of shape {tuple(value.shape)} "
                    f"placed {getattr(value, 'placements', 'whole (not sharded)')}"
                    if isinstance(value, torch.Tensor)
                    else describe(value)
                )
                raise FuncaccumError(
                    f"state.params[{name!r}] is {got}; the module's is a {p.dtype} DTensor of "
                    f"shape {tuple(p.shape)} placed {p.placements} (load a checkpoint with "
                    "load_sharded(like=step.init()))"
                )
        self._store(params)

    def _store(self, params: Any) -> None:
        # Same placements (checked in _load): each rank copies its own shards, in one op.
        with torch.no_grad():
            torch._foreach_copy_(
                [_local(p) for p in self._params.values()],
                [_local(params[name]) for name in self._params],
            )
        self._in_module = params

    def _microbatches(self, batch: PyTree) -> tuple[list[tuple[PyTree, int]], PyTree]:
        """This rank's microbatches (examples leading, with sizes) and a zero-length one."""
        if batch is None:
            raise FuncaccumError(
                "under FSDP every rank runs every microbatch's forward and backward (the "
                "all-gathers and reduce-scatters are per layer): pass a rank without examples "
                "a zero-length slice of a batch (batch[0:0]), not None"
            )
        spec = self.accumulation.spec
        dims = batch_dims(batch, spec.batch_dim)
        leading = optree.tree_map(lambda x, d: x.movedim(d, 0), batch, dims)
        empty = optree.tree_map(lambda x: x[:0], leading)
        if batch_size(batch, spec.batch_dim) == 0:
            return [], empty
        microbatches = []
        for group in self.accumulation.split(batch):
            for i in range(group.count):
                microbatch = optree.tree_map(lambda x, i=i: x[i], group.batch)
                microbatches.append((microbatch, group.size))
        return microbatches, empty

    def _all_reduce(self, buffer: torch.Tensor, what: str, op: Any = None) -> torch.Tensor:
        op = dist.ReduceOp.SUM if op is None else op
        work = dist.all_reduce(buffer, op=op, group=self.group, async_op=True)
        _wait(work, self.timeout, f"{what} of optimizer step {self.calls} (since init)")
        return buffer

    def _count(self, local: int, device: torch.device) -> int:
        """K, the microbatches every rank runs: the most any rank has."""
        if self.accumulation.microbatch_size is None:
            # num_microbatches (or one): every rank with examples has exactly that many.
            return self.accumulation.num_microbatches or 1
        count = torch.tensor([float(local)], dtype=torch.float64, device=device)
        return int(self._all_reduce(count, "the agreement on K", dist.ReduceOp.MAX).item())

    def _forward_backward(
        self, microbatch: PyTree, size: int, real: bool
    ) -> tuple[torch.Tensor, torch.Tensor, PyTree]:
        """Run one microbatch; backward its loss times its weight; ``(loss, weight, aux)``."""
        outputs: list[Any] = []
        hook = self.module.register_forward_hook(lambda _m, _a, out: outputs.append(out))
        try:
            with torch.enable_grad():
                loss, out = self._folder._forward(None, (), microbatch, size)
        finally:
            hook.remove()
        weight = out.weight if real else torch.zeros_like(out.weight)
        weight = weight.to(loss.dtype)
        if real and (not self.accumulation.has_weight or bool(weight != 0)):
            if not loss.requires_grad:
                raise FuncaccumError(
                    "the loss does not depend on the module's params: loss_fn must call "
                    "module(...) and return a loss computed from its output"
                )
            (loss * weight).backward()
        else:
            # A zero-weight microbatch still takes part in FSDP's collectives, through the
            # module's outputs times zero: its loss may be 0/0 and its gradient NaN.
            pieces = [
                t.sum() * 0
                for t in optree.tree_leaves(outputs)
                if isinstance(t, torch.Tensor) and t.requires_grad
            ]
            if not pieces:
                raise FuncaccumError(
                    "loss_fn must call module(...) (its forward, with FSDP's hooks) and use "
                    "the output: no output of the module required a gradient"
                )
            sum_over_leaves(pieces).backward()
        return loss.detach(), weight.detach(), out.aux

    def _take_grads(self) -> dict[str, torch.Tensor]:
        """The gradient shards FSDP left in ``.grad`` (cleared), in the reducer's sum dtypes."""
        grads = {}
        for name, p in self._params.items():
            grad, p.grad = p.grad, None
            dtype = self._grad_dtypes[name]
            grads[name] = torch.zeros_like(p, dtype=dtype) if grad is None else grad.to(dtype)
        return grads

    def _fold(self, state: TrainState, local_batch: PyTree) -> Folded:
        microbatches, empty = self._microbatches(local_batch)
        self.calls += 1
        device = _local(next(iter(self._params.values()))).device
        count = self._count(len(microbatches), device)
        names = list(self._params)
        # mean's sum is what FSDP accumulates in .grad; the others fold each microbatch's shards.
        reducer_state: Any = None
        if self.kind != "mean":
            reducer_state = self.accumulation.init(state.params).reducer
        # Per microbatch, this rank's part: weight, weighted loss, and for adaptive each leaf's
        # squared norm of its shard; one all-reduce sums them after the last microbatch.
        weights = torch.zeros(count, dtype=torch.float64, device=device)
        losses = torch.zeros(count, dtype=torch.float64, device=device)
        columns = len(names) if self.kind == "adaptive" else 0
        squares = torch.zeros(count, columns, dtype=torch.float64, device=device)
        auxes = []
        for p in self._params.values():
            p.grad = None
        for i in range(count):
            last = i == count - 1
            if self.sync == "step":
                self._root.set_requires_gradient_sync(last)
            if self.gather == "step":
                self._root.set_reshard_after_backward(last)
            real = i < len(microbatches)
            microbatch, size = microbatches[i] if real else (empty, 0)
            loss, weight, aux = self._forward_backward(microbatch, size, real)
            if real and self.accumulation.has_aux:
                auxes.append(aux)
            weights[i] = weight.to(torch.float64)
            losses[i] = torch.where(weight != 0, weight * loss, 0).to(torch.float64)
            if self.kind != "mean":
                reducer_state = self._fold_microbatch(reducer_state, i, weights[i], squares)
        if self.sync == "step":
            self._root.set_requires_gradient_sync(True)
        total = self._all_reduce(
            torch.cat([losses.sum().reshape(1), weights, squares.flatten()]),
            "the closing all-reduce",
        )
        loss_sum, unit_weights = total[0], total[1 : count + 1]
        dtype = self._probe.weight_sum.dtype
        weight_sum = unit_weights.sum()
        if self.kind == "mean":
            mean_dtype = self._probe.reducer.weight_sum.dtype
            reducer_state = MeanState(self._take_grads(), weight_sum.to(mean_dtype))
        elif self.kind == "adaptive":
            unit_squares = total[count + 1 :].reshape(count, columns)
            reducer_state = self._adaptive_sums(reducer_state, unit_weights, unit_squares)
        fold_state = FoldState(
            reducer_state,
            loss_sum.to(dtype),
            weight_sum.to(dtype),
            torch.tensor(float(count), dtype=dtype, device=device),
        )
        aux = concat([stack([a]) for a in auxes]) if auxes else None
        return Folded(fold_state, (), aux)

    def _fold_microbatch(
        self, reducer_state: Any, i: int, weight: torch.Tensor, squares: torch.Tensor
    ) -> Any:
        """Fold microbatch ``i``'s reduce-scattered shards ``S_i`` into the reducer's state."""
        grads = self._take_grads()
        if self.kind == "clipped_mean":
            mine = torch.stack([
                sum_over_leaves([_local_square(g) for g in grads.values()]),
                weight,
            ])  # fmt: skip
            total = self._all_reduce(mine, f"the norm of microbatch {i}")
            square, n = total[0], total[1]
            # The unit's gradient is S_i / n_i: its norm, and its sum given coefficients.
            norm = torch.where(n > 0, torch.sqrt(square) / n, 0)

            def weighted_sum(coefficients: torch.Tensor) -> PyTree:
                factor = torch.where(n > 0, coefficients[0] / n, 0)
                return tree.scale(grads, factor)

            update_by_norms = self.accumulation.reducer.update_by_norms
            assert update_by_norms is not None  # clipped_mean has one
            return update_by_norms(reducer_state, norm.reshape(1), n.reshape(1), weighted_sum)
        squares[i] = torch.stack([_local_square(g) for g in grads.values()])  # adaptive
        return reducer_state._replace(grad_sum=tree.add(reducer_state.grad_sum, grads))

    def _adaptive_sums(
        self, state: Any, unit_weights: torch.Tensor, unit_squares: torch.Tensor
    ) -> AdaptiveState:
        """Per leaf ``sum_i n_i |S_i / n_i|^2``, and ``n``, ``k``: from the shards' squares."""
        active = unit_weights > 0
        per_unit = torch.where(
            active[:, None], unit_squares / torch.where(active, unit_weights, 1)[:, None], 0
        )
        column = {name: j for j, name in enumerate(self._params)}
        square_sum = {
            name: per_unit[:, column[name]].sum().to(zero.dtype)
            for name, zero in state.square_sum.items()
        }
        return AdaptiveState(
            state.grad_sum,
            square_sum,
            unit_weights.sum().to(state.weight_sum.dtype),
            active.sum().to(state.unit_count.dtype),
        )


def _local(tensor: Any) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _local_square(grad: torch.Tensor) -> torch.Tensor:
    """The squared norm of this rank's shard, in float64: summed over ranks, the leaf's."""
    return torch.sum(torch.square(_local(grad).to(torch.float64)))
