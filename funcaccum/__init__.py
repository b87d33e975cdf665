"""funcaccum: exact, functional gradient accumulation on torch.func.

A loss is a pure function ``loss_fn(params, batch)``; :func:`accumulate` splits
the batch into microbatches, takes each one's gradient with
:func:`torch.func.grad`, and folds them with an explicit reducer
(:func:`mean`, :func:`clipped_mean`, :func:`adaptive`) into the exact
large-batch gradient;
:func:`train_step` composes that with an update rule from :mod:`funcaccum.optim`
into one pure, compilable training step; :func:`save` and :func:`load` checkpoint it.
Pytree arithmetic (``tree.add``, ``tree.global_norm``, ...) is in :mod:`funcaccum.tree`.
"""

from . import distributed, optim, tree
from ._accumulate import (
    Accumulated,
    FoldState,
    MicrobatchGrads,
    accumulate,
    finalize,
    fold,
    init_fold,
    merge,
    microbatch_grads,
)
from ._adaptive import AdaptiveCarry, AdaptiveState, adaptive, noise_statistics
from ._adaptive_batching import AdaptiveBatching
from ._checkpoint import Checkpoint, load, save
from ._clipped_mean import ClippedMeanState, clipped_mean
from ._errors import FuncaccumError
from ._functional import functional_model, load_into
from ._ghost import Ghost, ghost
from ._mean import MeanState, mean
from ._microbatch import MicrobatchGroup, plan_microbatches, split_microbatches
from ._reducer import Maximum, Reducer, Tracker
from ._train import StepParts, TrainState, TrainStep, train_step

__version__ = "0.1.0"

__all__ = [
    "Accumulated",
    "AdaptiveBatching",
    "AdaptiveCarry",
    "AdaptiveState",
    "Checkpoint",
    "ClippedMeanState",
    "FoldState",
    "FuncaccumError",
    "Ghost",
    "Maximum",
    "MeanState",
    "MicrobatchGrads",
    "MicrobatchGroup",
    "Reducer",
    "StepParts",
    "Tracker",
    "TrainState",
    "TrainStep",
    "accumulate",
    "adaptive",
    "clipped_mean",
    "distributed",
    "finalize",
    "fold",
    "functional_model",
    "ghost",
    "init_fold",
    "load",
    "load_into",
    "mean",
    "merge",
    "microbatch_grads",
    "noise_statistics",
    "optim",
    "plan_microbatches",
    "save",
    "split_microbatches",
    "train_step",
    "tree",
]
