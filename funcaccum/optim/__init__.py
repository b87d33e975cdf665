"""Update rules as pure gradient transformations, in the optax manner.

Every rule is a :class:`GradientTransformation`: ``init(params) -> state`` and
``update(grads, state, params=None, **extra_args) -> (updates, state)``, with states that are
NamedTuples of tensors; :func:`apply_updates` adds the updates to the params.
Hyperparameters and step counts are 0-d tensors in the state, so a compiled
training step reads new values without recompiling.
"""

from ._adam import ScaleByAdamState, adam, adamw, scale_by_adam
from ._base import (
    GradientTransformation,
    Schedule,
    ScheduleStep,
    apply_updates,
    chain,
    get_hyperparams,
    set_hyperparams,
    with_extra_args_support,
)
from ._clip import ClipByGlobalNormState, clip_by_global_norm
from ._learning_rate import (
    ScaleByLearningRateState,
    ScaleByScheduleState,
    scale_by_learning_rate,
    scale_by_schedule,
)
from ._lion import ScaleByLionState, lion, scale_by_lion
from ._masked import Mask, MaskedState, decay_mask, masked
from ._multi_transform import MultiTransformState, multi_transform
from ._schedules import (
    constant_schedule,
    cosine_decay_schedule,
    exponential_decay,
    join_schedules,
    linear_schedule,
    piecewise_constant_schedule,
    warmup_cosine_decay_schedule,
)
from ._sgd import TraceState, sgd, trace
from ._weight_decay import AddDecayedWeightsState, add_decayed_weights

__all__ = [
    "AddDecayedWeightsState",
    "ClipByGlobalNormState",
    "GradientTransformation",
    "Mask",
    "MaskedState",
    "MultiTransformState",
    "ScaleByAdamState",
    "ScaleByLearningRateState",
    "ScaleByLionState",
    "ScaleByScheduleState",
    "Schedule",
    "ScheduleStep",
    "TraceState",
    "adam",
    "adamw",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "constant_schedule",
    "cosine_decay_schedule",
    "decay_mask",
    "exponential_decay",
    "get_hyperparams",
    "join_schedules",
    "lion",
    "linear_schedule",
    "masked",
    "multi_transform",
    "piecewise_constant_schedule",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_schedule",
    "set_hyperparams",
    "sgd",
    "trace",
    "warmup_cosine_decay_schedule",
    "with_extra_args_support",
]
