"""A character-level transformer on the Python standard library's own source code.

The corpus is real, variable-length text that ships with Python: each
paragraph of the standard library's ``.py`` files is one sequence of bytes,
cut to the context length and right-padded. Microbatches therefore hold very
different numbers of real tokens, and the loss returns its valid-token count
as its weight (``has_weight=True``), so accumulation gives exactly the
gradient of the mean over every real token in the batch. The step is compiled
(``torch.compile(fullgraph=True)``); the summary reports tokens per second.

    python recipes/char_lm.py
    python recipes/char_lm.py --steps 400 --microbatches 8 --device cuda
"""

from __future__ import annotations

import sysconfig
import time
from pathlib import Path

import _common
import torch
from torch import nn

import funcaccum as fa
from recipes.models import CharTransformer

VOCAB = 256  # bytes


def corpus(context: int, limit: int, smoke: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Paragraphs of the standard library, as ``(sequences, mask)`` of ``context + 1`` bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())[: 20 if smoke else 400]
    sequences: list[bytes] = []
    for path in files:
        for paragraph in path.read_bytes().split(b"\n\n"):
            paragraph = paragraph.strip(b"\n")
            if len(paragraph) > 8:
                sequences.append(paragraph[: context + 1])
        if len(sequences) >= limit:
            break
    sequences = sequences[:limit]
    tokens = torch.zeros(len(sequences), context + 1, dtype=torch.long)
    mask = torch.zeros(len(sequences), context + 1, dtype=torch.bool)
    for i, sequence in enumerate(sequences):
        tokens[i, : len(sequence)] = torch.tensor(list(sequence))
        mask[i, : len(sequence)] = True
    return tokens, mask, len(files)


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--microbatches", type=int, default=4, help="K")
    p.add_argument("--microbatch-size", type=int, default=16, help="sequences per microbatch")
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    _common.add_step_flags(p, compile_by_default=True)
    args = p.parse_args()
    if args.smoke:
        args.steps, args.context, args.dim, args.layers = 4, 32, 32, 1
    device = _common.pick_device(args.device)
    recipe = _common.Recipe("Character LM on the standard library, token-weighted", args)
    batch_size = args.microbatches * args.microbatch_size
    tokens, mask, files = corpus(args.context, 400 if args.smoke else 20000, args.smoke)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(tokens), generator=generator)
    split = len(tokens) * 9 // 10
    train = {"tokens": tokens[order[:split]].to(device), "mask": mask[order[:split]].to(device)}
    valid = {"tokens": tokens[order[split:]].to(device), "mask": mask[order[split:]].to(device)}
    torch.manual_seed(args.seed)
    model = CharTransformer(VOCAB, args.context, dim=args.dim, heads=4, layers=args.layers).to(
        device
    )
    apply, params, buffers = fa.functional_model(model)

    def token_losses(params: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = apply(params, buffers, batch["tokens"][:, :-1])  # (m, t, vocab)
        targets = batch["tokens"][:, 1:]
        losses = nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), reduction="none"
        )
        return losses.view(targets.shape), batch["mask"][:, 1:].to(losses.dtype)

    def loss_fn(params: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        losses, valid_tokens = token_losses(params, batch)
        count = valid_tokens.sum()
        return (losses * valid_tokens).sum() / count.clamp(min=1), count

    schedule = fa.optim.warmup_cosine_decay_schedule(
        0.0, args.lr, max(1, args.steps // 10), args.steps + 1
    )
    step = fa.train_step(
        loss_fn,
        optimizer=fa.optim.adamw(schedule, weight_decay=0.01),
        compile=args.compile,
        accumulation=fa.Accumulation(
            num_microbatches=args.microbatches, has_weight=True, strategy=_common.strategy(args)
        ),
    )
    state = step.init(params)
    tokens_seen, compile_seconds, timed_seconds = 0.0, 0.0, 0.0
    with recipe.progress("training", args.steps) as advance:
        for t in range(args.steps):
            rows = torch.randint(len(train["tokens"]), (batch_size,), generator=generator).to(
                device
            )
            batch = {k: v[rows] for k, v in train.items()}
            start = time.perf_counter()
            state, metrics = step(state, batch)
            loss = float(metrics.loss)  # waits for the step
            elapsed = time.perf_counter() - start
            if t == 0:
                compile_seconds = elapsed
            else:
                timed_seconds += elapsed
                tokens_seen += float(metrics.weight)
            recipe.log(
                step=t,
                loss=loss,
                tokens=metrics.weight,
                learning_rate=metrics.learning_rate,
                grad_norm=metrics.grad_norm,
                seconds=elapsed,
            )
            advance(loss=loss)

    with torch.no_grad():
        losses, valid_tokens = token_losses(state.params, valid)
        valid_loss = float((losses * valid_tokens).sum() / valid_tokens.sum())
    sample = generate(apply, state.params, buffers, b"def ", 120, args.context, args.seed, device)
    padding = 1 - float(mask[:, 1:].float().mean())
    rows = [
        ["training loss (last step, per token)", float(metrics.loss)],
        ["validation loss (per token)", valid_loss],
        ["validation bits per byte", valid_loss / 0.6931471805599453],
        ["tokens per second", tokens_seen / timed_seconds if timed_seconds else 0.0],
        ["first step seconds (compile)", compile_seconds],
        ["padding fraction of the corpus", padding],
        ["parameters", float(sum(v.numel() for v in params.values()))],
    ]
    recipe.summary(
        ["measure", "value"],
        rows,
        notes=[
            f"{len(tokens)} paragraphs from {files} standard-library files; "
            f"{args.steps} AdamW steps of "
            f"{args.microbatches} x {args.microbatch_size} sequences (context {args.context}), "
            f"strategy {args.strategy}, compile {args.compile}, {device}.",
            "sample: " + repr(sample.decode("utf-8", errors="replace")),
        ],
    )


def generate(
    apply, params, buffers, prompt: bytes, length: int, context: int, seed: int, device
) -> bytes:
    """Sample ``length`` bytes after ``prompt``, temperature 0.8."""
    generator = torch.Generator(device=device).manual_seed(seed)
    out = list(prompt)
    with torch.no_grad():
        for _ in range(length):
            window = torch.tensor(out[-context:], device=device)[None]
            logits = apply(params, buffers, window)[0, -1] / 0.8
            out.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)))
    return bytes(out)


if __name__ == "__main__":
    main()
