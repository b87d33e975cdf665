"""For writers of strategies and reducers: the protocols and the pieces funcaccum is made of.

A user trains with what :mod:`funcaccum` exports; what is here is what its
strategies and reducers are built from, so one's own can be built the same way:

- strategies: :class:`Strategy` (``build(folder) -> run``), the
  :class:`Folder` it builds from (each piece eager or traced as the step
  runs), the :class:`MicrobatchGroup` it runs on, the
  :class:`MicrobatchOutput` it returns, and the :class:`Runner` that drives
  it over a batch (:meth:`Accumulation.runner <funcaccum.Accumulation.runner>`);
- the fold: :class:`FoldState` (sums only), the :class:`LossSpec` a folder
  reads, and :data:`CompileMode`;
- reducers: :class:`Reducer` (``init``/``update``/``merge``/``finalize``),
  :class:`CarryRule` and the :class:`Control` it returns, :class:`BatchControl`,
  :class:`Maximum`, :class:`SumFold` (folding by a sum of gradients), and
  the built-in reducers' states and stats;
- :func:`plan_microbatches` (a split without the data) and
  :func:`noise_statistics` (the adaptive reducer's estimates).
"""

from ._accumulate import Runner
from ._adaptive import AdaptiveCarry, AdaptiveState, AdaptiveStats, noise_statistics
from ._clipped_mean import ClippedMeanState, ClippedMeanStats
from ._compile import CompileMode
from ._fold import FoldState, LossSpec, MicrobatchOutput
from ._folder import Folder
from ._mean import MeanState, MeanStats
from ._microbatch import MicrobatchGroup, plan_microbatches
from ._reducer import BatchControl, CarryRule, Control, Maximum, Reducer, SumFold
from ._strategy import GroupRunner, Strategy

__all__ = [
    "AdaptiveCarry",
    "AdaptiveState",
    "AdaptiveStats",
    "BatchControl",
    "CarryRule",
    "ClippedMeanState",
    "ClippedMeanStats",
    "CompileMode",
    "Control",
    "FoldState",
    "Folder",
    "GroupRunner",
    "LossSpec",
    "Maximum",
    "MeanState",
    "MeanStats",
    "MicrobatchGroup",
    "MicrobatchOutput",
    "Reducer",
    "Runner",
    "Strategy",
    "SumFold",
    "noise_statistics",
    "plan_microbatches",
]
