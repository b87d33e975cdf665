"""funcaccum: exact, functional gradient accumulation on torch.func.

A loss is a pure function ``loss_fn(params, batch)``; :func:`accumulate` splits
the batch into microbatches, takes each one's gradient as a strategy says
(:func:`scan`, :func:`vmap`, :func:`chunked`, :func:`ghost`), and folds them
with an explicit reducer (:func:`mean`, :func:`clipped_mean`,
:func:`adaptive`) into the exact large-batch gradient; an
:class:`Accumulation` holds those options; :func:`train_step` composes one
with an update rule from :mod:`funcaccum.optim` into a pure, compilable
training step; :func:`save` and :func:`load` checkpoint it.
Pytree arithmetic is in :mod:`funcaccum.tree`; data parallelism in
:mod:`funcaccum.distributed`; testing tools in :mod:`funcaccum.testing`; the
protocols for one's own strategies and reducers in :mod:`funcaccum.extend`.
"""

from . import _torchvision, distributed, extend, optim, tree
from ._accumulate import Accumulation, MicrobatchGrads, accumulate, microbatch_grads
from ._adaptive import adaptive
from ._adaptive_batching import AdaptiveBatching
from ._checkpoint import Checkpoint, load, save
from ._clipped_mean import clipped_mean
from ._epoch import EpochSummary, run_epoch
from ._errors import FuncaccumError
from ._fold import Accumulated, Folded
from ._functional import functional_model, load_into
from ._ghost import ghost
from ._mean import mean
from ._microbatch import split_microbatches
from ._model_state import running_stats
from ._strategy import chunked, scan, vmap
from ._train import StepMetrics, TrainState, TrainStep, train_step

__version__ = "0.1.0"

# torchvision from PyPI beside torch's CPU build: let it import (see funcaccum/_torchvision.py).
_torchvision.install()

__all__ = [
    "Accumulated",
    "Accumulation",
    "AdaptiveBatching",
    "Checkpoint",
    "EpochSummary",
    "Folded",
    "FuncaccumError",
    "MicrobatchGrads",
    "StepMetrics",
    "TrainState",
    "TrainStep",
    "accumulate",
    "adaptive",
    "chunked",
    "clipped_mean",
    "distributed",
    "extend",
    "functional_model",
    "ghost",
    "load",
    "load_into",
    "mean",
    "microbatch_grads",
    "optim",
    "run_epoch",
    "running_stats",
    "save",
    "scan",
    "split_microbatches",
    "train_step",
    "tree",
    "vmap",
]
