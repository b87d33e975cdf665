"""A small ResNet with batch norm, trained with accumulation, against the hand-written loop.

Batch norm in training mode is what stops most accumulation libraries: each
microbatch is normalised with its own statistics, and the running statistics
are updated once per microbatch, in order. The hand-written loop (``loss / K``,
``backward()`` per microbatch, one AdamW step every K) does exactly that, and
so does ``funcaccum.train_step`` with ``Accumulation(has_state=True)`` and
``functional_model(model, has_state=True)``. This recipe trains both from the
same start on the same generated images and reports how far apart their
parameters and running statistics end, and each model's accuracy in eval mode
(running statistics) after ``funcaccum.load_into`` writes the trained values
back into the module.

    python recipes/resnet_bn.py
    python recipes/resnet_bn.py --steps 200 --compile --metrics out/resnet.jsonl
"""

from __future__ import annotations

import copy

import _common
import torch
from torch import nn
from torch.nn import functional

import funcaccum as fa

CLASSES = 4


class Residual(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (a 1x1 conv where the shape changes)."""

    def __init__(self, channels_in: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = (
            nn.Sequential(
                nn.Conv2d(channels_in, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )
            if stride != 1 or channels_in != channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = functional.relu(self.bn1(self.conv1(x)))
        return functional.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet(width: int = 8) -> nn.Module:
    """A ResNet for 3x16x16 images: a stem, two residual stages, pooling, a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        Residual(width, width, 1),
        Residual(width, 2 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, CLASSES),
    )


def make_images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images whose class sets which colour channel carries a stripe pattern."""
    labels = torch.randint(CLASSES, (n,), generator=generator)
    images = 2.0 * torch.randn(n, 3, 16, 16, generator=generator)
    stripes = torch.sin(torch.arange(16) * (1.0 + labels[:, None]) * 0.7)  # (n, 16)
    scale = 0.5 * (1 + labels[:, None, None] // 3)
    images[torch.arange(n), labels % 3] += scale * stripes[:, None, :]
    return images, labels


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps")
    p.add_argument("--microbatches", type=int, default=4, help="K")
    p.add_argument("--microbatch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    _common.add_step_flags(p, strategy=False)
    args = p.parse_args()
    if args.smoke:
        args.steps = 6
    device = _common.pick_device(args.device)
    recipe = _common.Recipe("A batch-norm ResNet: funcaccum against the hand-written loop", args)
    k, m = args.microbatches, args.microbatch_size
    generator = torch.Generator().manual_seed(args.seed)
    # float64, so that the two runs can be compared to rounding after many AdamW steps
    # (in float32, Adam's normalisation amplifies rounding differences over the run).
    dtype = torch.float64
    x, y = make_images(8 * k * m, generator)
    test_x, test_y = make_images(512, generator)
    x, test_x = x.to(device, dtype), test_x.to(device, dtype)
    y, test_y = y.to(device), test_y.to(device)
    batches = [(x[i : i + k * m], y[i : i + k * m]) for i in range(0, len(x), k * m)]
    torch.manual_seed(args.seed)
    initial = resnet().to(device, dtype)

    # The hand-written loop: each microbatch normalised with its own statistics, loss / K.
    loop = copy.deepcopy(initial)
    optimizer = torch.optim.AdamW(loop.parameters(), lr=args.lr)

    model = copy.deepcopy(initial)
    apply, params, buffers = fa.functional_model(model, has_state=True)

    def loss_fn(params: dict, model_state: dict, batch: tuple) -> tuple:
        logits, model_state = apply(params, model_state, batch[0])
        return functional.cross_entropy(logits, batch[1]), model_state

    step = fa.train_step(
        loss_fn,
        optimizer=fa.optim.adamw(args.lr),
        compile=args.compile,
        accumulation=fa.Accumulation(num_microbatches=k, has_state=True),
    )  # fmt: skip
    state = step.init(params, model_state=buffers)

    with recipe.progress("training both", args.steps) as advance:
        for t in range(args.steps):
            xs, ys = batches[t % len(batches)]
            optimizer.zero_grad()
            loop_loss = 0.0
            for xm, ym in zip(xs.chunk(k), ys.chunk(k), strict=True):
                loss = functional.cross_entropy(loop(xm), ym) / k
                loss.backward()
                loop_loss += loss.item()
            optimizer.step()
            state, metrics = step(state, (xs, ys))
            recipe.log(step=t, loss=metrics.loss, loop_loss=loop_loss)
            advance(loss=metrics.loss)

    fa.load_into(model, state.params, state.model_state)  # trained values back in the module
    loop_values = {n: v.detach() for n, v in loop.named_parameters()}
    param_gap = max(float((state.params[n] - loop_values[n]).abs().max()) for n in state.params)
    loop_buffers = dict(loop.named_buffers())
    stat_gap = max(
        float((state.model_state[n].double() - loop_buffers[n].double()).abs().max())
        for n in state.model_state
    )

    def evaluate(net: nn.Module) -> tuple[float, float]:
        net.eval()  # the running statistics, as inference uses them
        with torch.no_grad():
            logits = net(test_x)
        net.train()
        loss = functional.cross_entropy(logits, test_y).item()
        return loss, (logits.argmax(-1) == test_y).float().mean().item()

    rows = [
        ["hand-written loop", *evaluate(loop), 0.0, 0.0],
        [f"funcaccum {k} x {m}", *evaluate(model), param_gap, stat_gap],
    ]
    recipe.summary(
        [
            "method",
            "eval loss",
            "eval accuracy",
            "max param deviation",
            "max running-stat deviation",
        ],
        rows,
        notes=[
            f"{args.steps} AdamW steps, lr {args.lr}, batches of {k * m} = {k} x {m}, "
            f"float64, {device}; eval in eval mode on 512 held-out images.",
            "deviation: the largest difference from the hand-written loop's parameters and running "
            "statistics (num_batches_tracked included) at the end.",
        ],
    )


if __name__ == "__main__":
    main()
