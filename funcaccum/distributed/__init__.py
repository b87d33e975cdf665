"""Scaling out on torch.distributed: data parallelism and sharded (FSDP2) models.

Each rank folds its own microbatches; :func:`all_reduce_state` merges the
folded states (sums) in one collective; every rank then applies the same
update. :class:`DataParallel` wraps a :class:`~funcaccum.TrainStep` to do
that, with a timeout that turns a dead or stalled peer into a clear error;
:func:`destroy_process_group` ends the run without leaving the backend's
threads behind. A model too big for one rank is sharded with FSDP2's
``fully_shard`` and trained by :class:`FullyShardedStep`, its state saved
and resharded by :func:`save_sharded` and :func:`load_sharded`.
"""

from ._data_parallel import DataParallel, all_reduce_state, broadcast_state
from ._sharded import FullyShardedStep, Gather, Sync, local_bytes
from ._sharded_checkpoint import load_sharded, save_sharded
from ._teardown import destroy_process_group

__all__ = [
    "DataParallel",
    "FullyShardedStep",
    "Gather",
    "Sync",
    "all_reduce_state",
    "broadcast_state",
    "destroy_process_group",
    "load_sharded",
    "local_bytes",
    "save_sharded",
]
