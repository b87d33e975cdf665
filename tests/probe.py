"""An adversarial probe: about 200 bad (or merely unusual) inputs, each outcome classified.

``python tests/probe.py`` runs every case and prints one line per case and the
counts; ``--only GROUP`` runs one group; ``--json FILE`` writes the outcomes.
Each case is a function that feeds funcaccum one input; it is classified as

- ``clear``: refused with a :class:`~funcaccum.FuncaccumError` whose message
  holds the case's words (the argument, path or thing it names), or, for an
  input that should work, it worked and gave the right answer;
- ``obscure``: refused, but with another exception (a raw ``TypeError``,
  torch's own message, an ``AttributeError`` from deep inside), or a
  FuncaccumError that does not name the thing; or an input that should work
  was refused;
- ``silent``: accepted, with a wrong or meaningless result (no error);
- ``crash``: the process died (a signal, or a hang past its timeout); the
  cases that can crash run in a subprocess.

``tests/test_probe.py`` runs the same table and requires every case to be
``clear``: the lasting form of the probe. It uses the public API only.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import gc
import io
import json
import os
import subprocess
import sys
import tempfile
import types
import zipfile
from collections import UserDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional

import funcaccum as fa
from funcaccum import optim

NAN, INF = float("nan"), float("inf")


@dataclass(frozen=True)
class Case:
    """One probe: ``run(tmp)`` feeds one input; ``words`` are what a clear refusal names."""

    group: str
    name: str
    run: Callable[[Path], Any]
    words: tuple[str, ...] = ()
    works: bool = False  # an input that should work (run asserts the answer)
    isolated: bool = False  # run in a subprocess: it may kill the process
    also_clear: tuple[type[BaseException], ...] = ()  # exceptions as clear as a FuncaccumError


CASES: list[Case] = []


def case(
    group: str, name: str, *words: str, works: bool = False, isolated: bool = False,
    also_clear: tuple[type[BaseException], ...] = (),
) -> Callable[[Callable[[Path], Any]], Callable[[Path], Any]]:  # fmt: skip
    def register(run: Callable[[Path], Any]) -> Callable[[Path], Any]:
        CASES.append(Case(group, name, run, words, works, isolated, also_clear))
        return run

    return register


def refuse(group: str, name: str, make: Callable[[], Any], *words: str) -> None:
    """A case from a function of no arguments."""
    CASES.append(Case(group, name, lambda _tmp: make(), words))


# --- Small models ---------------------------------------------------------------------------


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def params(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(3, generator=gen(0), dtype=dtype), "b": torch.zeros((), dtype=dtype)}


def batch(n: int = 8, dtype: torch.dtype = torch.float32, seed: int = 1) -> dict[str, torch.Tensor]:
    g = gen(seed)
    x = torch.randn(n, 3, generator=g, dtype=dtype)
    return {"x": x, "y": torch.randn(n, generator=g, dtype=dtype)}


def loss_fn(p: dict, b: Mapping) -> torch.Tensor:
    return ((b["x"] @ p["w"] + p["b"] - b["y"]) ** 2).mean()


def full_grad(p: dict, b: Mapping) -> dict:
    return torch.func.grad(loss_fn)(p, dict(b))


def close(a: dict, b: dict, rtol: float = 1e-5) -> None:
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=1e-6)


def step(
    optimizer: Any = None, loss: Callable = loss_fn, **accumulation: Any
) -> fa.TrainStep:
    return fa.train_step(
        loss,
        optimizer=optim.sgd(0.1) if optimizer is None else optimizer,
        accumulation=fa.Accumulation(**accumulation),
    )


def run_steps(s: fa.TrainStep, state: fa.TrainState, n: int, b: Any = None) -> fa.TrainState:
    for _ in range(n):
        state, _ = s(state, batch() if b is None else b)
    return state


def no_graph(tree: Any) -> None:
    """Raise unless no leaf carries an autograd graph (a silent leak otherwise)."""
    for leaf in torch.utils._pytree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor) and (leaf.grad_fn is not None or leaf.requires_grad):
            raise AssertionError("a result carries an autograd graph (grad_fn / requires_grad)")


def bn_model(track: bool = True, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=track), nn.Dropout(dropout),
        nn.Linear(4, 1),
    )  # fmt: skip


def bn_loss(apply: Callable) -> Callable:
    def loss(p: dict, state: dict, b: Mapping) -> tuple:
        out, state = apply(p, state, b["x"].to(p["0.weight"].dtype))  # compute_dtype's dtype
        return ((out.squeeze(-1).float() - b["y"]) ** 2).mean(), state

    return loss


def bn_setup(**accumulation: Any) -> tuple[fa.TrainStep, fa.TrainState, nn.Module, dict]:
    model = bn_model()
    apply, p, buffers = fa.functional_model(model, has_state=True)
    s = step(loss=bn_loss(apply), has_state=True, **accumulation)
    return s, s.init(p, model_state=buffers), model, buffers


def weighted(weight: Callable[[Mapping, dict], Any]) -> Callable:
    """A has_weight loss returning ``weight(batch, params)`` as its weight."""

    def loss(p: dict, b: Mapping) -> tuple:
        return loss_fn(p, b), weight(b, p)

    return loss


# --- Checkpoints -----------------------------------------------------------------------------


def saved(tmp: Path, state: Any = None, name: str = "ckpt.pt", **kwargs: Any) -> Path:
    path = tmp / name
    fa.save(path, step().init(params()) if state is None else state, **kwargs)
    return path


def template() -> fa.TrainState:
    return step().init(params())


def flip_in_record(path: Path, record: str, offset: int) -> None:
    """Flip one byte at ``offset`` inside the zip entry whose name ends with ``record``."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(record))
    # The local header: 30 bytes, the name, the extra field; then the data, stored uncompressed.
    name_length = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_length = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_length + extra_length
    data[start + min(offset, info.file_size - 1)] ^= 0x10  # inside the record
    path.write_bytes(bytes(data))


def trained_state(tmp: Path) -> tuple[Path, fa.TrainState]:
    s = step(optim.adamw(0.1))
    state = run_steps(s, s.init(params()), 2)
    return saved(tmp, state), s.init(params())


for index, offset in enumerate((0, 4, 8)):

    @case("checkpoint", f"flipped-byte-in-tensor-{index}", "ckpt.pt")
    def _flip_tensor(tmp: Path, offset: int = offset, index: int = index) -> None:
        path, like = trained_state(tmp)
        flip_in_record(path, f"data/{index}", offset)  # params['w'], opt state, ...
        fa.load(path, like=like, restore_rng=False)


@case("checkpoint", "flipped-byte-in-step-count", "ckpt.pt")
def _flip_step(tmp: Path) -> None:
    path, like = trained_state(tmp)
    with zipfile.ZipFile(path) as archive:
        records = sorted(n for n in archive.namelist() if "/data/" in n)
    flip_in_record(path, records[-1].split("/", 1)[1], 0)
    fa.load(path, like=like, restore_rng=False)


@case("checkpoint", "flipped-byte-in-rng-state", "ckpt.pt")
def _flip_rng(tmp: Path) -> None:
    path, like = trained_state(tmp)
    with zipfile.ZipFile(path) as archive:
        largest = max(
            (i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size
        )  # the CPU generator's state, 5 kB
    flip_in_record(path, largest.filename.split("/", 1)[1], 100)
    fa.load(path, like=like)


@case("checkpoint", "flipped-digit-in-metadata", "ckpt.pt")
def _flip_metadata(tmp: Path) -> None:
    path = saved(tmp, metadata={"epoch": 12345})
    data = path.read_bytes()
    path.write_bytes(data.replace(b"epoch", b"epocx", 1))
    checkpoint = fa.load(path, restore_rng=False)
    assert checkpoint.metadata == {"epoch": 12345}, checkpoint.metadata


for fraction in (0.5, 0.9, 0.01):

    @case("checkpoint", f"truncated-to-{fraction}", "ckpt.pt")
    def _truncated(tmp: Path, fraction: float = fraction) -> None:
        path = saved(tmp)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])
        fa.load(path, like=template(), restore_rng=False)


@case("checkpoint", "empty-file", "ckpt.pt")
def _empty(tmp: Path) -> None:
    (tmp / "ckpt.pt").write_bytes(b"")
    fa.load(tmp / "ckpt.pt")


@case("checkpoint", "random-bytes", "ckpt.pt")
def _random_bytes(tmp: Path) -> None:
    (tmp / "ckpt.pt").write_bytes(bytes(range(256)) * 8)
    fa.load(tmp / "ckpt.pt")


@case("checkpoint", "text-file", "ckpt.pt")
def _text(tmp: Path) -> None:
    (tmp / "ckpt.pt").write_text("epoch: 3\n")
    fa.load(tmp / "ckpt.pt")


@case("checkpoint", "missing-file", "nothere.pt", also_clear=(FileNotFoundError,))
def _missing(tmp: Path) -> None:
    fa.load(tmp / "nothere.pt")


@case("checkpoint", "a-directory", "adir", also_clear=(IsADirectoryError,))
def _directory(tmp: Path) -> None:
    (tmp / "adir").mkdir()
    fa.load(tmp / "adir")


@case("checkpoint", "plain-torch-save-dict", "ckpt.pt")
def _plain_dict(tmp: Path) -> None:
    torch.save({"w": torch.zeros(2)}, tmp / "ckpt.pt")
    fa.load(tmp / "ckpt.pt")


@case("checkpoint", "pickled-module", "ckpt.pt")
def _pickled(tmp: Path) -> None:
    torch.save(nn.Linear(2, 2), tmp / "ckpt.pt")
    fa.load(tmp / "ckpt.pt")


@case("checkpoint", "zip-without-a-record", "ckpt.pt")
def _zip_missing_record(tmp: Path) -> None:
    path = saved(tmp)
    with zipfile.ZipFile(path) as source:
        entries = [(i, source.read(i)) for i in source.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for info, data in entries:
            if not info.filename.endswith("data/0"):
                target.writestr(info, data)
    fa.load(path, like=template(), restore_rng=False)


@case("checkpoint", "save-parent-missing", "nodir")
def _save_parent_missing(tmp: Path) -> None:
    fa.save(tmp / "nodir" / "ckpt.pt", template())


@case("checkpoint", "save-parent-is-a-file", "afile")
def _save_parent_file(tmp: Path) -> None:
    (tmp / "afile").write_text("")
    fa.save(tmp / "afile" / "ckpt.pt", template())


@case("checkpoint", "save-into-proc", "/proc")
def _save_proc(_tmp: Path) -> None:
    fa.save("/proc/funcaccum-probe.pt", template())


@case("checkpoint", "save-onto-a-directory", "adir")
def _save_onto_dir(tmp: Path) -> None:
    (tmp / "adir").mkdir()
    fa.save(tmp / "adir", template())


@case("checkpoint", "save-into-sys", "/sys")
def _save_sys(_tmp: Path) -> None:
    fa.save("/sys/funcaccum-probe.pt", template())  # a read-only file system, even for root


refuse("checkpoint", "save-path-int", lambda: fa.save(42, template()), "path")
refuse("checkpoint", "load-path-int", lambda: fa.load(42), "path")
refuse(
    "checkpoint", "save-metadata-list",
    lambda: fa.save(tempfile.mktemp(), template(), metadata=[("epoch", 1)]), "metadata",
)  # fmt: skip
refuse(
    "checkpoint", "save-metadata-numpy",
    lambda: fa.save(tempfile.mktemp(), template(), metadata={"lr": np.float64(0.1)}), "metadata",
)  # fmt: skip
refuse(
    "checkpoint", "save-a-module",
    lambda: fa.save(tempfile.mktemp(), {"model": nn.Linear(2, 2)}), "state['model']",
)  # fmt: skip
refuse(
    "checkpoint", "save-generators-not-generators",
    lambda: fa.save(tempfile.mktemp(), template(), generators={"g": 0}), "generators",
)  # fmt: skip
refuse(
    "checkpoint", "save-meta-tensor",
    lambda: fa.save(tempfile.mktemp(), {"w": torch.zeros(2, device="meta")}), "state['w']",
)  # fmt: skip


@case("checkpoint", "load-like-other-shape", "state.params['w']")
def _like_shape(tmp: Path) -> None:
    fa.load(saved(tmp), like=step().init({"w": torch.zeros(4), "b": torch.zeros(())}))


@case("checkpoint", "load-like-other-dtype", "state.params['w']")
def _like_dtype(tmp: Path) -> None:
    fa.load(saved(tmp), like=step().init(params(torch.float64)))


@case("checkpoint", "load-like-other-optimizer", "state.opt_state")
def _like_optimizer(tmp: Path) -> None:
    fa.load(saved(tmp), like=step(optim.adam(0.1)).init(params()))


@case("checkpoint", "load-like-other-reducer", "state.reducer_carry")
def _like_reducer(tmp: Path) -> None:
    fa.load(saved(tmp), like=step(reducer=fa.adaptive()).init(params()))


@case("checkpoint", "load-like-with-model-state", "state.params")
def _like_model_state(tmp: Path) -> None:
    _, state, _, _ = bn_setup()
    fa.load(saved(tmp, state), like=template(), restore_rng=False)


@case("checkpoint", "load-like-a-module", "like=")
def _like_module(tmp: Path) -> None:
    fa.load(saved(tmp), like=nn.Linear(2, 2))


@case("checkpoint", "load-generators-without-rng", "generators=")
def _gen_no_rng(tmp: Path) -> None:
    fa.load(saved(tmp), restore_rng=False, generators={"g": torch.Generator()})


@case("checkpoint", "load-generator-missing", "generators=")
def _gen_missing(tmp: Path) -> None:
    fa.load(saved(tmp, generators={"noise": torch.Generator()}))


@case("checkpoint", "load-newer-version", "version")
def _newer(tmp: Path) -> None:
    path = saved(tmp)
    payload = torch.load(path, weights_only=True)
    payload["version"] = 99
    torch.save(payload, path)
    fa.load(path)


@case("checkpoint", "load-local-namedtuple-without-like", "like=")
def _local_namedtuple(tmp: Path) -> None:
    class Local(NamedTuple):
        w: torch.Tensor

    fa.load(saved(tmp, Local(torch.zeros(2))), restore_rng=False)


@case("checkpoint", "round-trip-bit-identical", works=True)
def _round_trip(tmp: Path) -> None:
    path, like = trained_state(tmp)
    loaded = fa.load(path, like=like, restore_rng=False).state
    reference = torch.load(path, weights_only=True)
    assert loaded.params["w"].shape == (3,)
    assert reference["format"] == "funcaccum-checkpoint"


# --- Strategies of one's own -----------------------------------------------------------------


class Custom(NamedTuple):
    """A strategy whose run is ``make(folder)``."""

    make: Callable[[Any], Any]

    def build(self, folder: Any) -> Any:
        return self.make(folder)


def with_inner(body: Callable) -> Custom:
    """A strategy that runs scan() and then lets ``body`` misbehave."""

    def make(folder: Any) -> Any:
        def run(p: Any, state: Any, group: Any, model_state: Any) -> Any:
            return body(folder, p, state, group, model_state)

        return run

    return Custom(make)


def scan_run(folder: Any, p: Any, state: Any, group: Any, model_state: Any) -> Any:
    return fa.scan().build(folder)(p, state, group, model_state)


def fold_first_only(folder: Any, p: Any, state: Any, group: Any, model_state: Any) -> Any:
    first = torch.utils._pytree.tree_map(lambda x: x[:1], group.batch)
    microbatch = {k: v[0] for k, v in first.items()}
    grads, out = folder.value_and_grad(p, model_state, microbatch, group.size)
    state = folder.add(state, grads, out)
    return state, fa.extend.MicrobatchOutput(out.loss[None], out.weight[None]), model_state


def fold_twice(folder: Any, p: Any, state: Any, group: Any, model_state: Any) -> Any:
    state, outputs, model_state = scan_run(folder, p, state, group, model_state)
    state, _, model_state = scan_run(folder, p, state, group, model_state)
    return state, outputs, model_state


def grads_changed(change: Callable[[dict], dict]) -> Callable:
    def body(folder: Any, p: Any, state: Any, group: Any, model_state: Any) -> Any:
        losses = []
        for i in range(group.count):
            microbatch = {k: v[i] for k, v in group.batch.items()}
            grads, out = folder.value_and_grad(p, model_state, microbatch, group.size)
            state = folder.add(state, change(grads), out)
            losses.append(out)
        stacked = fa.extend.MicrobatchOutput(
            torch.stack([o.loss for o in losses]), torch.stack([o.weight for o in losses])
        )
        return state, stacked, model_state

    return body


def user_strategy_step(strategy: Any, n: int = 2) -> None:
    s = step(strategy=strategy, num_microbatches=4)
    state = s.init(params())
    for _ in range(n):
        state, _ = s(state, batch(12))
    no_graph(state)
    assert state.params["w"].shape == (3,), f"params['w'] became {tuple(state.params['w'].shape)}"


def user_strategy_accumulate(strategy: Any) -> None:
    result = fa.accumulate(loss_fn, params(), batch(12), num_microbatches=4, strategy=strategy)
    close(result.grads, full_grad(params(), batch(12)))


refuse("strategy", "build-returns-none", lambda: step(strategy=Custom(lambda f: None)), "build")
refuse("strategy", "build-returns-int", lambda: step(strategy=Custom(lambda f: 42)), "build")
refuse(
    "strategy", "folds-part-of-group-step",
    lambda: user_strategy_step(with_inner(fold_first_only)), "microbatch",
)  # fmt: skip
refuse(
    "strategy", "folds-part-of-group-accumulate",
    lambda: user_strategy_accumulate(with_inner(fold_first_only)), "microbatch",
)  # fmt: skip
refuse(
    "strategy", "folds-twice-step", lambda: user_strategy_step(with_inner(fold_twice)),
    "microbatch",
)  # fmt: skip
refuse(
    "strategy", "folds-twice-accumulate",
    lambda: user_strategy_accumulate(with_inner(fold_twice)), "microbatch",
)  # fmt: skip
refuse(
    "strategy", "add-grads-extra-leading-dim",
    lambda: user_strategy_step(with_inner(grads_changed(lambda g: {k: v[None] for k, v in g.items()}))),  # noqa: E501
    "a tree like the params", "grads['w']: (1, 3)",  # summed in place into the fold's own state
)  # fmt: skip
refuse(
    "strategy", "add-grads-extra-leading-dim-accumulate",
    lambda: user_strategy_accumulate(with_inner(grads_changed(lambda g: {k: v[None] for k, v in g.items()}))),  # noqa: E501
    "a tree like the params", "grads['w']: (1, 3)",
)  # fmt: skip
refuse(
    "strategy", "add-grads-missing-key",
    lambda: user_strategy_step(with_inner(grads_changed(lambda g: {"w": g["w"]}))), "'b'",
)  # fmt: skip
refuse(
    "strategy", "add-grads-extra-key",
    lambda: user_strategy_step(with_inner(grads_changed(lambda g: {**g, "c": g["w"]}))), "'c'",
)  # fmt: skip
refuse(
    "strategy", "add-grads-wrong-shape",
    lambda: user_strategy_step(with_inner(grads_changed(lambda g: {**g, "w": g["w"][:2]}))),
    "grads['w']",
)  # fmt: skip
refuse(
    "strategy", "add-grads-a-list",
    lambda: user_strategy_step(with_inner(grads_changed(lambda g: list(g.values())))), "params",
)  # fmt: skip
refuse(
    "strategy", "run-returns-state-only",
    lambda: user_strategy_step(with_inner(lambda *a: scan_run(*a)[0])), "run",
)  # fmt: skip
refuse(
    "strategy", "run-returns-a-dict-state",
    lambda: user_strategy_step(with_inner(lambda *a: ({}, *scan_run(*a)[1:]))), "FoldState",
)  # fmt: skip
refuse(
    "strategy", "run-returns-no-outputs",
    lambda: user_strategy_step(with_inner(lambda *a: (scan_run(*a)[0], None, a[-1]))),
    "MicrobatchOutput",
)  # fmt: skip
refuse("strategy", "the-class-scan", lambda: step(strategy=type(fa.scan())), "class")
refuse("strategy", "the-function-scan", lambda: step(strategy=fa.scan), "scan()")
refuse("strategy", "shorthand-capitalised", lambda: step(strategy="Scan"), "strategy")
refuse("strategy", "chunked-zero", lambda: fa.chunked(0), "size")
refuse("strategy", "chunked-float", lambda: fa.chunked(1.5), "size")
refuse("strategy", "vmap-randomness-bool", lambda: fa.vmap(randomness=True), "randomness")
refuse("strategy", "vmap-model-state-str", lambda: fa.vmap(model_state="bn"), "model_state")
refuse(
    "strategy", "add-weight-shape-mismatch",
    lambda: user_strategy_step(with_inner(grads_changed(lambda g: g))._replace(
        make=lambda folder: (lambda p, s, grp, ms: (
            folder.add(s, {k: v.expand(2, *v.shape) for k, v in folder.value_and_grad(
                p, ms, {k: v[0] for k, v in grp.batch.items()}, grp.size)[0].items()},
                fa.extend.MicrobatchOutput(torch.tensor(1.0), torch.ones(3))),
            fa.extend.MicrobatchOutput(torch.ones(grp.count), torch.ones(grp.count)), ms)))),
    "weight",
)  # fmt: skip


# --- Model state: batch norm, the train/eval flag ---------------------------------------------


@case("model_state", "nan-running-mean-at-init", "running_mean")
def _nan_init(_tmp: Path) -> None:
    s, _, _, buffers = bn_setup()
    p = fa.functional_model(bn_model(), has_state=True)[1]
    s.init(p, model_state={**buffers, "1.running_mean": torch.full((4,), NAN)})


@case("model_state", "inf-running-var-at-init", "running_var")
def _inf_init(_tmp: Path) -> None:
    s, _, _, buffers = bn_setup()
    p = fa.functional_model(bn_model(), has_state=True)[1]
    s.init(p, model_state={**buffers, "1.running_var": torch.full((4,), INF)})


@case("model_state", "batch-drives-running-var-to-inf", "model state")
def _var_to_inf(_tmp: Path) -> None:
    s, state, _, _ = bn_setup(num_microbatches=2)
    b = {"x": torch.randn(8, 3) * 1e20, "y": torch.zeros(8)}
    for _ in range(12):
        state, _ = s(state, b)
    assert torch.isfinite(state.model_state["1.running_var"]).all(), "running_var is Inf"


@case("model_state", "has-state-step-given-plain-state", "model_state")
def _plain_state(_tmp: Path) -> None:
    s, _, _, _ = bn_setup()
    p = fa.functional_model(bn_model(), has_state=True)[1]
    plain = step().init(p)
    s(plain, batch())


@case("model_state", "has-state-init-without-model-state", "model_state")
def _no_model_state(_tmp: Path) -> None:
    s, _, _, _ = bn_setup()
    s.init(fa.functional_model(bn_model(), has_state=True)[1])


refuse(
    "model_state", "plain-init-with-model-state",
    lambda: step().init(params(), model_state={"m": torch.zeros(2)}), "model_state",
)  # fmt: skip


@case("model_state", "model-state-of-another-model", "model_state")
def _other_keys(_tmp: Path) -> None:
    s, _, _, _ = bn_setup()
    p = fa.functional_model(bn_model(), has_state=True)[1]
    state = s.init(p, model_state={"0.running_mean": torch.zeros(4)})
    s(state, batch())


@case("model_state", "model-state-wrong-shape", "1.running_mean")
def _wrong_shape(_tmp: Path) -> None:
    s, _, _, buffers = bn_setup()
    p = fa.functional_model(bn_model(), has_state=True)[1]
    state = s.init(p, model_state={**buffers, "1.running_mean": torch.zeros(5)})
    s(state, batch())


@case("model_state", "model-state-wrong-dtype", "1.running_mean")
def _wrong_dtype(_tmp: Path) -> None:
    s, _, _, buffers = bn_setup()
    p = fa.functional_model(bn_model(), has_state=True)[1]
    state = s.init(p, model_state={**buffers, "1.running_mean": torch.zeros(4, dtype=torch.float64)})  # noqa: E501
    s(state, batch())
    assert state.model_state["1.running_mean"].dtype == torch.float32, "dtype changed"


@case("model_state", "batch-norm-one-example-microbatches", "batch norm", "microbatch")
def _bn_one(_tmp: Path) -> None:
    s, state, _, _ = bn_setup(microbatch_size=1)
    s(state, batch(4))


@case("model_state", "bf16-compute-batch-norm-scan", works=True)
def _bf16_bn(_tmp: Path) -> None:
    model = bn_model()
    apply, p, buffers = fa.functional_model(model, has_state=True)
    s = fa.train_step(bn_loss(apply), optimizer=optim.sgd(0.1), compute_dtype=torch.bfloat16,
                      accumulation=fa.Accumulation(num_microbatches=2, has_state=True))  # fmt: skip
    state, metrics = s(s.init(p, model_state=buffers), batch())
    assert not metrics.skipped
    assert state.model_state["1.running_mean"].dtype == torch.float32


@case("model_state", "bf16-compute-batch-norm-vmap", works=True)
def _bf16_bn_vmap(_tmp: Path) -> None:
    model = bn_model()
    apply, p, buffers = fa.functional_model(model, has_state=True)
    strategy = fa.vmap(model_state=fa.running_stats(model))
    s = fa.train_step(bn_loss(apply), optimizer=optim.sgd(0.1), compute_dtype=torch.bfloat16,
                      accumulation=fa.Accumulation(num_microbatches=2, has_state=True,
                                                   strategy=strategy))  # fmt: skip
    state, metrics = s(s.init(p, model_state=buffers), batch())
    assert not metrics.skipped
    assert state.model_state["1.running_mean"].dtype == torch.float32


@case("model_state", "batch-norm-without-running-stats", works=True)
def _bn_untracked(_tmp: Path) -> None:
    model = bn_model(track=False)
    apply, p, buffers = fa.functional_model(model)
    s = step(loss=lambda q, b: ((apply(q, buffers, b["x"]).squeeze(-1) - b["y"]) ** 2).mean(),
             num_microbatches=2)  # fmt: skip
    _, metrics = s(s.init(p), batch())
    assert not metrics.skipped


@case("model_state", "batch-norm-without-running-stats-has-state", "has_state")
def _bn_untracked_state(_tmp: Path) -> None:
    model = bn_model(track=False)
    apply, p, buffers = fa.functional_model(model, has_state=True)
    s = step(loss=bn_loss(apply), has_state=True)
    s(s.init(p, model_state=buffers), batch())


@case("model_state", "eval-made-then-train-writes-buffers", "train")
def _eval_then_train(_tmp: Path) -> None:
    model = bn_model().eval()
    apply, p, buffers = fa.functional_model(model)
    before = model[1].running_mean.clone()
    s = step(loss=lambda q, b: ((apply(q, buffers, b["x"]).squeeze(-1) - b["y"]) ** 2).mean())
    model.train()
    s(s.init(p), batch())
    assert torch.equal(model[1].running_mean, before), "the caller's running_mean was written"


@case("model_state", "train-made-then-eval-trains-in-eval", "eval")
def _train_then_eval(_tmp: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    apply, p, buffers = fa.functional_model(model)
    s = step(loss=lambda q, b: ((apply(q, buffers, b["x"]).squeeze(-1) - b["y"]) ** 2).mean())
    state = s.init(p)
    model.eval()  # an evaluation...
    s(state, batch())  # ...and training goes on in eval mode: no dropout


@case("model_state", "has-state-train-made-then-eval", "eval")
def _state_train_then_eval(_tmp: Path) -> None:
    s, state, model, _ = bn_setup()
    model.eval()
    s(state, batch())


refuse("model_state", "functional-model-of-class", lambda: fa.functional_model(nn.Linear), "class")
refuse("model_state", "functional-model-of-function", lambda: fa.functional_model(loss_fn), "Module")  # noqa: E501
refuse(
    "model_state", "functional-model-without-params",
    lambda: fa.functional_model(nn.ReLU()), "trainable",
)  # fmt: skip
refuse(
    "model_state", "functional-model-bn-train-no-state",
    lambda: fa.functional_model(bn_model()), "has_state",
)  # fmt: skip
def with_extra_buffer() -> nn.Module:
    model = bn_model()
    model.register_buffer("steps", torch.zeros(()))
    return model


refuse("model_state", "running-stats-other-buffers", lambda: fa.running_stats(with_extra_buffer()), "steps")  # noqa: E501
refuse(
    "model_state", "vmap-has-state-without-combine",
    lambda: bn_setup(strategy=fa.vmap()), "running_stats",
)  # fmt: skip
refuse(
    "model_state", "load-into-unknown-name",
    lambda: fa.load_into(nn.Linear(2, 2), {"nope": torch.zeros(2)}), "nope",
)  # fmt: skip
refuse(
    "model_state", "load-into-wrong-dtype",
    lambda: fa.load_into(nn.Linear(2, 2), {"bias": torch.zeros(2, dtype=torch.float64)}), "bias",
)  # fmt: skip


@case("model_state", "has-state-loss-returns-no-pair", "has_state")
def _state_no_pair(_tmp: Path) -> None:
    apply, p, buffers = fa.functional_model(bn_model(), has_state=True)
    s = step(loss=lambda q, st, b: bn_loss(apply)(q, st, b)[0], has_state=True)
    s(s.init(p, model_state=buffers), batch())


@case("model_state", "has-state-loss-drops-a-buffer", "model_state")
def _state_drops(_tmp: Path) -> None:
    apply, p, buffers = fa.functional_model(bn_model(), has_state=True)

    def loss(q: dict, st: dict, b: Mapping) -> tuple:
        value, st = bn_loss(apply)(q, st, b)
        return value, {k: v for k, v in st.items() if "var" not in k}

    s = step(loss=loss, has_state=True, num_microbatches=2)
    s(s.init(p, model_state=buffers), batch())


@case("model_state", "model-state-a-list", "model_state")
def _state_list(_tmp: Path) -> None:
    apply, p, buffers = fa.functional_model(bn_model(), has_state=True)
    s = step(loss=bn_loss(apply), has_state=True)
    s(s.init(p, model_state=list(buffers.values())), batch())


# --- Schedules and update rules ---------------------------------------------------------------


def with_schedule(schedule: Callable, steps: int = 8) -> fa.TrainState:
    s = step(optim.sgd(schedule))
    state = s.init(params())
    for _ in range(steps):
        state, metrics = s(state, batch())
        rate = metrics.learning_rate
        if not (torch.isfinite(rate) and rate >= 0):
            raise AssertionError(f"a step ran with learning rate {float(rate)}")
    return state


refuse("schedule", "constant-negative", lambda: with_schedule(optim.constant_schedule(-0.1)), "learning_rate")  # noqa: E501
refuse("schedule", "linear-crosses-zero", lambda: with_schedule(optim.linear_schedule(0.1, -0.1, 4)), "learning_rate")  # noqa: E501
refuse("schedule", "returns-nan", lambda: with_schedule(lambda c: torch.full((), NAN, dtype=torch.float64)), "learning_rate")  # noqa: E501
refuse("schedule", "returns-inf", lambda: with_schedule(lambda c: torch.full((), INF, dtype=torch.float64)), "learning_rate")  # noqa: E501
refuse("schedule", "returns-minus-inf", lambda: with_schedule(lambda c: torch.full((), -INF, dtype=torch.float64)), "learning_rate")  # noqa: E501
refuse("schedule", "returns-nan-later", lambda: with_schedule(lambda c: torch.where(c < 3, 0.1, NAN).double()), "learning_rate")  # noqa: E501
refuse("schedule", "returns-a-vector", lambda: with_schedule(lambda c: torch.full((3,), 0.1, dtype=torch.float64)), "learning_rate")  # noqa: E501
refuse("schedule", "returns-a-bool", lambda: with_schedule(lambda c: c >= 0), "learning_rate")
refuse("schedule", "returns-a-string", lambda: with_schedule(lambda c: "0.1"), "learning_rate")
refuse("schedule", "takes-two-arguments", lambda: with_schedule(lambda c, d: 0.1), "schedule")
refuse("schedule", "join-with-negative", lambda: with_schedule(optim.join_schedules([optim.constant_schedule(0.1), optim.constant_schedule(-0.1)], [2])), "learning_rate")  # noqa: E501
refuse("schedule", "exponential-with-negative-init", lambda: with_schedule(optim.exponential_decay(-0.1, 2, 0.5)), "learning_rate")  # noqa: E501
refuse("schedule", "cosine-negative", lambda: with_schedule(optim.cosine_decay_schedule(-0.1, 4)), "learning_rate")  # noqa: E501
refuse("schedule", "adamw-negative-schedule", lambda: step(optim.adamw(optim.constant_schedule(-1e-3))).init(params()), "learning_rate")  # noqa: E501


@case("schedule", "returns-a-python-float", works=True)
def _float_schedule(_tmp: Path) -> None:
    state = with_schedule(lambda c: 0.1)
    assert state.opt_state[-1].hyperparams["learning_rate"].dtype == torch.float64


@case("schedule", "returns-an-int-tensor", works=True)
def _int_schedule(_tmp: Path) -> None:
    with_schedule(lambda c: torch.zeros((), dtype=torch.int64))


refuse("schedule", "sgd-negative", lambda: optim.sgd(-0.1), "learning_rate")
refuse("schedule", "sgd-nan", lambda: optim.sgd(NAN), "learning_rate")
refuse("schedule", "sgd-string", lambda: optim.sgd("0.1"), "learning_rate")
refuse("schedule", "adam-b1-one", lambda: optim.adam(0.1, b1=1.0), "b1")
refuse("schedule", "adam-eps-negative", lambda: optim.adam(0.1, eps=-1.0), "eps")
refuse("schedule", "lion-b2-nan", lambda: optim.lion(0.1, b2=NAN), "b2")
refuse("schedule", "clip-zero", lambda: optim.clip_by_global_norm(0.0), "max_norm")
refuse("schedule", "set-hyperparams-negative", lambda: optim.set_hyperparams(optim.sgd(0.1).init(params()), learning_rate=-1.0), "learning_rate")  # noqa: E501
refuse("schedule", "set-hyperparams-unknown", lambda: optim.set_hyperparams(optim.sgd(0.1).init(params()), momentum_typo=0.9), "momentum_typo")  # noqa: E501
refuse("schedule", "warmup-longer-than-decay", lambda: optim.warmup_cosine_decay_schedule(0.0, 1.0, 10, 5), "warmup_steps")  # noqa: E501
refuse("schedule", "exponential-rate-zero", lambda: optim.exponential_decay(1.0, 2, 0.0), "decay_rate")  # noqa: E501
refuse("schedule", "cosine-alpha-two", lambda: optim.cosine_decay_schedule(1.0, 10, alpha=2.0), "alpha")  # noqa: E501
refuse("schedule", "piecewise-negative-scale", lambda: optim.piecewise_constant_schedule(1.0, {2: -1.0}), "boundaries_and_scales")  # noqa: E501
refuse("schedule", "join-mismatched", lambda: optim.join_schedules([optim.constant_schedule(1.0)], [2]), "boundar")  # noqa: E501
refuse("schedule", "torch-optimizer", lambda: fa.train_step(loss_fn, optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)), "optimizer")  # noqa: E501
refuse("schedule", "plain-tuple-optimizer", lambda: fa.train_step(loss_fn, optimizer=(lambda p: (), lambda u, s, p=None: (u, s))), "optimizer")  # noqa: E501
refuse("schedule", "chain-with-a-string", lambda: optim.chain(optim.sgd(0.1), "adam"), "chain")
refuse("schedule", "progress-clock-with-mean", lambda: fa.train_step(loss_fn, optimizer=optim.sgd(0.1), schedule_clock="progress"), "progress")  # noqa: E501
refuse("schedule", "max-skips-zero", lambda: fa.train_step(loss_fn, optimizer=optim.sgd(0.1), max_consecutive_skips=0), "max_consecutive_skips")  # noqa: E501


def rule(update: Callable) -> optim.GradientTransformation:
    return optim.GradientTransformation(lambda p: (), update)


refuse("schedule", "update-returns-one-value", lambda: run_steps(step(rule(lambda u, s, p=None: u)), step(rule(lambda u, s, p=None: u)).init(params()), 1), "update")  # noqa: E501


@case("schedule", "update-returns-wrong-shape", "['w']")
def _update_shape(_tmp: Path) -> None:
    s = step(rule(lambda u, st, p=None: ({**u, "w": u["w"].expand(2, 3)}, st)))
    state = run_steps(s, s.init(params()), 1)
    assert state.params["w"].shape == (3,), f"params['w'] became {tuple(state.params['w'].shape)}"


@case("schedule", "update-returns-missing-key", "'b'")
def _update_missing(_tmp: Path) -> None:
    s = step(rule(lambda u, st, p=None: ({"w": u["w"]}, st)))
    run_steps(s, s.init(params()), 1)


@case("schedule", "learning-rate-requires-grad", works=True)
def _rate_grad(_tmp: Path) -> None:
    s = step(optim.sgd(torch.tensor(0.1, requires_grad=True)))
    state = run_steps(s, s.init(params()), 2)
    no_graph(state.params)


@case("schedule", "opt-state-of-another-optimizer", "chain()")
def _other_opt_state(_tmp: Path) -> None:
    s = step(optim.adam(0.1))
    state = s.init(params())._replace(opt_state=optim.sgd(0.1).init(params()))
    s(state, batch())


# --- Batches ---------------------------------------------------------------------------------


class BatchEncodingLike(UserDict):
    """What a Hugging Face collator returns: a Mapping (UserDict), not a dict."""


class PlainMapping(Mapping):
    def __init__(self, data: dict) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def mapping_works(wrap: Callable[[dict], Mapping], where: str) -> Callable[[Path], None]:
    def run(_tmp: Path) -> None:
        b = batch(12)
        if where == "accumulate":
            result = fa.accumulate(loss_fn, params(), wrap(b), num_microbatches=3)
            close(result.grads, full_grad(params(), b))
        elif where == "step":
            s = step(num_microbatches=3)
            _, metrics = s(s.init(params()), wrap(b))
            torch.testing.assert_close(metrics.loss, loss_fn(params(), b))
        elif where == "fold":
            s = step(num_microbatches=3)
            folded = s.fold(s.init(params()), wrap(b))
            assert int(folded.state.microbatches) == 3
        elif where == "split":
            assert len(fa.split_microbatches(wrap(b), num_microbatches=3)) == 1
        elif where == "epoch":
            s = step(num_microbatches=3)
            _, summary = fa.run_epoch(s, s.init(params()), [wrap(b), wrap(b)])
            assert summary.steps == 2
        elif where == "vmap":
            result = fa.accumulate(loss_fn, params(), wrap(b), num_microbatches=3, strategy="vmap")
            close(result.grads, full_grad(params(), b))
        elif where == "microbatch_grads":
            out = fa.microbatch_grads(loss_fn, params(), wrap(b), microbatch_size=1)
            assert out.grads["w"].shape == (12, 3)

    return run


for wrap_name, wrap in (("userdict", BatchEncodingLike), ("mapping", PlainMapping),
                        ("mappingproxy", types.MappingProxyType)):  # fmt: skip
    for where in ("accumulate", "step", "fold", "split", "epoch", "vmap", "microbatch_grads"):
        if wrap_name != "userdict" and where in ("fold", "split", "vmap", "microbatch_grads"):
            continue
        CASES.append(Case("batch", f"{wrap_name}-{where}", mapping_works(wrap, where), works=True))

CASES.append(Case("batch", "nested-userdict", mapping_works(
    lambda b: BatchEncodingLike({"x": b["x"], "y": b["y"]}), "accumulate"), works=True))


def grad_batch(strategy: str, how: str) -> None:
    b = batch(8)
    b["x"] = b["x"].clone().requires_grad_()
    if how == "accumulate":
        result = fa.accumulate(loss_fn, params(), b, num_microbatches=2, strategy=strategy)
        no_graph(result)
    else:
        s = step(strategy=strategy, num_microbatches=2)
        state, metrics = s(s.init(params()), b)
        no_graph(state)
        no_graph(metrics)


for strategy_name in ("vmap", "scan"):
    for how in ("accumulate", "step"):
        CASES.append(Case(
            "batch", f"requires-grad-{strategy_name}-{how}",
            lambda _t, s=strategy_name, h=how: grad_batch(s, h), works=True,
        ))  # fmt: skip


refuse("batch", "numpy-leaf", lambda: fa.accumulate(loss_fn, params(), {"x": np.zeros((4, 3)), "y": torch.zeros(4)}), "batch['x']")  # noqa: E501
refuse("batch", "list-of-floats-leaf", lambda: fa.accumulate(loss_fn, params(), {"x": torch.zeros(4, 3), "y": [0.0] * 4}), "batch['y']")  # noqa: E501
refuse("batch", "string-leaf", lambda: fa.accumulate(loss_fn, params(), {**batch(4), "text": "hello"}), "batch['text']")  # noqa: E501
refuse("batch", "empty", lambda: fa.accumulate(loss_fn, params(), batch(0)), "empty")
refuse("batch", "zero-d-leaf", lambda: fa.accumulate(loss_fn, params(), {**batch(4), "t": torch.tensor(1.0)}), "batch['t']")  # noqa: E501
refuse("batch", "mismatched-sizes", lambda: fa.accumulate(loss_fn, params(), {"x": torch.zeros(4, 3), "y": torch.zeros(5)}), "batch['y']")  # noqa: E501
refuse("batch", "more-microbatches-than-examples", lambda: fa.accumulate(loss_fn, params(), batch(3), num_microbatches=4), "num_microbatches")  # noqa: E501
refuse("batch", "a-generator", lambda: fa.accumulate(loss_fn, params(), (x for x in [batch()])), "generator")  # noqa: E501
refuse("batch", "none", lambda: fa.accumulate(loss_fn, params(), None), "batch")
refuse("batch", "a-dataset", lambda: fa.accumulate(loss_fn, params(), torch.utils.data.TensorDataset(torch.zeros(4, 3))), "TensorDataset")  # noqa: E501
refuse("batch", "batch-dim-out-of-range", lambda: fa.accumulate(loss_fn, params(), batch(4), batch_dim=5), "batch_dim")  # noqa: E501
refuse("batch", "batch-dim-string", lambda: fa.accumulate(loss_fn, params(), batch(4), batch_dim="1"), "batch_dim")  # noqa: E501
refuse("batch", "meta-batch", lambda: fa.accumulate(loss_fn, params(), batch(4).__class__({k: v.to("meta") for k, v in batch(4).items()})), "meta")  # noqa: E501
refuse("batch", "step-state-and-batch-swapped", lambda: step().__call__(batch(), step().init(params())), "TrainState")  # noqa: E501
refuse("batch", "step-state-none", lambda: step()(None, batch()), "TrainState")
refuse("batch", "fold-folded-not-a-folded", lambda: step().fold(step().init(params()), batch(), folded=step().accumulation.init(params())), "Folded")  # noqa: E501
refuse("batch", "apply-a-fold-state", lambda: step().apply(step().init(params()), step().accumulation.init(params())), "Folded")  # noqa: E501
refuse("batch", "accumulation-fold-given-a-folded", lambda: fa.Accumulation().fold(loss_fn, params(), batch(), fa.Folded(fa.Accumulation().init(params()))), "FoldState")  # noqa: E501
refuse("batch", "loss-returns-a-float", lambda: fa.accumulate(lambda p, b: 1.0, params(), batch()), "0-d tensor")  # noqa: E501
refuse("batch", "loss-returns-int-tensor", lambda: fa.accumulate(lambda p, b: torch.tensor(1), params(), batch()), "floating")  # noqa: E501
refuse("batch", "loss-returns-complex", lambda: fa.accumulate(lambda p, b: (b["x"] @ p["w"]).mean() * 1j, params(), batch()), "complex")  # noqa: E501
refuse("batch", "loss-returns-a-vector", lambda: fa.accumulate(lambda p, b: b["x"] @ p["w"], params(), batch()), "0-d")  # noqa: E501
refuse("batch", "loss-detached", lambda: fa.accumulate(lambda p, b: loss_fn(p, b).detach(), params(), batch()), "detach")  # noqa: E501
refuse("batch", "loss-pair-without-flag", lambda: fa.accumulate(lambda p, b: (loss_fn(p, b), 4), params(), batch()), "has_weight")  # noqa: E501
refuse("batch", "aux-a-string", lambda: fa.accumulate(lambda p, b: (loss_fn(p, b), "note"), params(), batch(), has_aux=True, num_microbatches=2), "aux")  # noqa: E501


# --- Weights --------------------------------------------------------------------------------


def weight_accumulate(weight: Callable, strategy: str = "scan") -> None:
    result = fa.accumulate(weighted(weight), params(), batch(12), num_microbatches=3,
                           has_weight=True, strategy=strategy)  # fmt: skip
    if not (torch.isfinite(result.loss) and all(torch.isfinite(g).all() for g in result.grads.values())):  # noqa: E501
        raise AssertionError(f"a NaN result: loss {float(result.loss)}")


def weight_step(weight: Callable) -> None:
    s = step(loss=weighted(weight), num_microbatches=3, has_weight=True)
    state = s.init(params())
    for _ in range(3):
        state, metrics = s(state, batch(12))
    if metrics.skipped:
        raise AssertionError("the step was skipped without a word")


def first_negative(b: Mapping, p: dict) -> torch.Tensor:
    return torch.where(b["y"][0] > -99, -1.0, 1.0)  # one microbatch weighs -1


for name, weight in (
    ("all-zero", lambda b, p: torch.zeros(())),
    ("negative", first_negative),
    ("all-negative", lambda b, p: -torch.ones(())),
    ("nan", lambda b, p: torch.full((), NAN)),
    ("inf", lambda b, p: torch.full((), INF)),
    ("bool-tensor", lambda b, p: torch.ones((), dtype=torch.bool)),
    ("python-bool", lambda b, p: True),
    ("complex", lambda b, p: torch.ones((), dtype=torch.complex64)),
    ("string", lambda b, p: "4"),
    ("vector", lambda b, p: torch.ones(4)),
):
    CASES.append(Case("weight", f"{name}-accumulate", lambda _t, w=weight: weight_accumulate(w), ("weight",)))  # noqa: E501
    if name in ("all-zero", "negative", "nan", "bool-tensor", "inf"):
        CASES.append(Case("weight", f"{name}-step", lambda _t, w=weight: weight_step(w), ("weight",)))  # noqa: E501
    if name in ("negative", "all-zero"):
        CASES.append(Case("weight", f"{name}-vmap", lambda _t, w=weight: weight_accumulate(w, "vmap"), ("weight",)))  # noqa: E501


@case("weight", "requires-grad-weight", works=True)
def _grad_weight(_tmp: Path) -> None:
    result = fa.accumulate(weighted(lambda b, p: p["w"].abs().sum() + 1), params(), batch(12),
                           num_microbatches=3, has_weight=True)  # fmt: skip
    no_graph(result)


@case("weight", "python-float-weight", works=True)
def _float_weight(_tmp: Path) -> None:
    result = fa.accumulate(weighted(lambda b, p: 4.0), params(), batch(12), num_microbatches=3,
                           has_weight=True)  # fmt: skip
    assert float(result.weight) == 12.0


# --- Dtypes and params ----------------------------------------------------------------------


refuse("dtype", "compute-float16", lambda: run_steps(fa.train_step(loss_fn, optimizer=optim.sgd(0.1), compute_dtype=torch.float16), fa.train_step(loss_fn, optimizer=optim.sgd(0.1)).init(params()), 1), "float16")  # noqa: E501
refuse("dtype", "params-float16-step", lambda: run_steps(step(), step().init(params(torch.float16)), 1, batch(dtype=torch.float16)), "float16")  # noqa: E501
refuse("dtype", "compute-dtype-string", lambda: fa.train_step(loss_fn, optimizer=optim.sgd(0.1), compute_dtype="bfloat16"), "compute_dtype")  # noqa: E501
refuse("dtype", "compute-dtype-int", lambda: fa.train_step(loss_fn, optimizer=optim.sgd(0.1), compute_dtype=torch.int8), "compute_dtype")  # noqa: E501
refuse("dtype", "accum-dtype-int", lambda: fa.mean(accum_dtype=torch.int32), "accum_dtype")
for where in ("accumulate", "microbatch_grads", "init", "fold", "step-init"):
    for kind, leaf in (
        ("meta", lambda: torch.zeros(3, device="meta")),
        ("int64", lambda: torch.zeros(3, dtype=torch.int64)),
        ("python-float", lambda: 0.5),
        ("numpy", lambda: np.zeros(3, dtype=np.float32)),
        ("complex", lambda: torch.zeros(3, dtype=torch.complex64)),
        ("float8", lambda: torch.zeros(3).to(torch.float8_e4m3fn)),
    ):
        def bad_params(where: str = where, leaf: Callable = leaf) -> None:
            p = {"w": leaf(), "b": torch.zeros(())}
            if where == "accumulate":
                fa.accumulate(loss_fn, p, batch())
            elif where == "microbatch_grads":
                fa.microbatch_grads(loss_fn, p, batch(), microbatch_size=2)
            elif where == "init":
                fa.Accumulation().init(p)
            elif where == "fold":
                fa.Accumulation().fold(loss_fn, p, batch())
            else:
                step().init(p)

        refuse("dtype", f"{kind}-params-{where}", bad_params, "params['w']")
refuse("dtype", "params-a-module", lambda: fa.accumulate(loss_fn, nn.Linear(3, 1), batch()), "params")  # noqa: E501
refuse("dtype", "params-none", lambda: fa.accumulate(loss_fn, None, batch()), "params")
refuse("dtype", "params-empty", lambda: fa.accumulate(loss_fn, {}, batch()), "params")
refuse("dtype", "step-init-params-empty", lambda: step().init({}), "params")


@case("dtype", "parameter-leaves-accumulate", works=True)
def _parameter_leaves(_tmp: Path) -> None:
    p = {k: nn.Parameter(v) for k, v in params().items()}
    result = fa.accumulate(loss_fn, p, batch())
    no_graph(result)


@case("dtype", "parameter-leaves-step", works=True)
def _parameter_step(_tmp: Path) -> None:
    p = {k: nn.Parameter(v) for k, v in params().items()}
    s = step()
    state = run_steps(s, s.init(p), 2)
    no_graph(state)


# --- The epoch loop -------------------------------------------------------------------------


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self) -> Iterator[dict]:
        for i in range(10):
            yield {k: v[0] for k, v in batch(1, seed=i).items()}


@case("epoch", "iterable-dataset-loader", works=True)
def _iterable(_tmp: Path) -> None:
    s = step(num_microbatches=2)
    loader = torch.utils.data.DataLoader(Stream(), batch_size=4)
    _, summary = fa.run_epoch(s, s.init(params()), loader, progress=True)
    assert (summary.steps, int(summary.weight)) == (3, 10)


@case("epoch", "short-last-batch", works=True)
def _short_last(_tmp: Path) -> None:
    s = step(num_microbatches=4)
    loader = [batch(8), batch(8), batch(3)]
    _, summary = fa.run_epoch(s, s.init(params()), loader)
    assert (summary.steps, int(summary.weight)) == (3, 19), summary


@case("epoch", "exhausted-generator", "batches")
def _exhausted(_tmp: Path) -> None:
    s = step()
    batches = (batch() for _ in range(2))
    state, _ = fa.run_epoch(s, s.init(params()), batches)
    fa.run_epoch(s, state, batches)


refuse("epoch", "empty-list", lambda: fa.run_epoch(step(), step().init(params()), []), "batches")
refuse("epoch", "batches-none", lambda: fa.run_epoch(step(), step().init(params()), None), "batches")  # noqa: E501
refuse("epoch", "step-a-function", lambda: fa.run_epoch(loss_fn, step().init(params()), [batch()]), "step")  # noqa: E501
refuse("epoch", "state-a-dict", lambda: fa.run_epoch(step(), params(), [batch()]), "TrainState")
refuse("epoch", "progress-a-string", lambda: fa.run_epoch(step(), step().init(params()), [batch()], progress="yes"), "progress")  # noqa: E501


@case("epoch", "log-file-lines", works=True)
def _log_lines(_tmp: Path) -> None:
    s = step(num_microbatches=2)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fa.run_epoch(s, s.init(params()), [batch()] * 4, progress=True)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    assert len(lines) >= 4, out.getvalue()
    assert all("loss" in line for line in lines[:4]), out.getvalue()


# --- The testing toolkit -------------------------------------------------------------------


@case("toolkit", "check-grads-order-2-layer-norm", works=True)
def _layer_norm(_tmp: Path) -> None:
    from funcaccum.testing import check_grads

    def f(p: dict, x: torch.Tensor) -> torch.Tensor:
        return functional.layer_norm(x @ p["w"], (4,), p["g"], p["b"]).tanh().pow(2).mean()

    g = gen(3)
    p = {"w": torch.randn(3, 4, generator=g), "g": torch.randn(4, generator=g), "b": torch.randn(4, generator=g)}  # noqa: E501
    check_grads(f, p, torch.randn(5, 3, generator=g), order=2)


@case("toolkit", "accumulation-exact-float32-loss", works=True)
def _float32_loss(_tmp: Path) -> None:
    from funcaccum.testing import assert_accumulation_exact

    def f(p: dict, b: dict) -> torch.Tensor:  # computes in float32, as HF's labels= loss does
        logits = (b["x"] @ p["w"]).float()
        return functional.cross_entropy(logits, b["y"])

    g = gen(4)
    p = {"w": torch.randn(3, 5, generator=g)}
    assert_accumulation_exact(f, p, {"x": torch.randn(12, 3, generator=g), "y": torch.randint(5, (12,), generator=g)})  # noqa: E501


refuse("toolkit", "check-grads-order-3", lambda: __import__("funcaccum.testing").testing.check_grads(loss_fn, params(), batch(), order=3), "order")  # noqa: E501


# --- Reducers and states across steps -----------------------------------------------------


refuse("state", "adaptive-step-given-mean-state", lambda: step(reducer=fa.adaptive())(template(), batch()), "reducer_carry")  # noqa: E501
refuse("state", "adaptive-step-given-clipped-state", lambda: step(reducer=fa.adaptive())(step(reducer=fa.clipped_mean(1.0)).init(params()), batch()), "reducer_carry")  # noqa: E501
refuse("state", "finalize-with-another-reducer", lambda: fa.Accumulation(reducer=fa.clipped_mean(1.0)).finalize(fa.Accumulation().init(params())), "clipped_mean")  # noqa: E501
refuse("state", "merge-states-of-two-reducers", lambda: fa.Accumulation().merge(fa.Accumulation().init(params()), fa.Accumulation(reducer=fa.adaptive()).init(params())), "mean()")  # noqa: E501
refuse("state", "adaptive-batching-with-mean", lambda: fa.AdaptiveBatching(step()), "adaptive")
refuse("state", "adaptive-batching-controller", lambda: fa.AdaptiveBatching(step(reducer=fa.adaptive()), controller="greedy"), "controller")  # noqa: E501
refuse("state", "accumulation-a-dict", lambda: fa.train_step(loss_fn, optimizer=optim.sgd(0.1), accumulation={"num_microbatches": 2}), "accumulation")  # noqa: E501
refuse("state", "compile-a-string", lambda: fa.train_step(loss_fn, optimizer=optim.sgd(0.1), compile="fast"), "compile")  # noqa: E501
refuse("state", "loss-fn-none", lambda: fa.train_step(None, optimizer=optim.sgd(0.1)), "loss_fn")
refuse("state", "flag-a-string", lambda: fa.Accumulation(has_aux="yes"), "has_aux")
refuse("state", "both-splits", lambda: fa.Accumulation(num_microbatches=2, microbatch_size=2), "num_microbatches")  # noqa: E501
refuse("state", "clipped-noise-without-denominator", lambda: fa.clipped_mean(1.0, noise_multiplier=1.0), "denominator")  # noqa: E501
refuse("state", "mean-denominator-zero", lambda: fa.mean(denominator=0), "denominator")


@case("state", "a-skipped-state-counts", works=True)
def _skip_counted(_tmp: Path) -> None:
    s = step()
    state, metrics = s(s.init(params()), {"x": torch.full((4, 3), NAN), "y": torch.zeros(4)})
    assert bool(metrics.skipped)
    assert int(state.skipped) == 1


# --- Privacy: the noised mean, accounting, sampling ----------------------------------------


def privacy_module() -> Any:
    from funcaccum import privacy

    return privacy


def plan(size: int = 100, rate: float = 0.1, delta: float = 1e-5) -> Any:
    return privacy_module().Accounting(size, rate, delta)


def noised(**options: Any) -> Any:
    return fa.clipped_mean(1.0, **{"noise_multiplier": 1.0, "denominator": 8.0} | options)


def noised_step(reducer: Any, **split: Any) -> Any:
    accumulation = fa.Accumulation(reducer=reducer, **(split or {"microbatch_size": 1}))
    step = fa.train_step(loss_fn, optimizer=optim.sgd(0.1), accumulation=accumulation)
    return step, step.init(params())


refuse("privacy", "accounting-sample-rate-zero",
       lambda: noised(accounting=plan(rate=0.0), denominator=None), "sample_rate", "(0, 1]")
refuse("privacy", "accounting-sample-rate-above-one",
       lambda: noised(accounting=plan(rate=1.5), denominator=None), "sample_rate")
refuse("privacy", "accounting-delta-zero",
       lambda: noised(accounting=plan(delta=0.0), denominator=None), "delta", "(0, 1)")
refuse("privacy", "accounting-delta-not-below-one-over-n",
       lambda: noised(accounting=plan(delta=0.05), denominator=None),
       "delta=0.05", "1/dataset_size")  # fmt: skip
refuse("privacy", "accounting-dataset-size-float",
       lambda: noised(accounting=plan(size=100.5), denominator=None), "dataset_size")  # type: ignore[arg-type]
refuse("privacy", "accounting-a-tuple",
       lambda: noised(accounting=(100, 0.1, 1e-5), denominator=None), "accounting must be", "tuple")
refuse("privacy", "accounting-without-noise",
       lambda: fa.clipped_mean(1.0, accounting=plan()), "accounting=", "noise_multiplier > 0")
refuse("privacy", "noise-negative", lambda: noised(noise_multiplier=-1.0), "noise_multiplier", "-1")
refuse("privacy", "noise-nan", lambda: noised(noise_multiplier=NAN), "noise_multiplier", "nan")
refuse("privacy", "noise-inf", lambda: noised(noise_multiplier=INF), "noise_multiplier", "inf")
refuse("privacy", "noise-without-denominator",
       lambda: noised(denominator=None), "denominator", "expected number of units")
refuse("privacy", "noise-denominator-the-weight",
       lambda: noised(denominator="weight"), "denominator='weight'")
refuse("privacy", "noise-denominator-zero", lambda: noised(denominator=0.0), "denominator", "> 0")
refuse("privacy", "noise-unit-unknown", lambda: noised(unit="user"), "unit", "'user'")
refuse("privacy", "noise-generator-not-a-generator", lambda: noised(generator=0), "generator")
refuse("privacy", "noise-microbatches-of-four",
       lambda: noised_step(noised(), microbatch_size=4),
       "microbatch_size=1", "got microbatch_size=4")  # fmt: skip
refuse("privacy", "noise-num-microbatches",
       lambda: noised_step(noised(), num_microbatches=4), "microbatch_size=1")
refuse("privacy", "noise-group-unit-with-num-microbatches",
       lambda: noised_step(noised(unit="microbatch"), num_microbatches=2), "microbatch_size=m")
refuse("privacy", "noise-group-unit-cut-group",
       lambda: (lambda s: s[0](s[1], batch(8)))(
           noised_step(noised(unit="microbatch"), microbatch_size=3)
       ),
       "microbatch_size=3", "not a multiple")  # fmt: skip
refuse("privacy", "sampler-rate-zero",
       lambda: privacy_module().PoissonSampler(100, 0.0), "sample_rate")
refuse("privacy", "sampler-cap-zero",
       lambda: privacy_module().PoissonSampler(100, 0.1, max_batch_size=0), "max_batch_size")
refuse("privacy", "sampler-rank-out-of-range",
       lambda: privacy_module().PoissonSampler(100, 0.1, rank=2, world_size=2), "rank")
refuse("privacy", "calibrate-target-zero",
       lambda: privacy_module().calibrate_noise(0.0, plan(), steps=10), "target_epsilon")
refuse("privacy", "calibrate-steps-zero",
       lambda: privacy_module().calibrate_noise(1.0, plan(), steps=0), "steps")
refuse("privacy", "calibrate-unreachable-target",
       lambda: privacy_module().calibrate_noise(1e9, plan(), steps=10),
       "found no noise multiplier", "target_epsilon=1e+09")
refuse("privacy", "epsilon-of-a-dict",
       lambda: privacy_module().epsilon({"steps": 3}), "PrivacyLedger", "dict")
refuse("privacy", "epsilon-unknown-accountant",
       lambda: privacy_module().epsilon(plan().ledger(1.0, 10), accountant="gdp"), "accountant")
refuse("privacy", "ledger-without-noise",
       lambda: privacy_module().epsilon(plan().ledger(0.0, 10)), "noise_multiplier")  # fmt: skip


@case("privacy", "empty-batch-noise-only-step", works=True)
def _(tmp: Path) -> None:
    reducer = noised(accounting=plan(), denominator=None, generator=gen(3))
    step, state = noised_step(reducer)
    new, metrics = step(state, batch(0))
    assert not bool(metrics.skipped), "an empty Poisson batch must still take a (noise) step"
    assert int(new.reducer_carry.steps) == 1, "the ledger counts the empty step"
    assert not torch.equal(new.params["w"], state.params["w"]), "the noise moved nothing"


@case("privacy", "same-generator-same-noise", works=True)
def _(tmp: Path) -> None:
    runs = []
    for _ in range(2):
        step, state = noised_step(noised(generator=gen(5)))
        runs.append(step(state, batch(8))[0].params["w"])
    assert torch.equal(runs[0], runs[1]), "the same noise generator gave different steps"


# --- Ranks (two gloo processes; each case in its own processes) --------------------------


RANK_CASES = {
    # name: (words, what rank 1 does differently)
    "different-optimizers": ("optimizer",),
    "different-learning-rates": ("optimizer",),
    "different-param-shapes": ("params",),
    "different-param-dtypes": ("params",),
    "different-param-names": ("params",),
    "different-reducers": ("reducer",),
    "different-max-norms": ("reducer",),
    "different-has-state": ("model_state",),
    "different-compute-dtypes": ("compute_dtype",),
    "agreeing-ranks": (),
    # The same for FullyShardedStep (FSDP2 on a 2-rank CPU mesh).
    "sharded-different-learning-rates": ("optimizer",),
    "sharded-different-reducers": ("reducer",),
    "sharded-different-sync": ("sync and gather",),
    "sharded-different-param-shapes": ("params",),
    "sharded-agreeing-ranks": (),
}


def sharded_rank(rank: int, name: str) -> dict[str, Any]:
    """Rank ``rank`` of a FullyShardedStep run in which rank 1 is configured differently."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    other = rank == 1
    torch.manual_seed(0)
    model = nn.Linear(3, 5 if other and name == "sharded-different-param-shapes" else 4)
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))

    def loss(module: Any, b: Mapping) -> torch.Tensor:
        return ((module(b["x"]).sum(-1) - b["y"]) ** 2).mean()

    reducer = fa.clipped_mean(1.0) if other and name == "sharded-different-reducers" else fa.mean()
    rate = 0.2 if other and name == "sharded-different-learning-rates" else 0.1
    sharded = fa.distributed.FullyShardedStep(
        model, loss, optimizer=optim.sgd(rate),
        accumulation=fa.Accumulation(reducer=reducer, num_microbatches=2),
        sync="step" if other and name == "sharded-different-sync" else "microbatch", timeout=20,
    )  # fmt: skip
    state = sharded.init()
    for _ in range(3):
        state, _ = sharded(state, batch(4, seed=rank))
    return {"outcome": "returned", "w": state.params["weight"].full_tensor().tolist()}


def rank_worker(rank: int, port: str, name: str) -> None:
    """One rank of a two-process run in which rank 1 is configured differently."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))  # fmt: skip
    run = sharded_rank if name.startswith("sharded-") else data_parallel_rank
    try:
        result = run(rank, name)
    except fa.FuncaccumError as error:
        result = {"outcome": "FuncaccumError", "message": str(error)}
    except Exception as error:
        result = {"outcome": type(error).__name__, "message": str(error)[:500]}
    print("RESULT " + json.dumps(result), flush=True)
    gc.collect()  # a FSDP module and its mesh, freed before the group (see recipes/sharded)
    fa.distributed.destroy_process_group()


def data_parallel_rank(rank: int, name: str) -> dict[str, Any]:
    """Rank ``rank`` of a DataParallel run in which rank 1 is configured differently."""
    other = rank == 1
    p = params(torch.float64 if other and name == "different-param-dtypes" else torch.float32)
    if other and name == "different-param-shapes":
        p["w"] = torch.zeros(4)
    if other and name == "different-param-names":
        p = {"weight": p["w"], "b": p["b"]}

    def loss(q: dict, b: Mapping) -> torch.Tensor:
        w = q.get("w", q.get("weight"))
        return ((b["x"].to(w.dtype) @ w[:3] + q["b"] - b["y"].to(w.dtype)) ** 2).mean()

    optimizer = optim.sgd(0.1)
    if other and name == "different-optimizers":
        optimizer = optim.adam(0.1)
    if other and name == "different-learning-rates":
        optimizer = optim.sgd(0.2)
    reducer = fa.clipped_mean(1.0) if name == "different-max-norms" else fa.mean()
    if other and name == "different-reducers":
        reducer = fa.clipped_mean(1.0)
    if other and name == "different-max-norms":
        reducer = fa.clipped_mean(2.0)
    model_state: dict = {}
    has_state = other and name == "different-has-state"
    if has_state:
        model_state = {"count": torch.zeros(())}

        def loss_with_state(q: dict, st: dict, b: Mapping) -> tuple:
            return loss(q, b), {"count": st["count"] + 1}

    s = fa.train_step(
        loss_with_state if has_state else loss, optimizer=optimizer,
        accumulation=fa.Accumulation(reducer=reducer, num_microbatches=2, has_state=has_state),
        compute_dtype=torch.bfloat16 if other and name == "different-compute-dtypes" else None,
    )  # fmt: skip
    parallel = fa.distributed.DataParallel(s, timeout=20)
    state = parallel.init(p, model_state)
    for _ in range(3):
        state, _ = parallel(state, batch(4, seed=rank))
    return {"outcome": "returned", "w": state.params.get("w", state.params.get("weight")).tolist()}


def run_ranks(name: str, words: tuple[str, ...], timeout: float = 90) -> tuple[str, str]:
    """Start the two ranks; classify the pair's outcome."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    command = [sys.executable, __file__, "--rank-worker"]
    processes = [
        subprocess.Popen([*command, str(rank), port, name], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]
    results, codes = [], []
    for process in processes:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            return "crash", "hung past the timeout"
        codes.append(process.returncode)
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        results.append(json.loads(lines[-1][7:]) if lines else {"outcome": "died", "message": err[-300:]})  # noqa: E501
    if any(code < 0 or r["outcome"] == "died" for code, r in zip(codes, results, strict=True)):
        return "crash", f"exit codes {codes}: {results}"
    outcomes = {r["outcome"] for r in results}
    if not words:  # the ranks agree: both must train, and end with the same params
        same = results[0].get("w") == results[1].get("w")
        return ("clear" if outcomes == {"returned"} and same else "silent"), str(results)[:300]
    if outcomes == {"FuncaccumError"}:
        ok = all(all(w.lower() in r["message"].lower() for w in words) for r in results)
        return ("clear" if ok else "obscure"), results[0]["message"][:300]
    if "returned" in outcomes and len(outcomes) == 1:
        same = results[0].get("w") == results[1].get("w")
        return "silent", "both ranks trained" + ("" if same else ", and their params diverged")
    return "obscure", str(results)[:300]


for rank_name, rank_words in RANK_CASES.items():
    CASES.append(Case("rank", rank_name, lambda _t, n=rank_name, w=rank_words: run_ranks(n, w),
                      rank_words, works=not rank_words, isolated=True))  # fmt: skip


# --- Running and classifying -----------------------------------------------------------------


def classify(item: Case, tmp: Path) -> tuple[str, str]:
    """``(outcome, detail)`` for one case, run in this process (isolated ones start their own)."""
    if item.isolated:
        return item.run(tmp)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            item.run(tmp)
    except fa.FuncaccumError as error:
        message = str(error)
        if item.works:
            return "obscure", f"refused: {message[:300]}"
        named = all(word.lower() in message.lower() for word in item.words)
        return ("clear" if named else "obscure"), message[:300]
    except AssertionError as error:
        return "silent", f"wrong: {str(error)[:300]}"
    except item.also_clear as error:
        return "clear", f"{type(error).__name__}: {str(error)[:300]}"
    except Exception as error:
        return "obscure", f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"  # noqa: E501
    if item.works:
        return "clear", "worked"
    return "silent", "accepted"


def run_case(item: Case) -> tuple[str, str]:
    with tempfile.TemporaryDirectory() as directory:
        return classify(item, Path(directory))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run one group")
    parser.add_argument("--json", help="write the outcomes to this file")
    parser.add_argument("--quiet", action="store_true", help="print the counts only")
    parser.add_argument("--rank-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        rank, port, name = args.rank_worker
        rank_worker(int(rank), port, name)
        return
    torch.manual_seed(0)
    outcomes = []
    for item in CASES:
        if args.only and item.group != args.only:
            continue
        outcome, detail = run_case(item)
        outcomes.append({"group": item.group, "name": item.name, "outcome": outcome,
                         "detail": detail})  # fmt: skip
        if not args.quiet:
            print(f"{outcome:8} {item.group}/{item.name}: {detail[:160]}", flush=True)
    counts = collections.Counter(o["outcome"] for o in outcomes)
    by_group = collections.defaultdict(collections.Counter)
    for o in outcomes:
        by_group[o["group"]][o["outcome"]] += 1
    print(f"\n{len(outcomes)} cases: " + ", ".join(f"{counts[k]} {k}" for k in ("clear", "obscure", "silent", "crash")))  # noqa: E501
    for group, group_counts in by_group.items():
        print(f"  {group:12} " + ", ".join(f"{group_counts[k]} {k}" for k in ("clear", "obscure", "silent", "crash")))  # noqa: E501
    if args.json:
        Path(args.json).write_text(json.dumps(outcomes, indent=1))


if __name__ == "__main__":
    main()
