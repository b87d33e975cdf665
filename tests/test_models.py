"""Models as users bring them: batch norm's running statistics, checkpointing, write-back."""

from __future__ import annotations

import pytest
import torch
from conftest import conv_bn_model
from torch import nn
from torch.nn import functional
from torch.utils.checkpoint import checkpoint

import funcaccum as fa
from funcaccum.testing import assert_trees_allclose

STEPS, LR = 5, 1e-2


def bn_model() -> nn.Module:
    return conv_bn_model(channels=3, size=6, classes=5)


def image_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(12, 3, 6, 6, generator=g, dtype=torch.float64),  # (n, c, h, w)
         torch.randint(5, (12,), generator=g))
        for _ in range(STEPS)
    ]  # fmt: skip


def seeds_loop(k: int) -> nn.Module:
    """The hand-written loop: loss / K, backward per microbatch, one AdamW step every K."""
    model = bn_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    for x, y in image_batches():
        optimizer.zero_grad()
        for xs, ys in zip(x.chunk(k), y.chunk(k), strict=True):
            (functional.cross_entropy(model(xs), ys) / k).backward()
        optimizer.step()
    return model


# Side by side, each chunk's running statistics come from batch norm's closed form.
STRATEGIES = {
    "scan": lambda model: fa.scan(),
    "vmap": lambda model: fa.vmap(model_state=fa.running_stats(model)),
    "chunked2": lambda model: fa.chunked(2, model_state=fa.running_stats(model)),
}


def funcaccum_run(
    k: int, *, compile: bool = False, strategy: str = "scan"
) -> tuple[nn.Module, fa.TrainState]:
    model = bn_model()
    apply, params, state = fa.functional_model(model, has_state=True)

    def loss_fn(params: dict, model_state: dict, batch: tuple) -> tuple:
        x, y = batch
        logits, model_state = apply(params, model_state, x)
        return functional.cross_entropy(logits, y), model_state

    step = fa.train_step(
        loss_fn,
        optimizer=fa.optim.adamw(LR),
        compile=compile,
        accumulation=fa.Accumulation(
            num_microbatches=k, has_state=True, strategy=STRATEGIES[strategy](model)
        ),
    )
    train_state = step.init(params, model_state=state)
    for batch in image_batches():
        train_state, _ = step(train_state, batch)
    return model, train_state


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("k", [1, 3])
def test_batch_norm_trains_as_the_seeds_loop_does(k: int, strategy: str) -> None:
    """Each microbatch normalised with its own statistics; running statistics in order."""
    reference = seeds_loop(k)
    model, state = funcaccum_run(k, strategy=strategy)
    assert_trees_allclose(state.params, dict(reference.named_parameters()), rtol=1e-10, atol=1e-12)
    want = dict(reference.named_buffers())
    assert_trees_allclose(state.model_state, want, rtol=1e-10, atol=1e-12)
    assert state.model_state["1.num_batches_tracked"].item() == STEPS * k
    # Written back, the module is the loop's module: same outputs, in train and eval mode.
    fa.load_into(model, state.params, state.model_state)
    x = image_batches()[0][0]
    for mode in (True, False):
        model.train(mode), reference.train(mode)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-10, atol=1e-12)


@pytest.mark.compile
@pytest.mark.parametrize("strategy", ["scan", "vmap"])
def test_batch_norm_compiled_matches_eager(strategy: str) -> None:
    _, eager = funcaccum_run(3, strategy=strategy)
    _, compiled = funcaccum_run(3, compile=True, strategy=strategy)
    assert_trees_allclose(compiled.params, eager.params, rtol=1e-9, atol=1e-12)
    assert_trees_allclose(compiled.model_state, eager.model_state, rtol=1e-9, atol=1e-12)


def test_a_skipped_step_keeps_the_running_statistics() -> None:
    model = bn_model()
    apply, params, state = fa.functional_model(model, has_state=True)

    def loss_fn(params: dict, model_state: dict, batch: tuple) -> tuple:
        logits, model_state = apply(params, model_state, batch[0])
        return functional.cross_entropy(logits, batch[1]), model_state

    step = fa.train_step(
        loss_fn,
        optimizer=fa.optim.sgd(0.1),
        accumulation=fa.Accumulation(num_microbatches=2, has_state=True),
    )  # fmt: skip
    start = step.init(params, model_state=state)
    x, y = image_batches()[0]
    after, metrics = step(start, (x * float("nan"), y))
    assert metrics.skipped
    assert all(torch.equal(after.model_state[n], start.model_state[n]) for n in state)


def test_model_state_errors_name_the_fix() -> None:
    model = bn_model()
    with pytest.raises(fa.FuncaccumError, match=r"has_state=True"):
        fa.functional_model(model)
    apply, params, _ = fa.functional_model(model, has_state=True)

    def loss_fn(params: dict, model_state: dict, batch: tuple) -> tuple:
        logits, model_state = apply(params, model_state, batch[0])
        return functional.cross_entropy(logits, batch[1]), model_state

    with pytest.raises(fa.FuncaccumError, match=r"has_state=True.*running_stats\(module\)"):
        fa.train_step(
            loss_fn,
            optimizer=fa.optim.sgd(0.1),
            accumulation=fa.Accumulation(strategy="vmap", has_state=True),
        )
    odd = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    odd.register_buffer("scale", torch.ones(1))
    with pytest.raises(fa.FuncaccumError, match=r"\['scale'\] are other buffers"):
        fa.running_stats(odd)
    step = fa.train_step(
        loss_fn,
        optimizer=fa.optim.sgd(0.1),
        accumulation=fa.Accumulation(has_state=True),
    )
    with pytest.raises(fa.FuncaccumError, match=r"needs init\(params, model_state=\.\.\.\)"):
        step.init(params)


def test_load_into_keeps_tied_weights_tied_and_checks_shapes() -> None:
    torch.manual_seed(0)
    embed = nn.Embedding(7, 4)
    model = nn.Sequential(embed, nn.Linear(4, 7, bias=False))
    model[1].weight = embed.weight  # tied, as a language model's head and embedding
    _, params, _ = fa.functional_model(model)
    assert list(params) == ["0.weight"]  # the tie appears once
    fa.load_into(model, {"0.weight": torch.ones(7, 4)})
    assert model[1].weight is model[0].weight
    assert torch.equal(model[1].weight, torch.ones(7, 4))
    with pytest.raises(fa.FuncaccumError, match=r"'0.weight' is \(7, 4\).*got \(4, 7\)"):
        fa.load_into(model, {"0.weight": torch.ones(4, 7)})
    with pytest.raises(fa.FuncaccumError, match="no parameter or buffer 'head'"):
        fa.load_into(model, {"head": torch.ones(1)})


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(self.norm(x)))


class Stack(nn.Module):
    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block(8) for _ in range(3))
        self.head = nn.Linear(8, 3)
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return self.head(x)


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.compile)])
def test_activation_checkpointing_gives_the_same_training(compile: bool) -> None:
    """torch.utils.checkpoint inside the loss: recomputed activations, the same gradients."""
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(9, 8, generator=g, dtype=torch.float64),
                torch.randint(3, (9,), generator=g)) for _ in range(3)]  # fmt: skip
    runs = []
    for checkpointed in (False, True):
        model = Stack(checkpointed).double()
        apply, params, buffers = fa.functional_model(model)

        def loss_fn(params: dict, batch: tuple, apply=apply, buffers=buffers) -> torch.Tensor:
            return functional.cross_entropy(apply(params, buffers, batch[0]), batch[1])

        step = fa.train_step(
            loss_fn,
            optimizer=fa.optim.adamw(1e-2),
            compile=compile and checkpointed,
            accumulation=fa.Accumulation(num_microbatches=3),
        )  # fmt: skip
        state = step.init(params)
        for batch in batches:
            state, _ = step(state, batch)
        runs.append(state.params)
    assert_trees_allclose(runs[1], runs[0], rtol=1e-10, atol=1e-12)


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lstm, self.head = nn.LSTM(4, 8, batch_first=True), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def test_a_model_vmap_cannot_batch_gets_told_to_use_scan() -> None:
    """nn.LSTM fails under vmap with a raw shape error; the message names the way out."""
    model = Recurrent().double()
    apply, params, buffers = fa.functional_model(model)

    def loss_fn(params: dict, batch: tuple) -> torch.Tensor:
        return functional.cross_entropy(apply(params, buffers, batch[0]), batch[1])

    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(6, 5, 4, generator=g, dtype=torch.float64),  # (n, time, features)
             torch.randint(3, (6,), generator=g))  # fmt: skip
    message = r"(?s)failed under torch.func.vmap.*strategy=scan\(\)"
    with pytest.raises(fa.FuncaccumError, match=message):
        fa.accumulate(loss_fn, params, batch, num_microbatches=3, strategy="vmap")
    scanned = fa.accumulate(loss_fn, params, batch, num_microbatches=3, strategy="scan")
    full = torch.func.grad(loss_fn)(params, batch)
    assert_trees_allclose(scanned.grads, full, rtol=1e-10, atol=1e-12)


def test_the_shifted_label_count_is_the_token_weight() -> None:
    """HF's labels= loss averages over shifted labels: attention_mask.sum() mis-weights."""
    g = torch.Generator().manual_seed(4)
    lengths = torch.tensor([9, 4, 7, 2, 8, 5])
    mask = torch.arange(9) < lengths[:, None]  # (n, t)
    ids = torch.randint(11, (6, 9), generator=g)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(~mask, -100)}
    params = {"embed": torch.randn(11, 4, generator=g, dtype=torch.float64),
              "out": torch.randn(4, 11, generator=g, dtype=torch.float64)}  # fmt: skip

    def loss_with(count: str) -> object:
        def loss_fn(params: dict, batch: dict) -> tuple:
            logits = params["embed"][batch["input_ids"]] @ params["out"]
            shifted = batch["labels"][:, 1:]
            loss = functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), shifted.flatten(), ignore_index=-100
            )
            if count == "shifted":
                return loss, (shifted != -100).sum()
            return loss, batch["attention_mask"].sum()

        return loss_fn

    full = torch.func.grad(lambda p, b: loss_with("shifted")(p, b)[0])(params, batch)
    for count, exact in (("shifted", True), ("mask", False)):
        got = fa.accumulate(loss_with(count), params, batch, num_microbatches=3, has_weight=True)
        error = (got.grads["out"] - full["out"]).abs().max().item()
        assert (error < 1e-12) == exact, (count, error)
        if not exact:
            assert error > 1e-4  # silently off, by far more than rounding
