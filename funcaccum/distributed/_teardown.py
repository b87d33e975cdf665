"""A process group torn down whole: no reference left behind, so its backend threads stop.

``torch.distributed.nn.functional`` writes ``group=group.WORLD`` as default
arguments, evaluated once, when the module is first imported. torch imports
it lazily: the first :func:`torch.func.grad` imports ``torch._dynamo``, which
imports it. When that happens after ``init_process_group``, ten functions
keep the live world group in their defaults; ``destroy_process_group()`` then
cannot free it, gloo's threads outlive the interpreter's shutdown, and a late
release of their work aborts the process ("terminate called without an active
exception", SIGABRT) in a few percent of runs. Two remedies, both here:

- importing this package imports that module at once, so when funcaccum is
  imported before the group exists (as scripts do) the defaults hold None;
- :func:`destroy_process_group` also drops references already captured, for
  a group set up before funcaccum was imported.
"""

from __future__ import annotations

import sys
from typing import Any

import torch.distributed as dist

__all__ = ["destroy_process_group", "release_captured_group"]

_CAPTURING_MODULE = "torch.distributed.nn.functional"

if dist.is_available():
    # Before any process group exists, so its default arguments capture None (see above).
    import torch.distributed.nn.functional  # noqa: F401


def release_captured_group(group: Any) -> int:
    """Replace ``group`` in the default arguments of ``torch.distributed.nn.functional``.

    Each default that is ``group`` (by identity) becomes None, which those
    functions read as "the default group when called". Returns how many
    defaults were replaced.
    """
    module = sys.modules.get(_CAPTURING_MODULE)
    if module is None or group is None:
        return 0
    replaced = 0
    for value in vars(module).values():
        defaults = getattr(value, "__defaults__", None)
        if callable(value) and defaults and any(d is group for d in defaults):
            value.__defaults__ = tuple(None if d is group else d for d in defaults)
            replaced += sum(d is group for d in defaults)
    return replaced


def destroy_process_group(group: Any = None) -> None:
    """``torch.distributed.destroy_process_group``, leaving no reference to the group behind.

    Use it in place of torch's at the end of a distributed run. It destroys
    ``group`` (default: the world, and with it every group), then drops the
    references that ``torch.distributed.nn.functional`` took to it if that
    module was first imported while the group existed, so the group is freed
    now and its backend threads stop before the interpreter exits, instead of
    aborting it (docs/scaling.md). Hold no references of your own to the group
    object either (``DataParallel`` keeps only the ``group`` it was given).

    Args:
        group: the group to destroy; None for the default (world) group.

    Example:
        >>> import datetime, socket
        >>> import torch.distributed as dist
        >>> import funcaccum as fa
        >>> with socket.socket() as s:
        ...     s.bind(("127.0.0.1", 0))
        ...     port = s.getsockname()[1]
        >>> dist.init_process_group(
        ...     "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
        ...     timeout=datetime.timedelta(seconds=30),
        ... )
        >>> fa.distributed.destroy_process_group()
        >>> dist.is_initialized()
        False
    """
    target = dist.group.WORLD if group is None else group
    dist.destroy_process_group(group)
    release_captured_group(target)
