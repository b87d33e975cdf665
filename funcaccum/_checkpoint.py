"""Checkpoints: a state saved as tensors and plain values, loaded with ``weights_only=True``.

A checkpoint file holds the state's tensors as a flat list, a description of
the tree around them made of plain Python values (kinds, dict keys,
NamedTuple names and fields), torch's random-number state, and metadata.
Nothing in it is a pickled class, so :func:`torch.load` reads it with its safe
default ``weights_only=True``, and any NamedTuple works, the user's included.
:func:`load` rebuilds the tree in the classes of a template state (``like=``,
e.g. ``step.init(params)``), checking kinds, keys, fields, shapes and dtypes
node by node, so a checkpoint of another configuration fails with the first
path that differs instead of loading into the wrong places. Every tensor has
a CRC-32 checksum of its bytes, and the file a SHA-256 digest of everything
else (the tree, metadata, random-number states and those checksums); both are
verified on load, so a flipped byte names the tensor, or the file, it broke.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import os
import pickle
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import torch

from ._errors import FuncaccumError
from ._tree import PyTree
from ._validate import describe

__all__ = ["Checkpoint", "load", "save"]

_FORMAT = "funcaccum-checkpoint"
_VERSION = 2  # 2: a checksum per tensor and one for the file
# Leaves kept as they are, besides tensors and None; exact types (a str or float subclass,
# numpy's float64 included, is a class that weights_only=True would refuse to load).
_VALUES = (bool, int, float, str)
_KEYS = (str, int)  # dict keys a checkpoint can hold


class Checkpoint(NamedTuple):
    """What :func:`load` returns.

    Attributes:
        state: the saved tree, in the classes of ``like`` (or funcaccum's own).
        metadata: the ``metadata`` given to :func:`save` (``{}`` if none).
        batches_consumed: ``step + skipped`` of a saved :class:`~funcaccum.TrainState`,
            the optimizer steps attempted, so the batches a one-batch-per-step
            loop has drawn: the data resumes after that many. None for a tree
            without ``step`` and ``skipped`` fields.

    Example:
        >>> import tempfile
        >>> import funcaccum as fa
        >>> with tempfile.TemporaryDirectory() as directory:
        ...     fa.save(f"{directory}/ckpt.pt", {"w": torch.ones(2)}, metadata={"epoch": 3})
        ...     checkpoint = fa.load(f"{directory}/ckpt.pt", restore_rng=False)
        >>> isinstance(checkpoint, fa.Checkpoint), checkpoint.metadata, checkpoint.batches_consumed
        (True, {'epoch': 3}, None)
    """

    state: PyTree
    metadata: dict[str, Any]
    batches_consumed: int | None


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _is_dict(x: Any) -> bool:
    return type(x) in (dict, OrderedDict)


def _key_path(path: str, key: Any) -> str:
    return f"{path}[{key!r}]"


def _encode(tree: Any, path: str, leaves: list[torch.Tensor]) -> dict[str, Any]:
    """The tree as plain values, with each tensor moved to ``leaves`` and named by index."""
    if isinstance(tree, torch.Tensor):
        if tree.is_meta:
            raise FuncaccumError(
                f"cannot save {path}: it is a meta tensor, which holds no values (materialise "
                "the model first: module.to_empty(device=...) and initialise it)"
            )
        leaves.append(tree.detach())
        return {"kind": "tensor", "index": len(leaves) - 1}
    if tree is None:
        return {"kind": "none"}
    if type(tree) in _VALUES:
        return {"kind": "value", "value": tree}
    if _is_namedtuple(tree):
        cls = type(tree)
        return {
            "kind": "namedtuple",
            "module": cls.__module__,
            "name": cls.__qualname__,
            "fields": list(cls._fields),
            "children": [
                _encode(child, f"{path}.{field}", leaves)
                for field, child in zip(cls._fields, tree, strict=True)
            ],
        }
    if type(tree) in (tuple, list):
        return {
            "kind": type(tree).__name__,
            "children": [_encode(child, f"{path}[{i}]", leaves) for i, child in enumerate(tree)],
        }
    if _is_dict(tree):
        bad = [key for key in tree if type(key) not in _KEYS]
        if bad:
            raise FuncaccumError(
                f"cannot save {path}: a checkpoint holds dict keys that are str or int, "
                f"got {bad[0]!r} ({type(bad[0]).__name__})"
            )
        return {
            "kind": "ordereddict" if isinstance(tree, OrderedDict) else "dict",
            "keys": list(tree),
            "children": [
                _encode(child, _key_path(path, key), leaves) for key, child in tree.items()
            ],
        }
    raise FuncaccumError(
        f"cannot save {path}: a checkpoint holds dicts, lists, tuples and NamedTuples of "
        f"tensors, None, bools, ints, floats and strs; got {type(tree).__name__}"
    )


def _check_plain(value: Any, path: str) -> None:
    """Raise unless ``value`` is something ``torch.load(weights_only=True)`` reads back."""
    if value is None or type(value) in _VALUES or isinstance(value, torch.Tensor):
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{path}[{i}]")
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) not in _KEYS:
                raise FuncaccumError(f"{path} has a key {key!r}: metadata dict keys are str or int")
            _check_plain(item, _key_path(path, key))
        return
    raise FuncaccumError(
        f"{path} is a {type(value).__name__}: metadata holds tensors, None, bools, ints, floats, "
        "strs, and lists, tuples and dicts of them (what torch.load(weights_only=True) reads)"
    )


def _batches_consumed(state: Any) -> int | None:
    step, skipped = getattr(state, "step", None), getattr(state, "skipped", None)
    if isinstance(step, torch.Tensor) and isinstance(skipped, torch.Tensor):
        return int(step + skipped)
    return None


def _tensor_checksum(tensor: torch.Tensor) -> int:
    """CRC-32 of the tensor's dtype, shape and bytes (read in place on the CPU, no copy)."""
    t = tensor.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.cpu().contiguous()
    crc = zlib.crc32(f"{t.dtype}{tuple(t.shape)}".encode())
    size = t.numel() * t.element_size()
    if size:
        crc = zlib.crc32(memoryview((ctypes.c_ubyte * size).from_address(t.data_ptr())), crc)
    return crc


def _described(value: Any) -> Any:
    """``value`` with each tensor replaced by its checksum: what the file digest covers."""
    if isinstance(value, torch.Tensor):
        return ("tensor", _tensor_checksum(value))
    if isinstance(value, dict):
        return [(key, _described(item)) for key, item in value.items()]
    if isinstance(value, list | tuple):
        return [_described(item) for item in value]
    return value


def _file_digest(payload: dict[str, Any]) -> str:
    """SHA-256 of everything in the payload but the tensors' bytes (they have their own)."""
    rest = {key: value for key, value in payload.items() if key not in ("leaves", "checksums")}
    return hashlib.sha256(repr(_described(rest)).encode()).hexdigest()


def _check_path(path: Any, verb: str) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise FuncaccumError(
            f"path must be a str or an os.PathLike (the checkpoint file to {verb}), got "
            f"{describe(path)}"
        )
    return Path(path)


def save(
    path: str | os.PathLike[str],
    state: PyTree,
    *,
    metadata: Mapping[str, Any] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
) -> None:
    """Save a training state, torch's random-number state and metadata to ``path``.

    The file holds ``state``'s tensors, a description of its tree in plain
    values (so :func:`load` needs no pickled classes and reads it with
    ``weights_only=True``), the global CPU generator's state (and every CUDA
    device's, once CUDA is initialised: dropout and
    :func:`~funcaccum.clipped_mean`'s noise draw from them), the state of each
    generator in ``generators``, ``metadata``, and ``batches_consumed``, the
    data position of a :class:`~funcaccum.TrainState` (``step + skipped``).
    Saving draws no random numbers and changes nothing. The file is written
    beside ``path`` and renamed into place, so a crash mid-save leaves any
    earlier checkpoint at ``path`` whole.

    In data-parallel runs the state is the same on every rank: rank 0 saves.
    The random-number state saved is the saving process's own.

    Args:
        path: the file to write (replaced if it exists).
        state: a pytree of dicts, lists, tuples and NamedTuples (any, the
            user's included) of tensors, None, bools, ints, floats and strs;
            usually a :class:`~funcaccum.TrainState`.
        metadata: plain values to keep with it (epoch, config, data-loader
            position): tensors, None, bools, ints, floats, strs, and lists,
            tuples and dicts of them.
        generators: ``torch.Generator`` objects by name whose states to save,
            e.g. the one given to ``clipped_mean(generator=...)``.

    Raises:
        FuncaccumError: a part of ``state`` or ``metadata`` that a checkpoint
            cannot hold, named by its path.

    Example:
        >>> import tempfile
        >>> import funcaccum as fa
        >>> def loss_fn(params, batch):
        ...     return ((batch @ params["w"]) ** 2).mean()
        >>> step = fa.train_step(loss_fn, optimizer=fa.optim.adamw(0.1))
        >>> state, _ = step(step.init({"w": torch.ones(3)}), torch.randn(8, 3))
        >>> directory = tempfile.TemporaryDirectory()
        >>> fa.save(f"{directory.name}/ckpt.pt", state, metadata={"epoch": 0})
        >>> loaded = fa.load(f"{directory.name}/ckpt.pt", like=step.init({"w": torch.zeros(3)}))
        >>> torch.equal(loaded.state.params["w"], state.params["w"]), loaded.batches_consumed
        (True, 1)
        >>> directory.cleanup()
    """
    path = _check_path(path, "write")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise FuncaccumError(
            f"metadata must be a dict of plain values by name, got {describe(metadata)}"
        )
    if generators is not None and not isinstance(generators, Mapping):
        raise FuncaccumError(
            f"generators must be a dict of torch.Generator by name, got {describe(generators)}"
        )
    leaves: list[torch.Tensor] = []
    tree = _encode(state, "state", leaves)
    metadata = dict(metadata or {})
    _check_plain(metadata, "metadata")
    rng, saved_generators = random_states(generators)
    payload = {
        "format": _FORMAT,
        "version": _VERSION,
        "tree": tree,
        "leaves": leaves,
        "rng": rng,
        "generators": saved_generators,
        "metadata": metadata,
        "batches_consumed": _batches_consumed(state),
        "torch_version": str(torch.__version__),
    }
    payload["checksums"] = {
        "leaves": [_tensor_checksum(leaf) for leaf in leaves],
        "file": _file_digest(payload),
    }
    if path.is_dir():
        raise FuncaccumError(f"cannot save to {path}: it is a directory; name a file in it")
    if not path.parent.is_dir():
        raise FuncaccumError(
            f"cannot save to {path}: its directory {path.parent} does not exist (or is not a "
            "directory); create it first"
        )
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        torch.save(payload, partial)
        os.replace(partial, path)
    except (OSError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FuncaccumError(
            f"cannot write the checkpoint {path}: {reason}. Check that its directory is "
            "writable and has room (an earlier checkpoint at that path is left as it was)"
        ) from error
    finally:
        partial.unlink(missing_ok=True)


def random_states(
    generators: Mapping[str, torch.Generator] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Torch's global random-number states and those of the named generators, as saved."""
    saved_generators = {}
    for name, generator in (generators or {}).items():
        if not isinstance(name, str) or not isinstance(generator, torch.Generator):
            raise FuncaccumError(
                f"generators maps names (str) to torch.Generator objects, got {name!r}: "
                f"{type(generator).__name__}"
            )
        saved_generators[name] = {
            "device": generator.device.type,
            "state": generator.get_state(),
        }
    rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
    # Only once initialised: asking earlier would start CUDA in a CPU-only run.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng, saved_generators


def _describe_saved(node: dict[str, Any], leaves: list[torch.Tensor]) -> str:
    kind = node["kind"]
    if kind == "tensor":
        leaf = leaves[node["index"]]
        return f"a {leaf.dtype} tensor of shape {tuple(leaf.shape)}"
    if kind == "none":
        return "None"
    if kind == "value":
        return f"the {type(node['value']).__name__} {node['value']!r}"
    if kind == "namedtuple":
        return f"{node['name']}({', '.join(node['fields'])})"
    if kind in ("tuple", "list"):
        return _describe_sequence(kind, _kinds_saved(node["children"]))
    return f"a {kind} with keys {node['keys']}"


def _kinds_saved(children: list[dict[str, Any]]) -> list[str]:
    return [
        c["name"] if c["kind"] == "namedtuple" else c["kind"].replace("none", "None")
        for c in children
    ]


def _describe_sequence(kind: str, items: list[str]) -> str:
    return f"a {kind} of {len(items)}: ({', '.join(items)})" if items else f"an empty {kind}"


def _describe_like(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    if x is None:
        return "None"
    if type(x) in _VALUES:
        return f"the {type(x).__name__} {x!r}"
    if _is_namedtuple(x):
        return f"{type(x).__qualname__}({', '.join(type(x)._fields)})"
    if type(x) in (tuple, list):
        kinds = [
            type(c).__qualname__
            if _is_namedtuple(c)
            else "tensor"
            if isinstance(c, torch.Tensor)
            else "None"
            if c is None
            else type(c).__name__
            for c in x
        ]
        return _describe_sequence(type(x).__name__, kinds)
    if _is_dict(x):
        return f"a {type(x).__name__.lower()} with keys {list(x)}"
    return f"a {type(x).__name__}"


class _Loader:
    """Rebuilds a saved tree from its description, in ``like``'s classes, checking as it goes."""

    def __init__(self, path: Path, leaves: list[torch.Tensor]) -> None:
        self.path, self.leaves = path, leaves

    def mismatch(self, where: str, node: dict[str, Any], like: Any, detail: str = "") -> NoReturn:
        raise FuncaccumError(
            f"the checkpoint {self.path} does not match the template (like=) at {where}: "
            f"the checkpoint holds {_describe_saved(node, self.leaves)}, the template "
            f"{_describe_like(like)}{detail}. A checkpoint loads into a state of the same "
            "configuration only: the same optimizer, reducer, params tree, shapes and dtypes."
        )

    def like(self, node: dict[str, Any], like: Any, path: str) -> Any:
        kind = node["kind"]
        if isinstance(like, torch.Tensor):
            if kind != "tensor":
                self.mismatch(path, node, like)
            leaf = self.leaves[node["index"]]
            if leaf.dtype != like.dtype or leaf.shape != like.shape:
                self.mismatch(path, node, like)
            return leaf.to(like.device)
        if like is None or type(like) in _VALUES:
            same = (
                kind == "none"
                if like is None
                else (kind == "value" and type(node["value"]) is type(like))
            )
            if not same:
                self.mismatch(path, node, like)
            return None if like is None else node["value"]
        if _is_namedtuple(like):
            cls = type(like)
            if kind != "namedtuple" or (node["name"], node["fields"]) != (
                cls.__qualname__,
                list(cls._fields),
            ):
                self.mismatch(path, node, like)
            return cls(*[
                self.like(child, value, f"{path}.{field}")
                for field, child, value in zip(cls._fields, node["children"], like, strict=True)
            ])  # fmt: skip
        if type(like) in (tuple, list):
            if kind != type(like).__name__ or len(node["children"]) != len(like):
                self.mismatch(path, node, like)
            return type(like)(
                self.like(child, value, f"{path}[{i}]")
                for i, (child, value) in enumerate(zip(node["children"], like, strict=True))
            )
        if _is_dict(like):
            if kind not in ("dict", "ordereddict"):
                self.mismatch(path, node, like)
            children = dict(zip(node["keys"], node["children"], strict=True))
            extra = [key for key in children if key not in like]
            missing = [key for key in like if key not in children]
            if extra or missing:
                parts = [f"only in the checkpoint: {extra}"] if extra else []
                parts += [f"only in the template: {missing}"] if missing else []
                self.mismatch(path, node, like, f" (keys {'; '.join(parts)})")
            return type(like)(
                (key, self.like(children[key], value, _key_path(path, key)))
                for key, value in like.items()
            )
        raise FuncaccumError(
            f"like= at {path} is {_describe_like(like)}: a template holds dicts, lists, tuples "
            "and NamedTuples of tensors, None, bools, ints, floats and strs"
        )

    def own(self, node: dict[str, Any], path: str) -> Any:
        """Without a template: containers as saved, NamedTuples only if funcaccum defines them."""
        kind = node["kind"]
        if kind == "tensor":
            return self.leaves[node["index"]]
        if kind == "none":
            return None
        if kind == "value":
            return node["value"]
        children = node["children"]
        if kind in ("tuple", "list"):
            items = [self.own(child, f"{path}[{i}]") for i, child in enumerate(children)]
            return tuple(items) if kind == "tuple" else items
        if kind in ("dict", "ordereddict"):
            items = [
                (key, self.own(child, _key_path(path, key)))
                for key, child in zip(node["keys"], children, strict=True)
            ]
            return OrderedDict(items) if kind == "ordereddict" else dict(items)
        cls = self.funcaccum_class(node, path)
        fields = node["fields"]
        return cls(*[
            self.own(child, f"{path}.{field}")
            for field, child in zip(fields, children, strict=True)
        ])  # fmt: skip

    def funcaccum_class(self, node: dict[str, Any], path: str) -> type:
        # Only funcaccum's own modules are imported: the file names a class, never code to run.
        module, name = node["module"], node["name"]
        cls: Any = None
        if module == "funcaccum" or module.startswith("funcaccum."):
            try:
                cls = importlib.import_module(module)
                for part in name.split("."):
                    cls = getattr(cls, part)
            except (ImportError, AttributeError):
                cls = None
        is_namedtuple = isinstance(cls, type) and issubclass(cls, tuple)
        if not (is_namedtuple and list(getattr(cls, "_fields", ())) == node["fields"]):
            raise FuncaccumError(
                f"the checkpoint {self.path} holds a {module}.{name} at {path}, which only a "
                "template can rebuild: pass like= (a state of the same configuration, such as "
                "step.init(params))"
            )
        return cls


def _restore_rng(payload: dict[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    saved = payload["generators"]
    missing, unknown = sorted(set(saved) - set(generators)), sorted(set(generators) - set(saved))
    if missing or unknown:
        raise FuncaccumError(
            f"the checkpoint holds generator states {sorted(saved)}; pass generators= with "
            f"exactly those names (missing: {missing}, not in the checkpoint: {unknown}), "
            "or restore_rng=False to restore no random-number state"
        )
    for name, generator in generators.items():
        if generator.device.type != saved[name]["device"]:
            raise FuncaccumError(
                f"generator {name!r} was saved from a {saved[name]['device']} generator, "
                f"cannot restore it into a {generator.device.type} one"
            )
    cuda = payload["rng"].get("cuda")
    if cuda is not None and (
        not torch.cuda.is_available() or torch.cuda.device_count() != len(cuda)
    ):
        raise FuncaccumError(
            f"the checkpoint holds the random-number states of {len(cuda)} CUDA devices, and "
            f"this process sees {torch.cuda.device_count() if torch.cuda.is_available() else 0}; "
            "pass restore_rng=False to load it without them (the run will not repeat exactly)"
        )
    torch.set_rng_state(payload["rng"]["cpu"])
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    for name, generator in generators.items():
        generator.set_state(saved[name]["state"])


def _leaf_paths(node: dict[str, Any], path: str, into: dict[int, str]) -> dict[int, str]:
    """Each saved tensor's index to its path in the state (``state.params['w']``)."""
    kind = node.get("kind")
    if kind == "tensor":
        into[node["index"]] = path
    elif kind == "namedtuple":
        for field, child in zip(node["fields"], node["children"], strict=True):
            _leaf_paths(child, f"{path}.{field}", into)
    elif kind in ("tuple", "list"):
        for i, child in enumerate(node["children"]):
            _leaf_paths(child, f"{path}[{i}]", into)
    elif kind in ("dict", "ordereddict"):
        for key, child in zip(node["keys"], node["children"], strict=True):
            _leaf_paths(child, _key_path(path, key), into)
    return into


def _verify(path: Path, payload: dict[str, Any]) -> None:
    """Compare every tensor's checksum and the file's digest with those saved; raise on one."""
    corrupt = f"the checkpoint {path} is corrupt: "
    fix = ". The file changed after it was written (a bad disk or copy); load an earlier one"
    try:
        saved, leaves = payload["checksums"], payload["leaves"]
        names = _leaf_paths(payload["tree"], "state", {})
        if len(saved["leaves"]) != len(leaves):
            raise FuncaccumError(f"{corrupt}it holds {len(leaves)} tensors, and checksums for "
                                 f"{len(saved['leaves'])}{fix}")  # fmt: skip
        for i, (leaf, checksum) in enumerate(zip(leaves, saved["leaves"], strict=True)):
            if _tensor_checksum(leaf) != checksum:
                raise FuncaccumError(
                    f"{corrupt}the checksum of {names.get(i, f'tensor {i}')} (a {leaf.dtype} "
                    f"tensor of shape {tuple(leaf.shape)}) differs from the one saved{fix}"
                )
        if _file_digest(payload) != saved["file"]:
            raise FuncaccumError(
                f"{corrupt}its digest differs from the one saved: the tree, the metadata or a "
                f"random-number state changed{fix}"
            )
    except (KeyError, TypeError, AttributeError) as error:
        raise FuncaccumError(f"{corrupt}its checksums cannot be read ({error!r}){fix}") from error


def load(
    path: str | os.PathLike[str],
    *,
    like: PyTree = None,
    restore_rng: bool = True,
    generators: Mapping[str, torch.Generator] | None = None,
) -> Checkpoint:
    """Load a checkpoint written by :func:`save`, safely, checked against a template state.

    The file is read with ``torch.load(weights_only=True)``: tensors and plain
    values only, so a file that holds anything else fails instead of running
    code. With ``like``, the tree is rebuilt in ``like``'s classes and
    containers after checking, node by node, that it has the same kinds,
    NamedTuple fields, dict keys, lengths, and tensor shapes and dtypes; the
    first difference raises :class:`~funcaccum.FuncaccumError` naming its path
    (``state.opt_state[0]``, ``state.params['fc.weight']``). Tensors come back on
    the devices of ``like``'s leaves. Without ``like``, dicts, lists and tuples
    come back as saved, and NamedTuples that funcaccum defines (every state it
    makes); any other NamedTuple needs ``like``. Tensors are then on the CPU.

    By default (``restore_rng=True``) loading also restores the global CPU
    random-number state, CUDA's if it was saved, and the generators passed in
    ``generators`` (which must name exactly the generators saved), so the
    resumed run draws the same dropout masks and noise as an uninterrupted one
    would: a resume is bit-identical. Nothing is restored until every check has
    passed.

    Args:
        path: a file written by :func:`save`.
        like: a state of the same configuration, usually ``step.init(params)``.
        restore_rng: restore the random-number states (False: leave them as they are).
        generators: the generators to restore the saved states into, by the
            names given to :func:`save`.

    Returns:
        A :class:`Checkpoint`: ``(state, metadata, batches_consumed)``.

    Raises:
        FuncaccumError: not a funcaccum checkpoint, objects other than tensors
            and plain values in the file, a mismatch with ``like``, or
            random-number states that cannot be restored here.

    Example:
        >>> import tempfile
        >>> import funcaccum as fa
        >>> def loss_fn(params, batch):
        ...     return (batch @ params["w"]).mean()
        >>> sgd = fa.train_step(loss_fn, optimizer=fa.optim.sgd(0.1, momentum=0.9))
        >>> directory = tempfile.TemporaryDirectory()
        >>> path = f"{directory.name}/ckpt.pt"
        >>> fa.save(path, sgd.init({"w": torch.ones(3)}))
        >>> fa.load(path).state.opt_state[0].trace          # funcaccum's classes, without like=
        {'w': tensor([0., 0., 0.])}
        >>> adamw = fa.train_step(loss_fn, optimizer=fa.optim.adamw(0.1))
        >>> try:
        ...     fa.load(path, like=adamw.init({"w": torch.zeros(3)}))
        ... except fa.FuncaccumError as error:
        ...     print(error)
        the checkpoint ... does not match the template (like=) at state.opt_state: ...
        >>> directory.cleanup()
    """
    path = _check_path(path, "read")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):  # as they are: they name it
        raise
    except pickle.UnpicklingError as error:  # weights_only refused a class the file names
        # torch's weights_only message is long; the line naming the refused class is the news.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        named = [line for line in lines if "GLOBAL" in line]
        said = (named or lines or [repr(error)])[0]
        raise FuncaccumError(
            f"cannot load {path} as a funcaccum checkpoint with torch.load(weights_only=True), "
            "which reads tensors and plain values only (a file from torch.save(state) holds "
            f"pickled classes; write checkpoints with funcaccum.save). torch said: "
            f"{said}"
        ) from error
    except Exception as error:  # torch raises several kinds for a file it cannot parse
        said = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FuncaccumError(
            f"cannot read {path}: it is truncated or corrupt, or not a file that torch.save "
            f"(or funcaccum.save) wrote. Load an earlier checkpoint. torch said: {said}"
        ) from error
    if not (isinstance(payload, dict) and payload.get("format") == _FORMAT):
        raise FuncaccumError(
            f"{path} is not a funcaccum checkpoint (write one with funcaccum.save)"
        )
    if payload["version"] > _VERSION:
        raise FuncaccumError(
            f"{path} is a version {payload['version']} checkpoint; this funcaccum reads "
            f"version {_VERSION} and older: upgrade funcaccum"
        )
    if payload["version"] >= 2:
        _verify(path, payload)
    if not restore_rng and generators:
        raise FuncaccumError(
            "generators= restores random-number states: not with restore_rng=False"
        )
    loader = _Loader(path, payload["leaves"])
    if like is None:
        state = loader.own(payload["tree"], "state")
    else:
        state = loader.like(payload["tree"], like, "state")
    if restore_rng:
        _restore_rng(payload, generators or {})
    return Checkpoint(state, payload["metadata"], payload["batches_consumed"])
