"""Ghost clipping: per-microbatch gradient norms without materialising per-microbatch gradients."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, cast

import optree
import torch
from torch import nn
from torch.func import grad, vmap
from torch.nn import functional

from . import tree
from ._errors import FuncaccumError
from ._fold import FoldState, MicrobatchOutput
from ._folder import Folder
from ._functional import refuse_sharded
from ._microbatch import MicrobatchGroup
from ._strategy import GroupRunner
from ._tree import PyTree, accum_dtype, unit_squared_norms
from ._validate import check_int

__all__ = ["Ghost", "ghost"]

WeightedSum = Callable[[torch.Tensor], dict[str, torch.Tensor]]
"""``weighted_sum(c)``: ``sum_u c_u g_u`` for some parameters, by name."""

# Per layer kind: its parameters' per-unit squared norms, and sum_u c_u g_u.
LayerResult = tuple[torch.Tensor, WeightedSum]


def _scaled(weighted_sum: WeightedSum, factor: float) -> WeightedSum:
    """``weighted_sum`` with every coefficient multiplied by ``factor``."""
    return lambda c: weighted_sum(c * factor)


def _named(layer: str, weighted_sum: WeightedSum) -> WeightedSum:
    """A layer's weighted sum keyed by the parameters' names in the module."""
    return lambda c: {_qualified(layer, k): v for k, v in weighted_sum(c).items()}


def _qualified(module_name: str, param_name: str) -> str:
    """A parameter's name in ``module.named_parameters()``, from its layer's name."""
    return f"{module_name}.{param_name}" if module_name else param_name


def _units(t: torch.Tensor, count: int) -> torch.Tensor:
    """``(count * size, *middle, features)`` to ``(count, size * middle, features)``."""
    return t.reshape(count, -1, t.shape[-1])


def _linear(module: nn.Linear, x: torch.Tensor, delta: torch.Tensor, count: int) -> LayerResult:
    x, delta = _units(x, count), _units(delta, count)  # (c, L, in), (c, L, out)
    length, fan_in, fan_out = x.shape[1], x.shape[2], delta.shape[2]
    if length * (fan_in + fan_out) <= fan_in * fan_out:
        # Ghost norm: |sum_t d_t x_t^T|^2 = sum_{t,s} (d_t . d_s)(x_t . x_s), no (out, in) per unit.
        squares = torch.sum((x @ x.transpose(1, 2)) * (delta @ delta.transpose(1, 2)), dim=(1, 2))
    else:
        squares = torch.sum(torch.square(delta.transpose(1, 2) @ x), dim=(1, 2))
    bias = delta.sum(1)  # (c, out)
    if module.bias is not None:
        squares = squares + torch.sum(bias * bias, dim=1)

    def weighted_sum(coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        scaled = delta * coefficients[:, None, None]
        out = {"weight": scaled.flatten(0, 1).T @ x.flatten(0, 1)}
        if module.bias is not None:
            out["bias"] = coefficients @ bias
        return out

    return squares, weighted_sum


def _embedding(
    module: nn.Embedding, ids: torch.Tensor, delta: torch.Tensor, count: int
) -> LayerResult:
    ids, delta = ids.reshape(count, -1), _units(delta, count)  # (c, L), (c, L, dim)
    if module.padding_idx is not None:  # torch gives the padding row no gradient
        delta = delta * (ids != module.padding_idx)[..., None]
    same = ids[:, :, None] == ids[:, None, :]
    squares = torch.sum((delta @ delta.transpose(1, 2)) * same, dim=(1, 2))

    def weighted_sum(coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = (delta * coefficients[:, None, None]).flatten(0, 1)
        total = torch.zeros(module.weight.shape, dtype=rows.dtype, device=rows.device)
        return {"weight": total.index_add(0, ids.flatten(), rows)}

    return squares, weighted_sum


def _materialised(per_unit: dict[str, torch.Tensor]) -> LayerResult:
    """Per-unit gradients already in hand (small layers): norms and a weighted sum."""
    squares = unit_squared_norms(per_unit)

    def weighted_sum(coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        return tree.weighted_sum(per_unit, coefficients)

    return squares, weighted_sum


def _layer_norm(
    module: nn.LayerNorm, x: torch.Tensor, delta: torch.Tensor, count: int
) -> LayerResult:
    normalised = functional.layer_norm(x, module.normalized_shape, None, None, module.eps)
    shape = (count, -1, *module.normalized_shape)
    per_unit = {"weight": (delta * normalised).reshape(shape).sum(1)}
    if module.bias is not None:
        per_unit["bias"] = delta.reshape(shape).sum(1)
    return _materialised(per_unit)


def _conv2d(module: nn.Conv2d, x: torch.Tensor, delta: torch.Tensor, count: int) -> LayerResult:
    columns = functional.unfold(
        x,
        module.kernel_size,
        dilation=module.dilation,
        padding=cast(tuple[int, ...], module.padding),  # _rule refuses string padding
        stride=module.stride,
    )  # (n, in * kh * kw, positions)
    delta = delta.flatten(2)  # (n, out, positions)
    per_example = delta @ columns.transpose(1, 2)  # (n, out, in * kh * kw)
    per_unit = {"weight": per_example.reshape(count, -1, *module.weight.shape).sum(1)}
    if module.bias is not None:
        per_unit["bias"] = delta.sum(2).reshape(count, -1, delta.shape[1]).sum(1)
    return _materialised(per_unit)


def _rule(module: nn.Module) -> Callable[..., LayerResult] | None:
    """How a layer's per-unit norms come from its input and output gradient, if it can."""
    if type(module) is nn.Linear:
        return _linear
    if type(module) is nn.Embedding and not (
        module.max_norm or module.sparse or module.scale_grad_by_freq
    ):
        return _embedding
    if type(module) is nn.LayerNorm and module.elementwise_affine:
        return _layer_norm
    if (
        type(module) is nn.Conv2d
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        return _conv2d
    return None


class Ghost(NamedTuple):
    """The ghost-clipping strategy for one module, from :func:`ghost`.

    Attributes:
        module: the module whose layers are tapped.
        layers: tapped layer name to its parameter names, in ``params``.
        fallback: the parameters whose per-unit gradients are materialised by vmap.
        chunk_size: microbatches per forward and backward pass; None: a whole group.
    """

    module: nn.Module
    layers: dict[str, tuple[str, ...]]
    fallback: tuple[str, ...]
    chunk_size: int | None = None

    @contextmanager
    def _tapped(self) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Hooks that record each tapped layer's input and add a zero probe to its output."""
        taps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def hook(name: str) -> Callable[..., torch.Tensor]:
            def record(
                module: nn.Module, args: tuple[Any, ...], output: torch.Tensor
            ) -> torch.Tensor:
                if name in taps:
                    raise FuncaccumError(
                        f"layer {name!r} ran twice in one forward pass; ghost clipping needs each "
                        "tapped layer once (its gradient would be a sum). Use strategy='chunked'."
                    )
                probe = torch.zeros_like(output, requires_grad=True)
                taps[name] = (args[0].detach(), probe)
                return output + probe

            return record

        handles = [
            self.module.get_submodule(name).register_forward_hook(hook(name))
            for name in self.layers
        ]
        try:
            yield taps
        finally:
            for handle in handles:
                handle.remove()

    def build(self, folder: Folder) -> GroupRunner:
        """Check what ghost clipping needs, then fold groups ``chunk_size`` units at a time."""
        spec = folder.spec
        if folder.reducer.update_by_norms is None:
            raise FuncaccumError(
                "strategy=ghost(...) needs a reducer that clips by norm: clipped_mean"
            )
        if spec.has_weight or spec.has_aux or spec.has_state:
            raise FuncaccumError(
                "strategy=ghost(...) takes a plain loss: example-count weights, no aux, no model "
                "state (has_weight, has_aux and has_state must be False)"
            )
        if spec.batch_dim != 0:
            raise FuncaccumError("strategy=ghost(...) needs batch leaves with batch_dim=0")

        def run(
            params: PyTree, state: FoldState, group: MicrobatchGroup, model_state: PyTree
        ) -> tuple[FoldState, MicrobatchOutput, PyTree]:
            folder.require_eager(
                "strategy=ghost(...)",
                "its forward hooks and torch.autograd.grad do not trace: do not compile the step "
                "whole, or use strategy=chunked(size) to compile",
            )
            if not isinstance(params, dict) or not set(params) >= {
                name for names in self.layers.values() for name in names
            }:
                raise FuncaccumError(
                    "strategy=ghost(module) needs params as functional_model(module) gives "
                    "them: a dict keyed by the module's parameter names"
                )
            chunk = group.count if self.chunk_size is None else self.chunk_size
            for start in range(0, group.count, chunk):
                units = optree.tree_map(lambda x, s=start: x[s : s + chunk], group.batch)
                count = optree.tree_leaves(units)[0].shape[0]
                total, norms, parts = self._chunk(folder.loss_fn, params, units, count)
                weights = torch.full(
                    (count,), float(group.size), dtype=state.weight_sum.dtype, device=total.device
                )

                def weighted_sum(coefficients: torch.Tensor, parts: list = parts) -> PyTree:
                    found: dict[str, torch.Tensor] = {}
                    for part in parts:
                        found |= part(coefficients)
                    return {
                        name: found[name].to(accum_dtype(p.dtype))
                        if name in found
                        else torch.zeros_like(p, dtype=accum_dtype(p.dtype))
                        for name, p in params.items()
                    }

                state = folder.add_by_norms(state, norms, weights, weighted_sum, total)
            # The loss is summed per chunk, not kept per unit: per-unit losses are unknown.
            nan = torch.full((group.count,), torch.nan, device=state.weight_sum.device)
            return state, MicrobatchOutput(nan, torch.full_like(nan, group.size)), model_state

        return run

    def _chunk(
        self,
        loss_fn: Callable[..., Any],
        params: dict[str, torch.Tensor],
        units: PyTree,
        count: int,
    ) -> tuple[torch.Tensor, torch.Tensor, list[WeightedSum]]:
        """One forward and one backward (to the probes only) over ``count`` units.

        Returns the summed loss, each unit's gradient norm, and the pieces of
        ``sum_u c_u g_u``, parameter by parameter.
        """
        flat = optree.tree_map(lambda x: x.flatten(0, 1), units)
        examples = optree.tree_leaves(flat)[0].shape[0]
        size = examples // count  # examples per unit
        with torch.enable_grad(), self._tapped() as taps:
            total = loss_fn(params, flat) * examples  # sum of per-example losses
            # A layer whose input is not per example (positions shared by the batch) gets its
            # output gradient summed over examples: its parameters take the general path.
            shared = [n for n in taps if taps[n][0].shape[:1] != (examples,)]
            names = [n for n in taps if n not in shared]
            probes = [taps[n][1] for n in names]
            deltas = torch.autograd.grad(total, probes, allow_unused=True) if probes else ()
        fallback = [*self.fallback, *(p for n in shared for p in self.layers[n])]
        norms_sq = torch.zeros(count, dtype=torch.float32, device=total.device)
        parts: list[WeightedSum] = []
        for name, delta in zip(names, deltas, strict=True):
            if delta is None:  # the layer does not reach the loss
                continue
            module, (x, _) = self.module.get_submodule(name), taps[name]
            rule = _rule(module)
            assert rule is not None  # ghost() taps only layers that have a rule
            upcast = torch.promote_types(delta.dtype, torch.float32)
            inputs = x if x.dtype in (torch.int32, torch.int64) else x.to(upcast)
            squares, weighted_sum = rule(module, inputs, delta.to(upcast), count)
            norms_sq = norms_sq + squares.to(norms_sq.dtype)
            parts.append(_named(name, weighted_sum))
        if fallback:
            rest = {name: params[name] for name in fallback}

            def unit_loss(subset: dict[str, torch.Tensor], unit: PyTree) -> torch.Tensor:
                return loss_fn({**params, **subset}, unit)

            per_unit = vmap(grad(unit_loss), in_dims=(None, 0), randomness="error")(rest, units)
            per_unit = {k: v * size for k, v in per_unit.items()}  # mean -> sum over the unit
            squares, weighted_sum = _materialised(per_unit)
            norms_sq = norms_sq + squares.to(norms_sq.dtype)
            parts.append(weighted_sum)
        # Everything above is for a unit's summed loss; the unit's gradient is of its mean.
        return (
            total.detach(),
            torch.sqrt(norms_sq) / size,
            [_scaled(part, 1 / size) for part in parts],
        )


def ghost(module: nn.Module, *, chunk_size: int | None = None) -> Ghost:
    """Clip per microbatch without materialising per-microbatch gradients where layers allow.

    A strategy for :func:`~funcaccum.accumulate` and
    :func:`~funcaccum.train_step` with a norm-clipping reducer
    (:func:`~funcaccum.clipped_mean`), for a loss built on
    ``functional_model(module)``. For each chunk of microbatches it runs one
    forward pass, recording each tapped layer's input, and one backward pass
    for the layers' output gradients only (no weight gradients). From those:

    - ``nn.Linear`` and ``nn.Embedding``: each microbatch's gradient norm by
      the ghost identity ``|sum_t d_t x_t^T|^2 = sum_{t,s} (d_t . d_s)(x_t . x_s)``
      (Goodfellow 2015, "Efficient Per-Example Gradient Computations"; Li et
      al. 2022, "Large Language Models Can Be Strong Differentially Private
      Learners"), or the direct form when cheaper, and the clipped sum
      ``sum_u c_u g_u`` as one matrix product per layer;
    - ``nn.LayerNorm`` and ``nn.Conv2d``: per-microbatch gradients from the
      same records (small, or cheap to form);
    - any other parameter: the general path, per-microbatch gradients by
      vmap, for those parameters only.

    Compared with the ``"vmap"`` or ``"chunked"`` strategies, memory holds
    activations and output gradients instead of ``K`` copies of the
    gradient. Compared with Opacus's ghost clipping, one backward pass is
    saved: the clipped sum comes from the records, not a second backward.

    Limits: runs eagerly (forward hooks and ``torch.autograd.grad`` do not
    trace under ``torch.compile(fullgraph=True)``); examples must not interact
    (no batch norm in training mode); each tapped layer runs once per forward
    (tied or reused layers: use ``"chunked"``); weights are example counts
    (no ``has_weight``); no aux outputs.

    Args:
        module: the module the loss runs through ``functional_model``.
        chunk_size: how many microbatches share a forward and backward pass,
            >= 1; None (default): a whole group of equal-size microbatches.

    Example:
        >>> from funcaccum import accumulate, clipped_mean, functional_model, vmap
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> apply, params, buffers = functional_model(model)
        >>> def loss_fn(params, batch):
        ...     return functional.cross_entropy(apply(params, buffers, batch[0]), batch[1])
        >>> batch = (torch.randn(16, 4), torch.randint(2, (16,)))
        >>> lean = accumulate(loss_fn, params, batch, reducer=clipped_mean(0.5),
        ...                   microbatch_size=1, strategy=ghost(model))
        >>> plain = accumulate(loss_fn, params, batch, reducer=clipped_mean(0.5),
        ...                    microbatch_size=1, strategy=vmap())
        >>> all(torch.allclose(lean.grads[k], plain.grads[k], atol=1e-6) for k in params)
        True

    References:
        Goodfellow, `Efficient Per-Example Gradient Computations
        <https://arxiv.org/abs/1510.01799>`_, 2015;
        Li et al., `Large Language Models Can Be Strong Differentially Private Learners
        <https://arxiv.org/abs/2110.05679>`_, 2021
    """
    refuse_sharded(module, "ghost")
    layers: dict[str, tuple[str, ...]] = {}
    owners: dict[int, list[str]] = {}
    for name, sub in module.named_modules():
        for param_name, param in sub.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(_qualified(name, param_name))
    shared = {full for names in owners.values() if len(names) > 1 for full in names}
    for name, sub in module.named_modules():
        own = dict(sub.named_parameters(recurse=False))
        full = tuple(_qualified(name, p) for p in own)
        trainable = all(p.requires_grad for p in own.values())
        if own and trainable and _rule(sub) is not None and not set(full) & shared:
            layers[name] = full
    tapped = {p for names in layers.values() for p in names}
    fallback = tuple(n for n, p in module.named_parameters() if p.requires_grad and n not in tapped)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, low=1)
    return Ghost(module, layers, fallback, chunk_size)
