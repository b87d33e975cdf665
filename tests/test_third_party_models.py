"""Batch norm, activation checkpointing and load_into on models from other libraries.

torchvision's resnet18, timm's test models and Hugging Face's GPT-2, each built
from its constructor or config with random weights (nothing is downloaded).
They come with the ``models`` extra; a test whose package is absent is skipped. They
import as a user's code does, after funcaccum, with no workaround here (PyPI's
torchvision beside the CPU torch: see tests/test_torchvision.py).
Everything runs in float64, so that funcaccum and the hand-written loop can be
compared to rounding after several AdamW steps.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from types import ModuleType

import pytest
import torch
from torch import nn
from torch.nn import functional

import funcaccum as fa
from funcaccum.testing import assert_accumulation_exact, assert_trees_allclose

pytestmark = pytest.mark.models
STEPS, LR, EPS, CLASSES = 2, 1e-3, 1e-6, 4
# funcaccum's microbatch gradients equal the loop's to ~1e-15 relative. Training on, a
# deep batch-norm net amplifies that rounding step by step (resnet18 after 1, 2, 3 AdamW
# steps at lr 1e-3: 1e-12, 3e-11, 8e-11 apart), and AdamW's update g / (sqrt(v) + eps),
# blind to the gradient's scale, makes a near-zero gradient element's rounding a sizeable
# step: eps=1e-6 (the same in both runs) and two steps at lr 1e-3 keep both runs within
# 1e-10 with some margin.
EXACT = {"rtol": 1e-10, "atol": 1e-12}
TRAINED = {"rtol": 1e-10, "atol": 1e-10}


def need(name: str) -> ModuleType:
    return pytest.importorskip(name, reason=f"{name} comes with the models test extra")


# --- Batch norm in training mode: funcaccum against the seeds' loop ----------------------------


def microbatch_sizes(n: int, k: int) -> list[int]:
    """funcaccum's split of n examples into k microbatches: sizes differing by at most one."""
    return [n // k + (i < n % k) for i in range(k)]


def image_batches(n: int = 10, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, 3, size, size, generator=g, dtype=torch.float64),  # (n, c, h, w)
         torch.randint(CLASSES, (n,), generator=g))
        for _ in range(STEPS)
    ]  # fmt: skip


def seeds_loop(model: nn.Module, k: int) -> nn.Module:
    """Each microbatch forward in train mode, its loss scaled by its share of the batch,
    backward; one torch.optim.AdamW step per batch."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    for x, y in image_batches():
        optimizer.zero_grad()
        sizes = microbatch_sizes(len(x), k)
        for xs, ys in zip(x.split(sizes), y.split(sizes), strict=True):
            (functional.cross_entropy(model(xs), ys) * len(xs) / len(x)).backward()
        optimizer.step()
    return model


def funcaccum_run(model: nn.Module, k: int) -> tuple[nn.Module, fa.TrainState]:
    model = copy.deepcopy(model).train()
    apply, params, state = fa.functional_model(model, has_state=True)

    def loss_fn(params: dict, model_state: dict, batch: tuple) -> tuple:
        logits, model_state = apply(params, model_state, batch[0])
        return functional.cross_entropy(logits, batch[1]), model_state

    step = fa.train_step(
        loss_fn,
        optimizer=fa.optim.adamw(LR, eps=EPS),
        accumulation=fa.Accumulation(num_microbatches=k, has_state=True),
    )  # fmt: skip
    train_state = step.init(params, model_state=state)
    for batch in image_batches():
        train_state, _ = step(train_state, batch)
    return model, train_state


def assert_trains_as_the_seeds_loop(
    initial: nn.Module, reference: nn.Module, state: fa.TrainState, k: int
) -> None:
    trained = dict(reference.named_parameters())
    assert state.params.keys() == trained.keys()
    assert_trees_allclose(state.params, trained, **TRAINED)
    buffers = dict(reference.named_buffers())
    assert state.model_state.keys() == buffers.keys()
    assert_trees_allclose(state.model_state, buffers, **TRAINED)
    counts = {n: int(v) for n, v in state.model_state.items() if n.endswith("num_batches_tracked")}
    assert counts, "no batch-norm layer in training mode"
    assert set(counts.values()) == {STEPS * k}
    # Not vacuous: training moved the parameters and every running mean.
    start = {n: p.detach() for n, p in initial.named_parameters()}
    assert max(float((state.params[n] - start[n]).abs().max()) for n in start) > 1e-3
    start_buffers = dict(initial.named_buffers())
    means = [n for n in buffers if n.endswith("running_mean")]
    assert min(float((state.model_state[n] - start_buffers[n]).abs().max()) for n in means) > 0


@functools.cache
def resnet18_runs(k: int) -> tuple[nn.Module, nn.Module, nn.Module, fa.TrainState]:
    """(initial model, the seeds' loop's model, funcaccum's module, funcaccum's state)."""
    torchvision = need("torchvision")
    torch.manual_seed(0)
    initial = torchvision.models.resnet18(weights=None, num_classes=CLASSES).double()
    return initial, seeds_loop(initial, k), *funcaccum_run(initial, k)


@pytest.mark.parametrize("k", [1, 3])
def test_torchvision_resnet18_batch_norm_trains_as_the_seeds_loop(k: int) -> None:
    """20 BatchNorm2d layers in training mode; microbatches of 4, 3, 3 images at K=3."""
    initial, reference, _, state = resnet18_runs(k)
    assert_trains_as_the_seeds_loop(initial, reference, state, k)


def test_torchvision_resnet18_load_into_restores_the_trained_model() -> None:
    _, reference, model, state = resnet18_runs(3)
    model, reference = copy.deepcopy(model).eval(), copy.deepcopy(reference).eval()
    x = image_batches()[0][0]
    with torch.no_grad():
        before = model(x)
        want = torch.func.functional_call(model, (state.params, state.model_state), (x,))
        fa.load_into(model, state.params, state.model_state)
        after = model(x)
        loop_out = reference(x)
    assert (before - want).abs().max() > 1e-3  # the module was not trained in place
    assert torch.equal(after, want)  # running statistics included, bit for bit
    torch.testing.assert_close(after, loop_out, **TRAINED)
    values = {**state.params, **state.model_state}
    for name, value in model.state_dict().items():
        assert torch.equal(value, values[name]), name


TIMM_BN_MODELS = [
    "test_resnet",  # torch.nn.BatchNorm2d
    "test_efficientnet",  # timm's BatchNormAct2d, its own forward over F.batch_norm
]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name", TIMM_BN_MODELS)
def test_timm_batch_norm_trains_as_the_seeds_loop(name: str, k: int) -> None:
    timm = need("timm")
    torch.manual_seed(0)
    initial = timm.create_model(name, pretrained=False, num_classes=CLASSES).double()
    assert_trains_as_the_seeds_loop(
        initial, seeds_loop(initial, k), funcaccum_run(initial, k)[1], k
    )


# --- Activation checkpointing inside the loss ----------------------------------------------------


def count_calls(module: nn.Module) -> list[int]:
    """Count the module's calls, recomputations included (checkpointing's recomputation stops
    once it has what the backward needs, before a forward hook would run: a pre-hook)."""
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    module.register_forward_pre_hook(hook)
    return calls


def autograd_grads(
    model: nn.Module, loss: torch.Tensor, retain_graph: bool = False
) -> dict[str, torch.Tensor]:
    """The full batch's gradient as the hand-written loop gets it, by plain autograd."""
    named = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(named.values()), retain_graph=retain_graph)
    return dict(zip(named, grads, strict=True))


def test_timm_vit_checkpointed_gradients_equal_the_full_batch() -> None:
    """timm's set_grad_checkpointing (non-reentrant torch.utils.checkpoint per block)."""
    timm = need("timm")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randint(CLASSES, (7,), generator=g)
    results = {}
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = timm.create_model("test_vit", pretrained=False, num_classes=CLASSES,
                                  img_size=32, patch_size=8).double().train()  # fmt: skip
        model.set_grad_checkpointing(checkpointed)
        calls = count_calls(model.blocks[0])
        apply, params, buffers = fa.functional_model(model)

        def loss_fn(params: dict, batch: tuple, apply=apply, buffers=buffers) -> torch.Tensor:
            return functional.cross_entropy(apply(params, buffers, batch[0]), batch[1])

        got = fa.accumulate(loss_fn, params, (x, y), num_microbatches=3)
        # Checkpointed, each microbatch's block runs again in the backward.
        assert calls[0] == (6 if checkpointed else 3)
        results[checkpointed] = got.grads
        full = autograd_grads(model, functional.cross_entropy(model(x), y))
        assert_trees_allclose(got.grads, full, **EXACT)
    assert_trees_allclose(results[True], results[False], **EXACT)


def gpt2(attn: str, checkpointed: bool) -> nn.Module:
    transformers = need("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # train mode, no randomness
        use_cache=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    model = model.double().train()
    if checkpointed:
        kwargs = {"use_reentrant": False}  # reentrant checkpointing refuses autograd.grad
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        # transformers 5 also hooks the input embeddings to call requires_grad_() on their
        # output: fine under the default strategy='scan' (plain autograd per microbatch),
        # refused inside torch.func transforms (strategy='vmap', which also refuses the
        # checkpoint's saved-tensor hooks).
    return model


def token_batch() -> dict[str, torch.Tensor]:
    """Right-padded sequences of different lengths; padding is -100 in the labels."""
    g = torch.Generator().manual_seed(4)
    lengths = torch.tensor([12, 5, 9, 3, 12, 7, 10])
    mask = (torch.arange(12) < lengths[:, None]).long()  # (n, t)
    ids = torch.randint(64, (7, 12), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def shifted_count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The labels HF's loss averages over: shifted by one, -100 ignored (docs/pitfalls.md)."""
    return (batch["labels"][:, 1:] != -100).sum()


def labels_loss(apply: Callable, buffers: dict) -> Callable:
    """The loss as HF computes it from labels=."""

    def loss_fn(params: dict, batch: dict) -> tuple:
        return apply(params, buffers, **batch).loss, shifted_count(batch)

    return loss_fn


def float64_loss(apply: Callable, buffers: dict) -> Callable:
    """The same loss from the logits, computed in float64 (HF's casts logits to float32)."""

    def loss_fn(params: dict, batch: dict) -> tuple:
        inputs = {n: batch[n] for n in ("input_ids", "attention_mask")}
        logits = apply(params, buffers, **inputs).logits  # (m, t, vocab)
        shifted = batch["labels"][:, 1:]
        loss = functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), shifted.flatten(), ignore_index=-100
        )
        return loss, shifted_count(batch)

    return loss_fn


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_gpt2_checkpointed_gradients_equal_the_full_batch(attn: str) -> None:
    """gradient checkpointing inside the loss: the same token-weighted gradient, split or not.

    HF's labels= loss casts the logits to float32 (``logits.float()``), even in a
    float64 model, so its full-batch comparison holds to float32 rounding; the
    same loss computed in float64 holds to float64 rounding.
    """
    batch = token_batch()
    grads = {}
    for checkpointed in (False, True):
        model = gpt2(attn, checkpointed)
        assert model.config._attn_implementation == attn
        calls = count_calls(model.transformer.h[0].ln_1)  # recomputed inside the block
        apply, params, buffers = fa.functional_model(model)
        assert "lm_head.weight" not in params  # tied to the token embedding: once
        for name, make_loss in (("labels", labels_loss), ("float64", float64_loss)):
            loss_fn = make_loss(apply, buffers)
            got = fa.accumulate(loss_fn, params, batch, num_microbatches=3, has_weight=True)
            assert int(got.weight) == int(shifted_count(batch))
            grads[checkpointed, name] = got.grads
        assert calls[0] == (12 if checkpointed else 6)  # 2 losses x 3 microbatches, recomputed
        out = model(**batch)
        labels_full = autograd_grads(model, out.loss, retain_graph=True)
        assert_trees_allclose(grads[checkpointed, "labels"], labels_full, rtol=1e-6, atol=1e-7)
        shifted = batch["labels"][:, 1:].flatten()
        loss = functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), shifted)
        float64_full = autograd_grads(model, loss)
        assert_trees_allclose(grads[checkpointed, "float64"], float64_full, **EXACT)
    for name in ("labels", "float64"):
        assert_trees_allclose(grads[True, name], grads[False, name], **EXACT)
    # Not vacuous: the microbatches hold different numbers of labels, so an unweighted
    # mean of their losses is a different gradient.
    model = gpt2(attn, False)
    apply, params, buffers = fa.functional_model(model)
    loss_fn = float64_loss(apply, buffers)
    unweighted = fa.accumulate(lambda p, b: loss_fn(p, b)[0], params, batch, num_microbatches=3)
    error = max(float((unweighted.grads[n] - grads[False, "float64"][n]).abs().max())
                for n in params)  # fmt: skip
    assert error > 1e-4


# --- A new user's workflows: a tokenizer's collator, a loader with a short last batch ----------


def test_hf_llama_trains_on_a_collators_batch_encodings_through_run_epoch() -> None:
    """A tokenizer (built here, offline), its LM collator's BatchEncoding batches, right-padded
    with -100 labels, a Llama from its config, its labels= loss token-weighted: as they come."""
    transformers = need("transformers")
    tokenizers = need("tokenizers")
    text = "the cat sat on the mat and the dog ate a bone while a bird sang"
    words = text.split(" ")
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(sorted(set(words)))}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]",
                                                     unk_token="[UNK]")  # fmt: skip
    texts = [tokenizer(" ".join(words[i % 7 : i % 7 + 3 + i % 9])) for i in range(18)]
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
    loader = torch.utils.data.DataLoader(texts, batch_size=8, collate_fn=collator)  # 8, 8, 2
    assert isinstance(next(iter(loader)), transformers.BatchEncoding)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, bos_token_id=None,
        eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).train()
    apply, params, buffers = fa.functional_model(model)

    def loss_fn(params: dict, batch: dict) -> tuple:
        return apply(params, buffers, **batch).loss, shifted_count(batch)

    accumulation = fa.Accumulation(num_microbatches=4, has_weight=True)
    step = fa.train_step(loss_fn, optimizer=fa.optim.adamw(1e-2), accumulation=accumulation)
    state, first = fa.run_epoch(step, step.init(params), loader, unit="tokens")
    for _ in range(3):
        state, last = fa.run_epoch(step, state, loader, unit="tokens")
    tokens = sum(int(shifted_count(batch)) for batch in loader)
    assert (last.steps, int(last.weight)) == (3, tokens)  # the batch of 2: two microbatches
    assert last.loss < first.loss
    batch = next(iter(loader))
    assert_accumulation_exact(loss_fn, params, batch, has_weight=True, strategies=("scan",))


def test_timm_batch_norm_trains_through_an_epoch_with_a_short_last_batch() -> None:
    """10 images in batches of 4: the last 2 run as one microbatch of 2, not two of one."""
    timm = need("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=CLASSES)
    apply, params, buffers = fa.functional_model(model.train(), has_state=True)

    def loss_fn(params: dict, state: dict, batch: list) -> tuple:
        logits, state = apply(params, state, batch[0])
        return functional.cross_entropy(logits, batch[1]), state

    data = torch.utils.data.TensorDataset(torch.randn(10, 3, 32, 32), torch.randint(CLASSES, (10,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    accumulation = fa.Accumulation(num_microbatches=2, has_state=True)
    step = fa.train_step(loss_fn, optimizer=fa.optim.sgd(0.01), accumulation=accumulation)
    seen: list[int] = []

    def count(index: int, state: fa.TrainState, metrics: fa.StepMetrics) -> None:
        seen.append(int(metrics.microbatches))

    state, epoch = fa.run_epoch(step, step.init(params, model_state=buffers), loader,
                                on_step=count)  # fmt: skip
    assert (epoch.steps, int(epoch.weight), seen) == (3, 10, [2, 2, 1])
    counts = {int(v) for k, v in state.model_state.items() if k.endswith("num_batches_tracked")}
    assert counts == {5}
