"""Small pure models shared by the tests."""

from __future__ import annotations

import socket
from itertools import pairwise
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional

SLOW_MARKERS = ("compile", "subprocess", "distributed", "recipe", "models")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that compiles, starts processes or trains third-party models is slow too."""
    for item in items:
        if any(item.get_closest_marker(name) for name in SLOW_MARKERS):
            item.add_marker(pytest.mark.slow)


def mlp_params(
    dtype: torch.dtype = torch.float64, sizes: tuple[int, ...] = (5, 16, 3), seed: int = 0
) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"layer{i}": {
            "w": torch.randn(a, b, generator=g, dtype=dtype) / a**0.5,
            "b": torch.randn(b, generator=g, dtype=dtype) * 0.1,
        }
        for i, (a, b) in enumerate(pairwise(sizes))
    }


def mlp_apply(params: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    layers = list(params.values())
    for layer in layers[:-1]:
        x = torch.tanh(x @ layer["w"] + layer["b"])
    return x @ layers[-1]["w"] + layers[-1]["b"]


def mlp_loss(params: dict[str, Any], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the microbatch."""
    return functional.cross_entropy(mlp_apply(params, batch["x"]), batch["y"])


def classification_batch(
    n: int, dtype: torch.dtype = torch.float64, d: int = 5, classes: int = 3, seed: int = 1
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, d, generator=g, dtype=dtype),
        "y": torch.randint(classes, (n,), generator=g),
    }


def sequence_batch(
    n: int, length: int = 7, vocab: int = 11, seed: int = 2
) -> dict[str, torch.Tensor]:
    """Token sequences of random lengths 1..length, right-padded, with a validity mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    tokens = torch.randint(vocab, (n, length), generator=g) * mask
    return {"tokens": tokens, "targets": torch.roll(tokens, -1, dims=1), "mask": mask}


def sequence_params(
    dtype: torch.dtype = torch.float64, vocab: int = 11, dim: int = 6
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "embed": torch.randn(vocab, dim, generator=g, dtype=dtype),
        "out": torch.randn(dim, vocab, generator=g, dtype=dtype) / dim**0.5,
    }


def token_losses(params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = torch.tanh(params["embed"][batch["tokens"]]) @ params["out"]
    return functional.cross_entropy(
        logits.flatten(0, 1), batch["targets"].flatten(), reduction="none"
    ).view(batch["mask"].shape)


def token_weighted_loss(
    params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the microbatch's valid tokens, and their count as the weight."""
    mask = batch["mask"].to(params["out"].dtype)
    count = mask.sum()
    return (token_losses(params, batch) * mask).sum() / count, count


def free_port() -> str:
    """A free TCP port on loopback, for test process groups."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


# The public modules: tests/test_api.py and tests/test_api_examples.py check each one's __all__.
PUBLIC_MODULES = [
    "funcaccum",
    "funcaccum.extend",
    "funcaccum.optim",
    "funcaccum.testing",
    "funcaccum.distributed",
    "funcaccum.tree",
    "funcaccum.privacy",
]


def conv_bn_model(channels: int = 2, size: int = 5, classes: int = 3) -> nn.Module:
    """A float64 conv + batch norm classifier for (n, channels, size, size) images."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1, bias=False),  # a bias before batch norm: no gradient
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * size * size, classes),
    ).double()


def image_batch(n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64) * 2 + 0.5  # (n, c, h, w)
    return {"x": x, "y": torch.randint(3, (n,), generator=g)}


@pytest.fixture
def one_process_group(tmp_path: Any) -> Any:
    """A gloo group of one process, in this process, and its 1-d device mesh; destroyed after."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import funcaccum as fa

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1
    )
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        fa.distributed.destroy_process_group()
