"""Data-parallel accumulation on torch.distributed: one all-reduce per optimizer step.

Each rank folds its own microbatches; :func:`all_reduce_state` merges the
folded states (sums) in one collective; every rank then applies the same
update. :class:`DataParallel` wraps a :class:`~funcaccum.TrainStep` to do
that, with a timeout that turns a dead or stalled peer into a clear error;
:func:`destroy_process_group` ends the run without leaving the backend's
threads behind.
"""

from ._data_parallel import DataParallel, all_reduce_state, broadcast_state
from ._teardown import destroy_process_group

__all__ = ["DataParallel", "all_reduce_state", "broadcast_state", "destroy_process_group"]
