"""funcaccum: exact, functional gradient accumulation on torch.func.

A loss is a pure function ``loss_fn(params, batch)``; :func:`accumulate` splits
the batch into microbatches, takes each one's gradient as a strategy says
(:func:`scan`, :func:`vmap`, :func:`chunked`, :func:`ghost`, or your own
:class:`Strategy`), and folds them with an explicit reducer (:func:`mean`,
:func:`clipped_mean`, :func:`adaptive`) into the exact large-batch gradient;
:class:`Accumulation` holds every option of an accumulation;
:func:`train_step` composes that with an update rule from :mod:`funcaccum.optim`
into one pure, compilable training step; :func:`save` and :func:`load` checkpoint it.
Pytree arithmetic (``tree.add``, ``tree.global_norm``, ...) is in :mod:`funcaccum.tree`.
"""

from . import distributed, optim, tree
from ._accumulate import (
    Accumulated,
    Accumulation,
    MicrobatchGrads,
    accumulate,
    microbatch_grads,
)
from ._adaptive import AdaptiveCarry, AdaptiveState, adaptive, noise_statistics
from ._adaptive_batching import AdaptiveBatching
from ._checkpoint import Checkpoint, load, save
from ._clipped_mean import ClippedMeanState, clipped_mean
from ._epoch import EpochSummary, run_epoch
from ._errors import FuncaccumError
from ._fold import Folder, FoldState, MicrobatchOutput
from ._functional import functional_model, load_into
from ._ghost import ghost
from ._mean import MeanState, mean
from ._microbatch import MicrobatchGroup, plan_microbatches, split_microbatches
from ._model_state import running_stats
from ._reducer import BatchControl, CarryRule, Control, Maximum, Reducer
from ._strategy import GroupRunner, Strategy, chunked, scan, vmap
from ._train import StepParts, TrainState, TrainStep, train_step

__version__ = "0.1.0"

__all__ = [
    "Accumulated",
    "Accumulation",
    "AdaptiveBatching",
    "AdaptiveCarry",
    "AdaptiveState",
    "BatchControl",
    "CarryRule",
    "Checkpoint",
    "ClippedMeanState",
    "Control",
    "EpochSummary",
    "FoldState",
    "Folder",
    "FuncaccumError",
    "GroupRunner",
    "Maximum",
    "MeanState",
    "MicrobatchGrads",
    "MicrobatchGroup",
    "MicrobatchOutput",
    "Reducer",
    "StepParts",
    "Strategy",
    "TrainState",
    "TrainStep",
    "accumulate",
    "adaptive",
    "chunked",
    "clipped_mean",
    "distributed",
    "functional_model",
    "ghost",
    "load",
    "load_into",
    "mean",
    "microbatch_grads",
    "noise_statistics",
    "optim",
    "plan_microbatches",
    "run_epoch",
    "running_stats",
    "save",
    "scan",
    "split_microbatches",
    "train_step",
    "tree",
    "vmap",
]
