"""Checkpoints of a sharded state through torch.distributed.checkpoint: shards per rank, resharded.

:func:`save_sharded` writes a state whose leaves may be DTensor shards: every
rank writes its own shards through ``torch.distributed.checkpoint`` (DCP),
and rank 0 adds a description of the tree (kinds, keys, NamedTuple fields,
each leaf's global shape and dtype), the random-number states and the
metadata, as plain values. :func:`load_sharded` checks that description
against a template state node by node, as :func:`funcaccum.load` does, then
lets DCP fill the template's own shards: a checkpoint written on 4 ranks
loads on 2, each rank reading the pieces its shards cover.

Loading stays safe: the description is read with ``torch.load(weights_only=True)``,
DCP reads tensor data that way too, and its ``.metadata`` file (a plain
pickle in torch 2.13) is read here by an unpickler that builds DCP's own
metadata classes and nothing else; a checkpoint that holds pickled objects
instead of tensors is refused before anything is read.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .._checkpoint import (
    Checkpoint,
    _batches_consumed,
    _check_plain,
    _encode,
    _Loader,
    _restore_rng,
    random_states,
)
from .._errors import FuncaccumError
from .._tree import PyTree

__all__ = ["load_sharded", "save_sharded"]

_FORMAT, _VERSION = "funcaccum-sharded-checkpoint", 1
_DESCRIPTION = "funcaccum.pt"  # beside DCP's files; written last, so its presence marks a whole one


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_sharded(
    directory: str | os.PathLike[str],
    state: PyTree,
    *,
    metadata: dict[str, Any] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
) -> None:
    """Write a state with DTensor shards (a :class:`FullyShardedStep`'s) as a sharded checkpoint.

    Call it on every rank, with each rank's state: each writes its own shards
    through ``torch.distributed.checkpoint`` (a replicated leaf is written
    once); rank 0 writes the tree's description, rank 0's random-number
    states (torch's global ones, and the named ``generators``) and
    ``metadata`` (plain values). The checkpoint is built in a sibling
    directory and renamed into place whole, replacing an older one, so a run
    that dies while saving leaves the previous checkpoint as it was. Every
    rank must see the same filesystem.

    Args:
        directory: where the checkpoint goes (a directory).
        state: the state, usually a :class:`~funcaccum.TrainState`; any pytree
            :func:`funcaccum.save` takes, with DTensor or plain tensor leaves.
        metadata: plain values to keep beside it (epoch, config).
        generators: ``torch.Generator`` objects whose states to keep, by name.

    Example:
        A one-process group is enough to try it (``torchrun`` starts more):

        >>> import tempfile
        >>> import torch.distributed as dist
        >>> import funcaccum as fa
        >>> from torch.distributed.device_mesh import init_device_mesh
        >>> from torch.distributed.tensor import Shard, distribute_tensor
        >>> directory = tempfile.mkdtemp()
        >>> dist.init_process_group(
        ...     "gloo", init_method=f"file://{directory}/rendezvous", rank=0, world_size=1)
        >>> mesh = init_device_mesh("cpu", (1,))
        >>> state = {"w": distribute_tensor(torch.arange(6.0), mesh, [Shard(0)]),
        ...          "step": torch.tensor(3)}
        >>> fa.distributed.save_sharded(f"{directory}/ckpt", state, metadata={"epoch": 1})
        >>> like = {"w": distribute_tensor(torch.zeros(6), mesh, [Shard(0)]),
        ...         "step": torch.tensor(0)}
        >>> loaded = fa.distributed.load_sharded(f"{directory}/ckpt", like=like)
        >>> loaded.state["w"].full_tensor(), loaded.state["step"], loaded.metadata
        (tensor([0., 1., 2., 3., 4., 5.]), tensor(3), {'epoch': 1})
        >>> fa.distributed.destroy_process_group()
    """
    import torch.distributed.checkpoint as dcp

    leaves: list[torch.Tensor] = []
    tree = _encode(state, "state", leaves)
    metadata = dict(metadata or {})
    _check_plain(metadata, "metadata")
    rng, saved_generators = random_states(generators)
    directory = Path(directory)
    partial = directory.with_name(f".{directory.name}.partial")
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    dcp.save(
        {f"leaf{i}": leaf for i, leaf in enumerate(leaves)},
        storage_writer=dcp.FileSystemWriter(partial),
    )
    if _rank() == 0:
        description = {
            "format": _FORMAT,
            "version": _VERSION,
            "tree": tree,
            "leaves": [
                {"shape": list(leaf.shape), "dtype": str(leaf.dtype).removeprefix("torch.")}
                for leaf in leaves
            ],
            "rng": rng,
            "generators": saved_generators,
            "metadata": metadata,
            "batches_consumed": _batches_consumed(state),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "torch_version": str(torch.__version__),
        }
        torch.save(description, partial / _DESCRIPTION)
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            directory.rename(old)
        partial.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()


# What DCP's .metadata pickle may name: its metadata dataclasses, torch.Size, dtypes, layouts.
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and (
            name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def _read_metadata(directory: Path) -> Any:
    """DCP's ``.metadata``, unpickled into its own classes only, holding tensor entries only."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = directory / ".metadata"
    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except pickle.UnpicklingError as error:
        raise FuncaccumError(
            f"{path} names {error}, which is not part of a torch.distributed.checkpoint "
            "metadata file; it was not loaded (it could run code)"
        ) from error
    others = {
        key: type(entry).__name__
        for key, entry in metadata.state_dict_metadata.items()
        if not isinstance(entry, TensorStorageMetadata)
    }
    if others:
        raise FuncaccumError(
            f"{directory} holds entries that are not tensors ({others}); DCP would unpickle "
            "them, which could run code: a funcaccum sharded checkpoint holds tensors only"
        )
    return metadata


def _safe_reader(directory: Path, metadata: Any) -> Any:
    """DCP's file reader, handed the metadata :func:`_read_metadata` checked."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if metadata.storage_meta is not None:
                metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(directory)


class _TemplateLoader(_Loader):
    """The description checked against the template; each tensor node becomes a target for DCP."""

    def __init__(self, path: Path, stand_ins: list[torch.Tensor]) -> None:
        super().__init__(path, stand_ins)
        self.targets: dict[str, torch.Tensor] = {}

    def like(self, node: dict[str, Any], like: Any, path: str) -> Any:
        if not isinstance(like, torch.Tensor):
            return super().like(node, like, path)
        if node["kind"] != "tensor":
            self.mismatch(path, node, like)
        saved = self.leaves[node["index"]]
        if saved.dtype != like.dtype or saved.shape != like.shape:
            self.mismatch(path, node, like)
        target = torch.empty_like(like)  # a DTensor keeps the template's sharding
        self.targets[f"leaf{node['index']}"] = target
        return target


def load_sharded(
    directory: str | os.PathLike[str],
    *,
    like: PyTree,
    restore_rng: bool = True,
    generators: Mapping[str, torch.Generator] | None = None,
) -> Checkpoint:
    """Load a checkpoint written by :func:`save_sharded`, into the shards of a template.

    ``like`` (usually ``FullyShardedStep.init()`` on this run's ranks) gives
    the tree and each leaf's sharding here, which may differ from the saving
    run's: a checkpoint saved on 4 ranks loads on 2, or on one process (a
    plain tensor leaf receives the whole tensor). The description is checked
    against ``like`` node by node first (kinds, keys, NamedTuple fields, global
    shapes and dtypes): the first difference raises
    :class:`~funcaccum.FuncaccumError` naming its path, before any tensor is
    read. Random-number states are restored as :func:`funcaccum.load`
    restores them: the saving rank 0's, on every rank.

    Call it on every rank of the group (DCP plans the reads together).

    Args:
        directory: a checkpoint written by :func:`save_sharded`.
        like: a state of the same configuration; its leaves say where each
            shard goes.
        restore_rng: restore the random-number states (False: leave them).
        generators: the generators to restore the saved states into, by name.

    Returns:
        A :class:`~funcaccum.Checkpoint`: ``(state, metadata, batches_consumed)``.

    Raises:
        FuncaccumError: not a funcaccum sharded checkpoint, a mismatch with
            ``like``, anything but tensors in DCP's files, or random-number
            states that cannot be restored here.

    Example:
        See :func:`save_sharded`.
    """
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    path = directory / _DESCRIPTION
    if not path.is_file():
        raise FuncaccumError(
            f"{directory} is not a funcaccum sharded checkpoint (no {_DESCRIPTION}; write one "
            "with funcaccum.distributed.save_sharded, or read a single file with funcaccum.load)"
        )
    try:
        description = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several kinds for a file it refuses
        raise FuncaccumError(
            f"cannot read {path} with torch.load(weights_only=True): {str(error).splitlines()[0]}"
        ) from error
    if not (isinstance(description, dict) and description.get("format") == _FORMAT):
        raise FuncaccumError(f"{path} is not a funcaccum sharded checkpoint description")
    if description["version"] > _VERSION:
        raise FuncaccumError(
            f"{directory} is a version {description['version']} checkpoint; this funcaccum "
            f"reads version {_VERSION} and older: upgrade funcaccum"
        )
    if not restore_rng and generators:
        raise FuncaccumError(
            "generators= restores random-number states: not with restore_rng=False"
        )
    stand_ins = [
        torch.empty(leaf["shape"], dtype=getattr(torch, leaf["dtype"]), device="meta")
        for leaf in description["leaves"]
    ]
    loader = _TemplateLoader(directory, stand_ins)
    state = loader.like(description["tree"], like, "state")
    metadata = _read_metadata(directory)
    dcp.load(loader.targets, storage_reader=_safe_reader(directory, metadata))
    if restore_rng:
        _restore_rng(description, generators or {})
    return Checkpoint(state, description["metadata"], description["batches_consumed"])
