"""Ghost clipping: per-microbatch gradient norms without materialising per-microbatch gradients."""

from __future__ import annotations

import weakref
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
from ._folder import Folder, _vmap_error
from ._functional import refuse_sharded
from ._microbatch import MicrobatchGroup
from ._strategy import GroupRunner
from ._tree import PyTree, accum_dtype, unit_squared_norms
from ._validate import check_callable, check_int, describe

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
    if length == 1:  # one row per unit (an MLP on examples): |d x^T|^2 = |d|^2 |x|^2
        squares = torch.sum(x * x, dim=(1, 2)) * torch.sum(delta * delta, dim=(1, 2))
    elif length * (fan_in + fan_out) < fan_in * fan_out:
        # Ghost norm: |sum_t d_t x_t^T|^2 = sum_{t,s} (d_t . d_s)(x_t . x_s), no (out, in) per unit.
        squares = torch.sum((x @ x.transpose(1, 2)) * (delta @ delta.transpose(1, 2)), dim=(1, 2))
    else:  # the per-unit gradients themselves, (c, out, in), when no larger
        squares = torch.linalg.vector_norm(delta.transpose(1, 2) @ x, dim=(1, 2)) ** 2
    bias = delta.sum(1)  # (c, out)
    if module.bias is not None:
        squares = squares + torch.sum(bias * bias, dim=1)

    def weighted_sum(coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        # sum_u c_u d_u^T x_u as one matrix product, the coefficients on the narrower side.
        scale = coefficients[:, None, None]
        d, xs = (delta, x * scale) if fan_in < fan_out else (delta * scale, x)
        out = {"weight": d.flatten(0, 1).T @ xs.flatten(0, 1)}
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


class Tap(NamedTuple):
    """What ghost records of a tapped layer in a forward pass.

    Attributes:
        x: the layer's input, per example.
        target: the tensor its output gradient is taken with respect to: the
            output, or a zero probe added to it.
        version: the output's version counter when recorded (None for a
            probe), to catch an in-place change after it.
    """

    x: torch.Tensor
    target: torch.Tensor
    version: int | None


# The layers each (module, loss) pair probes, once checked: modules and losses weakly held.
_CHECKED: weakref.WeakKeyDictionary[nn.Module, weakref.WeakKeyDictionary[Any, Any]] = (
    weakref.WeakKeyDictionary()
)

ExampleWeights = Callable[[PyTree], torch.Tensor]
"""``example_weights(batch) -> (n,)``: each example's share of a weighted loss (valid tokens)."""


class Ghost(NamedTuple):
    """The ghost-clipping strategy for one module, from :func:`ghost`.

    Attributes:
        module: the module whose layers are tapped.
        layers: tapped layer name to its parameter names, in ``params``.
        fallback: the parameters whose per-unit gradients are materialised by vmap.
        chunk_size: microbatches per forward and backward pass; None: a whole group.
        example_weights: each example's weight in a ``has_weight`` loss, or None.
    """

    module: nn.Module
    layers: dict[str, tuple[str, ...]]
    fallback: tuple[str, ...]
    chunk_size: int | None = None
    example_weights: ExampleWeights | None = None

    @contextmanager
    def _tapped(
        self, examples: int, probed: frozenset[str] = frozenset()
    ) -> Iterator[dict[str, Tap]]:
        """Hooks that record each tapped layer's input and what its output gradient is taken by.

        That is the output itself (the layer's params are leaves that require
        grad, so it is in the graph): no copy. A layer whose output is later
        modified in place (``probed``: an in-place activation after it) gets a
        zero probe added to its output instead, whose gradient is the
        output's; so does a position embedding looked up once for the whole
        batch (ids ``(t,)`` or ``(1, t)``), its probe with a batch dimension,
        so each example's output gradient stays its own (the output
        broadcasts as it would).
        """
        taps: dict[str, Tap] = {}

        def hook(name: str) -> Callable[..., torch.Tensor | None]:
            def record(
                module: nn.Module, args: tuple[Any, ...], output: torch.Tensor
            ) -> torch.Tensor | None:
                if name in taps:
                    raise _ran_twice(name)
                x = args[0]
                if _shared_ids(module, x, examples):
                    x = x.reshape(1, -1).expand(examples, -1)
                    shape = (examples, *output.shape[-2:])
                    probe = output.new_zeros(shape).requires_grad_()
                elif name in probed or not output.requires_grad:
                    probe = torch.zeros_like(output, requires_grad=True)
                else:
                    taps[name] = Tap(x.detach(), output, output._version)
                    return None
                taps[name] = Tap(x.detach(), probe, None)
                return output + probe

            return record

        with self._hooked(hook):
            yield taps

    def build(self, folder: Folder) -> GroupRunner:
        """Check what ghost clipping needs, then fold groups ``chunk_size`` units at a time."""
        spec = folder.spec
        if folder.reducer.update_by_norms is None:
            raise FuncaccumError(
                "strategy=ghost(...) needs a reducer that clips by norm: clipped_mean"
            )
        if spec.has_aux or spec.has_state:
            raise FuncaccumError(
                "strategy=ghost(...) takes a loss without aux or model state (has_aux and "
                "has_state must be False)"
            )
        if spec.has_weight and self.example_weights is None:
            raise FuncaccumError(
                "strategy=ghost(...) with has_weight=True needs to know how the loss's weight "
                "splits among the examples, to give each unit its own share of the gradient: "
                "ghost(module, example_weights=fn), fn(batch) -> (n,) weights (valid tokens per "
                "example), the loss being sum_i w_i l_i / sum_i w_i"
            )
        if self.example_weights is not None and not spec.has_weight:
            raise FuncaccumError(
                "ghost(module, example_weights=...) is for a weighted loss: pass has_weight=True "
                "and return (loss, weight) from the loss, weight = sum of the example weights"
            )
        if spec.batch_dim != 0:
            raise FuncaccumError("strategy=ghost(...) needs batch leaves with batch_dim=0")
        # The loss is checked once, on the first group it sees; that also finds the layers whose
        # outputs are modified in place, which get a probe.
        probed: list[frozenset[str]] = []

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
            if not probed:
                probed.append(self._checked(folder, params, group))
            chunk = group.count if self.chunk_size is None else self.chunk_size
            for start in range(0, group.count, chunk):
                units = optree.tree_map(lambda x, s=start: x[s : s + chunk], group.batch)
                count = optree.tree_leaves(units)[0].shape[0]
                loss_sum, norms, weights, parts = self._chunk(
                    folder, params, units, count, probed[0]
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

                state = folder.add_by_norms(state, norms, weights, weighted_sum, loss_sum)
            # The loss is summed per chunk, not kept per unit: per-unit losses are unknown.
            nan = torch.full((group.count,), torch.nan, device=state.weight_sum.device)
            return state, MicrobatchOutput(nan, torch.full_like(nan, group.size)), model_state

        return run

    def _checked(
        self, folder: Folder, params: dict[str, torch.Tensor], group: MicrobatchGroup
    ) -> frozenset[str]:
        """:meth:`_check_loss`, once per module, loss and weighting (``accumulate`` builds a
        runner per call; a step, one per run)."""
        key = (folder.spec.has_weight, self.example_weights)
        seen = _CHECKED.setdefault(self.module, weakref.WeakKeyDictionary())
        try:
            known = seen.get(folder.loss_fn, {})
        except TypeError:  # a loss that cannot be weakly referenced: checked every time
            return self._check_loss(folder, params, group)
        if key not in known:
            known = {**known, key: self._check_loss(folder, params, group)}
            seen[folder.loss_fn] = known
        return known[key]

    def _weights(self, batch: PyTree, examples: int) -> torch.Tensor | None:
        """Each example's weight from ``example_weights`` (checked: ``(examples,)``), or None."""
        if self.example_weights is None:
            return None
        weights = self.example_weights(batch)
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (examples,):
            got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else describe(weights)
            raise FuncaccumError(
                f"ghost's example_weights(batch) must return one weight per example, shape "
                f"({examples},); got {got}"
            )
        return weights.detach()

    def _chunk(
        self,
        folder: Folder,
        params: dict[str, torch.Tensor],
        units: PyTree,
        count: int,
        probed: frozenset[str],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[WeightedSum]]:
        """One forward and one backward (to the layers' outputs only) over ``count`` units.

        Returns the weighted loss sum, each unit's gradient norm and weight,
        and the pieces of ``sum_u c_u g_u``, parameter by parameter.
        """
        loss_fn, has_weight = folder.loss_fn, folder.spec.has_weight
        flat = optree.tree_map(lambda x: x.flatten(0, 1), units)
        examples = optree.tree_leaves(flat)[0].shape[0]
        size = examples // count  # examples per unit
        example_weights = self._weights(flat, examples)
        # The tapped layers' params as leaves that require grad, so their outputs are in the
        # graph; the backward asks for the outputs' gradients only, never the weights'.
        leaves = {n: params[n].detach().requires_grad_() for ns in self.layers.values() for n in ns}
        with torch.enable_grad(), self._tapped(examples, probed) as taps:
            out = loss_fn({**params, **leaves}, flat)
            loss, weight = out if has_weight else (out, None)
            if self.layers and not taps:
                raise _not_run()
            wide = torch.promote_types(loss.dtype, torch.float32)
            if example_weights is None:
                unit_weights = torch.full((count,), float(size), dtype=wide, device=loss.device)
            else:
                unit_weights = example_weights.to(loss.device, wide).reshape(count, size).sum(1)
                _check_weight(weight, unit_weights.sum())
            # sum_i w_i l_i: the backward of it gives each example's own output gradients.
            total = loss * unit_weights.sum().to(loss.dtype)
            # A layer whose input is not per example (and not a shared position lookup) gets
            # its output gradient summed over examples: its parameters take the general path.
            shared = [n for n in taps if taps[n].x.shape[:1] != (examples,)]
            names = [n for n in taps if n not in shared]
            for name in names:
                tap = taps[name]
                if tap.version is not None and tap.target._version != tap.version:
                    raise FuncaccumError(
                        f"the output of layer {name!r} was modified in place after it ran (an "
                        "in-place activation?) in this step but not in the first: ghost takes "
                        "its gradient by that output. Make the model's in-place ops unconditional "
                        "or out of place."
                    )
            targets = [taps[n].target for n in names]
            deltas = torch.autograd.grad(total, targets, allow_unused=True) if targets else ()
        # Unit u's gradient is of its own loss, sum_{i in u} w_i l_i / W_u: scale by 1 / W_u
        # (0 for a unit of weight 0, all padding, which adds nothing).
        scale = torch.where(unit_weights > 0, 1 / unit_weights, 0)
        fallback = [*self.fallback, *(p for n in shared for p in self.layers[n])]
        norms_sq = torch.zeros(count, dtype=torch.float32, device=total.device)
        parts: list[WeightedSum] = []
        for name, delta in zip(names, deltas, strict=True):
            if delta is None:  # the layer does not reach the loss
                continue
            module, x = self.module.get_submodule(name), taps[name].x
            rule = _rule(module)
            assert rule is not None  # ghost() taps only layers that have a rule
            upcast = torch.promote_types(delta.dtype, torch.float32)
            inputs = x if x.dtype in (torch.int32, torch.int64) else x.to(upcast)
            squares, weighted_sum = rule(module, inputs, delta.to(upcast), count)
            norms_sq = _add_squares(norms_sq, squares * scale.to(squares.dtype) ** 2)
            parts.append(_per_unit(_named(name, weighted_sum), scale))
        if fallback:
            squares, weighted_sum = self._fallback(folder, params, units, fallback)
            norms_sq = _add_squares(norms_sq, squares)
            parts.append(weighted_sum)
        return total.detach(), torch.sqrt(norms_sq), unit_weights, parts

    def _fallback(
        self,
        folder: Folder,
        params: dict[str, torch.Tensor],
        units: PyTree,
        names: list[str],
    ) -> LayerResult:
        """Per-unit gradients of ``names`` under vmap, each of the unit's own loss."""
        rest = {name: params[name] for name in names}
        has_weight = folder.spec.has_weight

        def unit_loss(subset: dict[str, torch.Tensor], unit: PyTree) -> torch.Tensor:
            out = folder.loss_fn({**params, **subset}, unit)
            return out[0] if has_weight else out

        try:
            per_unit = vmap(grad(unit_loss), in_dims=(None, 0), randomness="error")(rest, units)
        except RuntimeError as error:
            if "randomness" in str(error):
                raise _vmap_error(error) from error
            raise FuncaccumError(
                f"ghost(module) takes the per-unit gradients of the parameters outside the "
                f"layers it has rules for ({', '.join(names)}) under torch.func.vmap, where the "
                f"loss failed: {str(error).splitlines()[0]}\nIf the loss runs without vmap, the "
                "model uses something vmap cannot batch (data-dependent control flow such as "
                "scaled_dot_product_attention's check of a padding mask, an in-place write into "
                "an unbatched tensor, an op without a batching rule): use strategy=scan(), which "
                "runs each microbatch as it is, or attention without a mask check "
                "(attn_implementation='eager' in Hugging Face models), or freeze those parameters."
            ) from error
        return _materialised(per_unit)

    def _check_loss(
        self, folder: Folder, params: dict[str, torch.Tensor], group: MicrobatchGroup
    ) -> frozenset[str]:
        """Refuse a loss ghost would get wrong, on the first units it sees (once per runner).

        Returns the layers whose outputs the model modifies in place, which
        ghost then probes (:meth:`_tapped`).

        - its value on several units must be their weighted mean (a mean over
          examples; with ``has_weight``, ``sum_u W_u L_u / sum_u W_u`` with
          ``W_u`` from ``example_weights``), or the gradients ghost splits per
          unit are not the units' own;
        - it must use the tapped layers' params only inside those layers (an L2
          penalty on them would be missing from the norms and the clipped sum);
        - the taps must leave its value unchanged.
        """
        loss_fn, has_weight = folder.loss_fn, folder.spec.has_weight
        count = min(group.count, 3)
        units = optree.tree_map(lambda x: x[:count], group.batch)
        flat = optree.tree_map(lambda x: x.flatten(0, 1), units)
        examples = optree.tree_leaves(flat)[0].shape[0]

        def value(params: dict[str, torch.Tensor], batch: PyTree) -> tuple[torch.Tensor, Any]:
            out = loss_fn(params, batch)
            return out if has_weight else (out, None)

        tapped = {name: layer for layer, names in self.layers.items() for name in names}
        leaves = {name: params[name].detach().requires_grad_() for name in tapped}
        with torch.enable_grad(), self._recorded(examples) as records:
            loss, whole_weight = value({**params, **leaves}, flat)
        if self.layers and not records:
            raise _not_run()
        probed = frozenset(
            name for name, (_, _, _, out, version) in records.items() if out._version != version
        )
        outside = _used_outside(loss, records, {id(leaf): tapped[n] for n, leaf in leaves.items()})
        if outside is not None:
            name = next(n for n, leaf in leaves.items() if id(leaf) == outside)
            raise FuncaccumError(
                f"loss_fn uses the parameter {name!r} outside its layer {tapped[name]!r} (an L2 "
                "penalty on the params?). Ghost clipping takes per-example gradient norms from "
                "the layers' inputs and output gradients, so that term's gradient would be "
                "missing from the norms and the clipped sum. Put the penalty in the update rule "
                "(weight_decay=) or use strategy=vmap() or scan()."
            )
        whole = loss.detach()
        with torch.no_grad():
            declared = self._weights(flat, examples)
            if declared is None:
                weights = torch.full((count,), float(group.size), dtype=torch.float64)
            else:
                weights = declared.reshape(count, group.size).sum(1).double().cpu()
                _check_weight(whole_weight, weights.sum())
            if count > 1:
                losses = []
                for u in range(count):
                    unit = optree.tree_map(lambda x, u=u: x[u], units)
                    unit_loss, unit_weight = value(params, unit)
                    if has_weight:
                        _check_weight(unit_weight, weights[u])
                    losses.append(unit_loss.double().cpu())
                expected = (torch.stack(losses) * weights).sum() / weights.sum()
                if not _close(whole, expected):
                    raise FuncaccumError(
                        f"ghost needs each unit's share of the loss, but loss_fn on {count} units "
                        f"gives {float(whole):.6g}, not the weighted mean of its values on each "
                        f"unit alone ({float(expected):.6g}): "
                        + (
                            "a mean over tokens, not over examples? Return (loss, weight) with "
                            "has_weight=True and give ghost(module, example_weights=fn), fn(batch) "
                            "-> (n,) tokens per example"
                            if declared is None
                            else "example_weights does not split the loss as it weighs examples"
                        )
                        + "; or use strategy=vmap() or scan(), which take each unit apart"
                    )
            if any(record[2] for record in records.values()):
                with self._tapped(examples):
                    tapped_loss, _ = value(params, flat)
                if not _close(tapped_loss, whole):
                    raise FuncaccumError(
                        "ghost's taps changed the loss: a position embedding shared by the batch "
                        "got a batch dimension, and the model uses its output in a way that "
                        "depends on the shape. Use strategy=vmap() or scan()."
                    )
        return probed

    @contextmanager
    def _recorded(self, examples: int) -> Iterator[dict[str, tuple[Any, Any, bool, Any, int]]]:
        """Hooks that record each tapped layer's output and input autograd nodes.

        And whether it is an embedding looked up with ids the batch shares,
        and its output with the output's version counter then.
        """
        records: dict[str, tuple[Any, Any, bool, Any, int]] = {}

        def hook(name: str) -> Callable[..., None]:
            def record(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
                if name in records:
                    raise _ran_twice(name)
                shared = _shared_ids(module, args[0], examples)
                records[name] = (output.grad_fn, args[0].grad_fn, shared, output, output._version)

            return record

        with self._hooked(hook):
            yield records

    @contextmanager
    def _hooked(self, hook: Callable[[str], Callable[..., Any]]) -> Iterator[None]:
        """``hook(name)`` as a forward hook on each tapped layer, removed on exit."""
        handles = [
            self.module.get_submodule(name).register_forward_hook(hook(name))
            for name in self.layers
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _ran_twice(name: str) -> FuncaccumError:
    return FuncaccumError(
        f"layer {name!r} ran twice in one forward pass; ghost clipping needs each tapped layer "
        "once (its gradient would be a sum). Use strategy='chunked'."
    )


def _not_run() -> FuncaccumError:
    return FuncaccumError(
        "none of the layers of the module given to ghost(module) ran in the loss: the loss runs "
        "another module (a copy, or a model rebuilt per call?), so ghost would see no "
        "activations and give zero gradients. Build the loss on functional_model(module) of the "
        "very module passed to ghost."
    )


def _shared_ids(module: nn.Module, x: torch.Tensor, examples: int) -> bool:
    """An embedding looked up with ids the whole batch shares: ``(t,)`` or ``(1, t)``."""
    return (
        type(module) is nn.Embedding
        and x.shape[:1] != (examples,)
        and (x.ndim == 1 or (x.ndim == 2 and x.shape[0] == 1))
    )


def _add_squares(total: torch.Tensor, squares: torch.Tensor) -> torch.Tensor:
    """``total + squares`` in the wider dtype: float64 models keep float64 norms."""
    dtype = torch.promote_types(total.dtype, squares.dtype)
    return total.to(dtype) + squares.to(dtype)


def _per_unit(weighted_sum: WeightedSum, scale: torch.Tensor) -> WeightedSum:
    """``weighted_sum`` with unit ``u``'s coefficient multiplied by ``scale[u]``."""
    return lambda c: weighted_sum(c * scale.to(c.dtype))


def _check_weight(returned: Any, declared: torch.Tensor) -> None:
    """The weight a ``has_weight`` loss returned must be the sum of ``example_weights``."""
    if returned is None:
        return
    got = torch.as_tensor(returned).double().cpu()
    if not torch.allclose(got, declared.double().cpu(), rtol=1e-6, atol=1e-6):
        raise FuncaccumError(
            f"the loss returned weight {float(got):g}, but ghost's example_weights sum to "
            f"{float(declared):g} for the same examples: they must describe the same weighting"
        )


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the rounding of the loss's dtype (a split mismatch is far larger)."""
    rtol = 1e-9 if a.dtype == torch.float64 else 1e-4
    return bool(torch.isclose(a.double().cpu(), b.double().cpu(), rtol=rtol, atol=rtol * 1e-3))


def _used_outside(
    loss: torch.Tensor, records: dict[str, tuple[Any, Any, bool, Any, int]], owner: dict[int, str]
) -> int | None:
    """The id of a tapped parameter the loss reaches other than through its own layer, or None.

    Walks the autograd graph from the loss. Entering a tapped layer's output
    node, the walk is inside that layer until it reaches the layer's input's
    node; a parameter's leaf reached from anywhere but inside its own layer is
    used elsewhere too.
    """
    outputs = {record[0]: layer for layer, record in records.items() if record[0] is not None}
    inputs = {layer: record[1] for layer, record in records.items()}
    stack: list[tuple[Any, str | None]] = [(loss.grad_fn, None)]
    seen: set[tuple[Any, str | None]] = set()
    while stack:
        node, inside = stack.pop()
        if node is None or (node, inside) in seen:
            continue
        seen.add((node, inside))
        inside = outputs.get(node, inside)
        variable = getattr(node, "variable", None)
        if variable is not None:
            layer = owner.get(id(variable))
            if layer is not None and layer != inside:
                return id(variable)
            continue
        for child, _ in node.next_functions:
            leaving = inside is not None and child is not None and child is inputs.get(inside)
            stack.append((child, None if leaving else inside))
    return None


def ghost(
    module: nn.Module,
    *,
    chunk_size: int | None = None,
    example_weights: ExampleWeights | None = None,
) -> Ghost:
    """Clip per microbatch without materialising per-microbatch gradients where layers allow.

    A strategy for :func:`~funcaccum.accumulate` and
    :func:`~funcaccum.train_step` with a norm-clipping reducer
    (:func:`~funcaccum.clipped_mean`), for a loss built on
    ``functional_model(module)``. For each chunk of microbatches it runs one
    forward pass, recording each tapped layer's input, and one backward pass
    for the layers' output gradients only (no weight gradients). From those,
    book-keeping style (Bu et al. 2023), with no second backward:

    - ``nn.Linear`` and ``nn.Embedding`` (a position embedding shared by the
      batch included): each microbatch's gradient norm by the ghost identity
      ``|sum_t d_t x_t^T|^2 = sum_{t,s} (d_t . d_s)(x_t . x_s)`` (Goodfellow
      2015; Li et al. 2022), or the direct form when cheaper, and the clipped
      sum ``sum_u c_u g_u`` as one matrix product per layer;
    - ``nn.LayerNorm`` and ``nn.Conv2d``: per-microbatch gradients from the
      same records (small, or cheap to form);
    - any other parameter: the general path, per-microbatch gradients by
      vmap, for those parameters only.

    Each microbatch's gradient is that of its own loss, as :func:`scan` takes
    it. For that, ghost must know how the loss over a chunk splits into the
    microbatches' losses: by default the loss is a **mean over examples**; a
    loss weighted otherwise (a mean over valid tokens) returns ``(loss,
    weight)`` with ``has_weight=True`` and ghost is told each example's weight
    (``example_weights``), the loss being ``sum_i w_i l_i / sum_i w_i``. On the
    first microbatches it sees, ghost checks this split against the loss run
    on each alone, checks that the loss uses the tapped layers' params only
    inside those layers (an L2 penalty on them would be missing from the
    norms), and refuses what fails; a loss that never runs the module given
    is refused too.

    Compared with the ``"vmap"`` or ``"chunked"`` strategies, memory holds
    activations and output gradients instead of ``K`` copies of the
    gradient. Compared with Opacus's ghost clipping, one backward pass is
    saved: the clipped sum comes from the records, not a second backward.

    Limits: runs eagerly (forward hooks and ``torch.autograd.grad`` do not
    trace under ``torch.compile(fullgraph=True)``); examples must not interact
    (no batch norm in training mode); each tapped layer runs once per forward
    (tied or reused layers: use ``"chunked"``); no aux outputs, no model state.

    Args:
        module: the module the loss runs through ``functional_model``.
        chunk_size: how many microbatches share a forward and backward pass,
            >= 1; None (default): a whole group of equal-size microbatches.
        example_weights: with ``has_weight``, ``fn(batch) -> (n,)``: each
            example's weight (valid tokens), summing to the weight the loss
            returns for the same batch.

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
        <https://arxiv.org/abs/2110.05679>`_, 2022;
        Bu et al., `Differentially Private Optimization on Large Model at Small Cost
        <https://proceedings.mlr.press/v202/bu23a.html>`_ (book-keeping), ICML 2023
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
    if example_weights is not None:
        check_callable("example_weights", example_weights, "a function of the batch")
    return Ghost(module, layers, fallback, chunk_size, example_weights)
