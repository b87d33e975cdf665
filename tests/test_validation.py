"""Nothing silently wrong: bad arguments are refused where they enter, naming the argument.

Every refusal is a FuncaccumError (never a bare TypeError or ValueError) whose
message names the argument, what it accepts, and what it got.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from conftest import classification_batch, mlp_loss, mlp_params
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import funcaccum as fa
from funcaccum import optim

NAN, INF = float("nan"), float("inf")
PROPERTY = settings(database=None, deadline=None, max_examples=60)


def constant() -> optim.Schedule:
    return optim.constant_schedule(1.0)


def a_train_step() -> fa.TrainStep:
    return fa.train_step(
        mlp_loss,
        optimizer=optim.sgd(0.1),
        accumulation=fa.Accumulation(num_microbatches=2),
    )


# (make, words the message must contain), ids by what is wrong.
REFUSED: list[Any] = [
    # Microbatching.
    pytest.param(
        lambda: fa.extend.plan_microbatches(10.5, num_microbatches=2),
        "num_examples must be an int >= 1, got 10.5",
        id="num_examples-float",
    ),
    pytest.param(
        lambda: fa.extend.plan_microbatches("10", num_microbatches=2),
        "num_examples must be an int",
        id="num_examples-str",
    ),
    pytest.param(
        lambda: fa.extend.plan_microbatches(None, num_microbatches=2),
        "num_examples must be an int",
        id="num_examples-none",
    ),
    pytest.param(
        lambda: fa.extend.plan_microbatches(-3, num_microbatches=2),
        "num_examples must be >= 1, got -3",
        id="num_examples-negative",
    ),
    # Reducers.
    pytest.param(
        lambda: fa.clipped_mean(1.0, noise_multiplier=NAN, denominator=8),
        "noise_multiplier must be >= 0",
        id="noise-nan",
    ),
    pytest.param(lambda: fa.clipped_mean("1.0"), "max_norm must be > 0", id="max_norm-str"),
    pytest.param(lambda: fa.clipped_mean(None), "max_norm must be > 0", id="max_norm-none"),
    pytest.param(lambda: fa.clipped_mean(NAN), "max_norm must be > 0", id="max_norm-nan"),
    pytest.param(lambda: fa.clipped_mean(INF), "max_norm must be > 0", id="max_norm-inf"),
    pytest.param(lambda: fa.clipped_mean(-1.0), "max_norm must be > 0", id="max_norm-negative"),
    pytest.param(
        lambda: fa.clipped_mean(1.0, generator=0), "generator must be a torch.Generator", id="gen"
    ),
    pytest.param(
        lambda: fa.mean(accum_dtype=torch.int32),
        "accum_dtype must be a floating-point torch.dtype",
        id="mean-int-dtype",
    ),
    pytest.param(
        lambda: fa.mean(accum_dtype="float32"), "got 'float32' (a str); use torch.float32", id="str"
    ),
    pytest.param(
        lambda: fa.clipped_mean(1.0, accum_dtype=torch.int64),
        "accum_dtype must be a floating-point torch.dtype",
        id="clipped-int-dtype",
    ),
    pytest.param(
        lambda: fa.adaptive(accum_dtype=torch.complex64),
        "accum_dtype must be a floating-point torch.dtype",
        id="adaptive-complex-dtype",
    ),
    pytest.param(
        lambda: fa.adaptive(accum_dtype=None), "accum_dtype must be", id="adaptive-none-dtype"
    ),
    pytest.param(
        lambda: fa.adaptive(base_batch_size=0), "base_batch_size must be > 0", id="base-zero"
    ),
    pytest.param(
        lambda: fa.adaptive(base_batch_size=-32), "base_batch_size must be > 0", id="base-negative"
    ),
    pytest.param(
        lambda: fa.adaptive(base_batch_size="32"), "base_batch_size must be > 0", id="base-str"
    ),
    pytest.param(lambda: fa.adaptive(theta=NAN), "theta must be > 0", id="theta-nan"),
    pytest.param(lambda: fa.adaptive(k_min=2.5), "k_min must be an int", id="k_min-float"),
    pytest.param(lambda: fa.adaptive(k_max="64"), "k_max must be an int", id="k_max-str"),
    pytest.param(lambda: fa.adaptive(k_min=1), "2 <= k_min <= k_max", id="k_min-1"),
    pytest.param(lambda: fa.adaptive(decay=1.0), "decay must be in (0, 1)", id="decay-1"),
    pytest.param(lambda: fa.adaptive(decay=NAN), "decay must be in (0, 1)", id="decay-nan"),
    # Optimizers.
    pytest.param(lambda: optim.sgd(NAN), "learning_rate must be >= 0", id="sgd-lr-nan"),
    pytest.param(lambda: optim.sgd(-0.1), "learning_rate must be >= 0", id="sgd-lr-negative"),
    pytest.param(lambda: optim.sgd("0.1"), "learning_rate must be >= 0", id="sgd-lr-str"),
    pytest.param(lambda: optim.sgd(None), "learning_rate must be", id="sgd-lr-none"),
    pytest.param(
        lambda: optim.sgd(torch.tensor([0.1, 0.2])), "got a tensor of shape (2,)", id="lr-1d"
    ),
    pytest.param(
        lambda: optim.sgd(0.1, momentum=-0.9), "momentum must be in [0, 1)", id="momentum-neg"
    ),
    pytest.param(lambda: optim.sgd(0.1, momentum=1.0), "momentum must be in [0, 1)", id="mom-1"),
    pytest.param(lambda: optim.sgd(0.1, momentum=None), "momentum must be", id="momentum-none"),
    pytest.param(
        lambda: optim.sgd(0.1, weight_decay=-1e-4), "weight_decay must be >= 0", id="sgd-wd-neg"
    ),
    pytest.param(
        lambda: optim.sgd(0.1, weight_decay=None), "weight_decay must be >= 0", id="sgd-wd-none"
    ),
    pytest.param(
        lambda: optim.sgd(0.1, nesterov=True), "nesterov=True needs a momentum", id="nesterov-0"
    ),
    pytest.param(
        lambda: optim.sgd(0.1, momentum=0.9, nesterov="yes"),
        "nesterov must be True or False",
        id="nesterov-str",
    ),
    pytest.param(lambda: optim.adam(1e-3, b1=1.0), "b1 must be in [0, 1)", id="adam-b1-1"),
    pytest.param(lambda: optim.adam(1e-3, b2=1.5), "b2 must be in [0, 1)", id="adam-b2"),
    pytest.param(lambda: optim.adam(1e-3, eps=-1e-8), "eps must be >= 0", id="adam-eps-neg"),
    pytest.param(lambda: optim.adam(1e-3, eps=NAN), "eps must be >= 0", id="adam-eps-nan"),
    pytest.param(
        lambda: optim.adam(1e-3, weight_decay=-0.1), "weight_decay must be >= 0", id="adam-wd"
    ),
    pytest.param(lambda: optim.adamw(-1e-3), "learning_rate must be >= 0", id="adamw-lr"),
    pytest.param(
        lambda: optim.adamw(1e-3, weight_decay=NAN), "weight_decay must be >= 0", id="adamw-wd"
    ),
    pytest.param(lambda: optim.adamw(1e-3, b1=-0.1), "b1 must be in [0, 1)", id="adamw-b1"),
    pytest.param(lambda: optim.lion(1e-4, b1=1.0), "b1 must be in [0, 1)", id="lion-b1"),
    pytest.param(lambda: optim.lion(1e-4, b2=-0.5), "b2 must be in [0, 1)", id="lion-b2"),
    pytest.param(lambda: optim.lion(INF), "learning_rate must be >= 0", id="lion-lr"),
    pytest.param(lambda: optim.clip_by_global_norm(0.0), "max_norm must be > 0", id="clip-0"),
    pytest.param(lambda: optim.clip_by_global_norm(-1.0), "max_norm must be > 0", id="clip-neg"),
    pytest.param(lambda: optim.clip_by_global_norm(NAN), "max_norm must be > 0", id="clip-nan"),
    pytest.param(lambda: optim.clip_by_global_norm(None), "max_norm must be > 0", id="clip-none"),
    pytest.param(lambda: optim.clip_by_global_norm("1"), "got '1' (a str)", id="clip-str"),
    pytest.param(lambda: optim.trace(1.5), "momentum must be in [0, 1)", id="trace"),
    pytest.param(
        lambda: optim.scale_by_schedule(0.1), "schedule must be a function", id="schedule-number"
    ),
    pytest.param(
        lambda: optim.chain(optim.sgd),
        "chain's argument 0 must be a GradientTransformation",
        id="c",
    ),
    # Schedules.
    pytest.param(lambda: optim.constant_schedule(NAN), "value must be a finite number", id="const"),
    pytest.param(
        lambda: optim.linear_schedule(0.0, 1.0, 0), "transition_steps must be >= 1", id="lin-0"
    ),
    pytest.param(
        lambda: optim.linear_schedule(0.0, 1.0, 2.5), "transition_steps must be an int", id="lin-f"
    ),
    pytest.param(
        lambda: optim.linear_schedule(0.0, 1.0, 10, transition_begin=-1),
        "transition_begin must be >= 0",
        id="lin-begin",
    ),
    pytest.param(
        lambda: optim.linear_schedule(0.0, INF, 10), "end_value must be a finite", id="lin-inf"
    ),
    pytest.param(
        lambda: optim.cosine_decay_schedule(1.0, 10, alpha=2.0), "alpha must be in [0, 1]", id="a"
    ),
    pytest.param(
        lambda: optim.cosine_decay_schedule(1.0, 10.0), "decay_steps must be an int", id="cos-f"
    ),
    pytest.param(
        lambda: optim.cosine_decay_schedule(NAN, 10), "init_value must be a finite", id="cos-nan"
    ),
    pytest.param(
        lambda: optim.warmup_cosine_decay_schedule(0.0, 1.0, 2.5, 10),
        "warmup_steps must be an int",
        id="warmup-float",
    ),
    pytest.param(
        lambda: optim.warmup_cosine_decay_schedule(0.0, NAN, 2, 10),
        "peak_value must be a finite",
        id="warmup-peak-nan",
    ),
    pytest.param(
        lambda: optim.exponential_decay(0.1, 10, -0.5), "decay_rate must be > 0", id="exp-rate"
    ),
    pytest.param(
        lambda: optim.exponential_decay(0.1, 10, 0.0), "decay_rate must be > 0", id="exp-rate-0"
    ),
    pytest.param(
        lambda: optim.exponential_decay(0.1, 0, 0.5), "transition_steps must be >= 1", id="exp-0"
    ),
    pytest.param(
        lambda: optim.exponential_decay(0.1, 10, 0.5, staircase="yes"),
        "staircase must be True or False",
        id="exp-staircase",
    ),
    pytest.param(
        lambda: optim.join_schedules([constant(), constant()], [1.5]),
        "boundaries[0] must be an int",
        id="join-float",
    ),
    pytest.param(
        lambda: optim.join_schedules([constant(), constant(), constant()], [3, 3]),
        "boundaries must strictly increase",
        id="join-equal",
    ),
    pytest.param(
        lambda: optim.join_schedules([constant(), 0.1], [3]),
        "schedules[1] must be a schedule",
        id="join-number",
    ),
    pytest.param(
        lambda: optim.piecewise_constant_schedule(1.0, {10: -0.1}),
        "boundaries_and_scales[10] must be >= 0",
        id="piecewise-negative",
    ),
    pytest.param(
        lambda: optim.piecewise_constant_schedule(1.0, {1.5: 0.1}),
        "a boundary of boundaries_and_scales must be an int",
        id="piecewise-float",
    ),
    pytest.param(
        lambda: optim.piecewise_constant_schedule(1.0, [(10, 0.1)]),
        "boundaries_and_scales must be a dict",
        id="piecewise-list",
    ),
    # Models and processes.
    pytest.param(
        lambda: fa.functional_model(nn.ReLU()), "has no trainable parameters", id="no-params"
    ),
    pytest.param(
        lambda: fa.functional_model(nn.Linear(2, 2).requires_grad_(False)),
        "has no trainable parameters",
        id="all-frozen",
    ),
    pytest.param(
        lambda: fa.functional_model(nn.Linear), "got the class Linear: make one first", id="class"
    ),
    pytest.param(
        lambda: fa.functional_model(lambda x: x),
        "a plain function has no parameters",
        id="function",
    ),
    pytest.param(
        lambda: fa.distributed.DataParallel(a_train_step(), timeout=-1),
        "timeout must be > 0",
        id="timeout-negative",
    ),
    pytest.param(
        lambda: fa.distributed.DataParallel(a_train_step(), timeout="60"),
        "timeout must be > 0",
        id="timeout-str",
    ),
    pytest.param(
        lambda: fa.distributed.DataParallel(lambda s, b: s),
        "step must be a TrainStep",
        id="dp-function",
    ),
]


@pytest.mark.parametrize(("make", "words"), REFUSED)
def test_a_bad_argument_is_refused_naming_it(make: Callable[[], Any], words: str) -> None:
    with pytest.raises(fa.FuncaccumError, match=re.escape(words)):
        make()


ACCEPTED: list[Any] = [
    pytest.param(lambda: optim.sgd(torch.tensor(0.1)), id="0-d-tensor-rate"),
    pytest.param(lambda: optim.sgd(1), id="int-rate"),
    pytest.param(lambda: optim.sgd(np.float32(0.1), momentum=np.float64(0.9)), id="numpy"),
    pytest.param(lambda: optim.sgd(0.0), id="zero-rate"),
    pytest.param(lambda: optim.adamw(optim.cosine_decay_schedule(1e-3, 10)), id="schedule"),
    pytest.param(lambda: optim.adam(1e-3, b1=0.0, eps=0.0), id="zero-b1-eps"),
    pytest.param(lambda: optim.clip_by_global_norm(torch.tensor(1.0)), id="tensor-norm"),
    pytest.param(lambda: fa.clipped_mean(torch.tensor(2.0)), id="tensor-max-norm"),
    pytest.param(lambda: fa.mean(accum_dtype=torch.float64), id="mean-float64"),
    pytest.param(lambda: fa.adaptive(base_batch_size=32), id="adaptive-base"),
    pytest.param(
        lambda: fa.extend.plan_microbatches(np.int64(10), num_microbatches=2), id="numpy-int"
    ),
    pytest.param(lambda: optim.join_schedules([constant(), constant()], [0]), id="join-0"),
]


@pytest.mark.parametrize("make", ACCEPTED)
def test_what_the_factories_accepted_before_is_still_accepted(make: Callable[[], Any]) -> None:
    make()


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"learning_rate": NAN}, "learning_rate must be >= 0"),
        ({"learning_rate": -1e-3}, "learning_rate must be >= 0"),
        ({"learning_rate": "1e-3"}, "learning_rate must be >= 0"),
        ({"learning_rate": torch.ones(2)}, "got a tensor of shape (2,)"),
        ({"b1": 1.0}, "b1 must be in [0, 1)"),
        ({"b2": -0.1}, "b2 must be in [0, 1)"),
        ({"eps": -1.0}, "eps must be >= 0"),
        ({"weight_decay": -1.0}, "weight_decay must be >= 0"),
        ({"weight_decay": None}, "weight_decay must be >= 0"),
    ],
)
def test_set_hyperparams_checks_values_by_name(values: dict, words: str) -> None:
    state = optim.adamw(1e-3).init({"w": torch.zeros(2)})
    with pytest.raises(fa.FuncaccumError, match=re.escape(words)):
        optim.set_hyperparams(state, **values)


def test_set_hyperparams_checks_momentum_and_max_norm() -> None:
    rule = optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1, momentum=0.9))
    state = rule.init({"w": torch.zeros(2)})
    with pytest.raises(fa.FuncaccumError, match=re.escape("momentum must be in [0, 1)")):
        optim.set_hyperparams(state, momentum=1.0)
    with pytest.raises(fa.FuncaccumError, match=re.escape("max_norm must be > 0")):
        optim.set_hyperparams(state, max_norm=0.0)
    state = optim.set_hyperparams(state, momentum=torch.tensor(0.5), max_norm=2)
    assert optim.get_hyperparams(state)["momentum"].item() == 0.5
    assert optim.get_hyperparams(state)["max_norm"].item() == 2.0


@PROPERTY
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_a_beta_is_accepted_exactly_in_zero_to_one(b1: float) -> None:
    """The factory and set_hyperparams apply the same rule to the same name."""
    inside = 0 <= b1 < 1
    state = optim.adam(1e-3).init({"w": torch.zeros(1)})
    for make in (
        lambda: optim.scale_by_adam(b1=b1),
        lambda: optim.scale_by_lion(b1=b1),
        lambda: optim.set_hyperparams(state, b1=b1),
    ):
        if inside:
            make()
        else:
            with pytest.raises(fa.FuncaccumError, match="b1 must be in"):
                make()


@PROPERTY
@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**70), 2**70))
def test_a_learning_rate_is_accepted_exactly_when_finite_and_not_negative(rate: float) -> None:
    if math.isfinite(rate) and rate >= 0:
        optim.sgd(rate)
    else:
        with pytest.raises(fa.FuncaccumError, match="learning_rate must be >= 0"):
            optim.sgd(rate)


# Params an optimizer cannot train, each with the path the message must name.
BAD_PARAMS = [
    pytest.param(
        {"w": torch.zeros(2), "steps": torch.tensor(3)}, "params['steps'] is a torch.int64", id="i"
    ),
    pytest.param({"w": 0.5}, "params['w'] is a float", id="python-float"),
    pytest.param(
        {"layer": [torch.zeros(2), np.zeros(2)]},
        "params['layer'][1] is a ndarray (convert it with torch.from_numpy)",
        id="numpy",
    ),
    pytest.param(
        {"w": torch.zeros(2, device="meta")}, "params['w'] is on the meta device", id="meta"
    ),
]
RULES = [
    pytest.param(lambda: optim.sgd(0.1), id="sgd"),
    pytest.param(lambda: optim.adamw(1e-3), id="adamw"),
    pytest.param(lambda: optim.lion(1e-4), id="lion"),
    pytest.param(lambda: optim.clip_by_global_norm(1.0), id="clip"),
    pytest.param(lambda: optim.adamw(1e-3, mask=optim.decay_mask), id="masked-adamw"),
]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(("params", "words"), BAD_PARAMS)
def test_init_refuses_params_it_cannot_train(rule: Callable, params: dict, words: str) -> None:
    with pytest.raises(fa.FuncaccumError, match=re.escape(words)):
        rule().init(params)


def test_init_takes_absent_params_and_low_precision() -> None:
    params = {"w": torch.zeros(2, dtype=torch.bfloat16), "frozen": None}
    optim.adamw(1e-3).init(params)


def test_a_state_from_another_optimizer_is_refused() -> None:
    params = mlp_params()
    adamw = optim.adamw(1e-3)
    with pytest.raises(fa.FuncaccumError, match=r"chain\(\)'s update got a tuple of 1"):
        adamw.update(params, optim.sgd(0.1).init(params), params)
    sgd_state = optim.sgd(0.1, momentum=0.9, weight_decay=0.1).init(params)
    with pytest.raises(
        fa.FuncaccumError,
        match=r"scale_by_adam\(\)'s update got AddDecayedWeightsState.*add_decayed_weights\(\)",
    ):
        adamw.update(params, sgd_state, params)


def test_params_in_place_of_the_state_are_refused() -> None:
    params = mlp_params()
    rule = optim.adamw(1e-3)
    state = rule.init(params)
    with pytest.raises(fa.FuncaccumError, match=re.escape("update(updates, state, params)")):
        rule.update(params, params, state)
    with pytest.raises(fa.FuncaccumError, match=r"scale_by_adam.*got dict"):
        optim.scale_by_adam().update(params, params)


def test_weight_decay_without_params_is_refused() -> None:
    rule = optim.add_decayed_weights(0.1)
    params = {"w": torch.ones(2)}
    with pytest.raises(fa.FuncaccumError, match=r"add_decayed_weights.*reads the params"):
        rule.update(params, rule.init(params))


@pytest.mark.parametrize("strategy", ["vmap", "scan"])
def test_a_state_finalized_with_the_wrong_reducer_is_refused(strategy: str) -> None:
    params, batch = mlp_params(), classification_batch(8)
    # A state carries no reducer; the Accumulation that made it does. Another one refuses it.
    clipped_acc = fa.Accumulation(reducer=fa.clipped_mean(1.0), num_microbatches=2)
    mean_acc = fa.Accumulation(num_microbatches=2, strategy=strategy)
    clipped = clipped_acc.init(params)
    with pytest.raises(
        fa.FuncaccumError,
        match=r"mean\(\)'s finalize got ClippedMeanState.*made by clipped_mean\(\)",
    ):
        mean_acc.finalize(clipped)
    with pytest.raises(fa.FuncaccumError, match=r"mean\(\)'s merge got ClippedMeanState"):
        mean_acc.merge(mean_acc.init(params), clipped)
    adaptive_acc = fa.Accumulation(reducer=fa.adaptive(), num_microbatches=2, strategy=strategy)
    with pytest.raises(fa.FuncaccumError, match=r"adaptive\(\)'s update got ClippedMeanState"):
        adaptive_acc.fold(mlp_loss, params, batch, clipped)
    with pytest.raises(fa.FuncaccumError, match=r"clipped_mean\(\)'s finalize got MeanState"):
        clipped_acc.finalize(mean_acc.init(params))
