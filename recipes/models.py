"""Small models used by the recipes, the benchmarks and the tests."""

from __future__ import annotations

import itertools

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional
from torch.utils.checkpoint import checkpoint

__all__ = ["GPT", "MLP", "Block", "CharTransformer", "ConvNet", "TransformerBlock"]


class MLP(nn.Sequential):
    """``sizes[0] -> ... -> sizes[-1]`` with tanh between layers."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.Tanh())
        super().__init__(*layers)


class ConvNet(nn.Sequential):
    """A small image classifier: two convolutions, then a linear head. Input ``(b, c, 16, 16)``."""

    def __init__(self, channels: int = 1, classes: int = 10, width: int = 16) -> None:
        super().__init__(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * width, classes),
        )


class TransformerBlock(nn.Module):
    """A pre-norm causal self-attention block. ``(b, t, d) -> (b, t, d)``."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.projection = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(self.attention_norm(x))
        q, k, v = rearrange(qkv, "b t (three h e) -> three b h t e", three=3, h=self.heads)
        # Written out: scaled_dot_product_attention has no vmap batching rule on the CPU
        # in torch 2.13, and falls back to a slow per-example loop under vmap.
        scores = torch.einsum("bhqe,bhke->bhqk", q, k) / q.shape[-1] ** 0.5
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=x.device).tril()
        weights = functional.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        attended = torch.einsum("bhqk,bhke->bhqe", weights, v)
        x = x + self.projection(rearrange(attended, "b h t e -> b t (h e)"))
        return x + self.mlp(self.mlp_norm(x))


class CharTransformer(nn.Module):
    """A character-level language model: embeddings, transformer blocks, a linear head.

    ``(b, t)`` token ids -> ``(b, t, vocab)`` logits.
    """

    def __init__(
        self, vocab: int, context: int, dim: int = 64, heads: int = 4, layers: int = 2
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, dim)
        self.position_embedding = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, 4 * dim) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # Per example, not shared: per-example gradient methods need a batch dimension
        # (and Opacus needs it contiguous).
        positions = (
            torch.arange(tokens.shape[-1], device=tokens.device).expand_as(tokens).contiguous()
        )
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        return self.head(self.norm(self.blocks(x)))


class Block(nn.Module):
    """Pre-norm transformer block: causal SDPA attention and a GELU MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape  # (batch, time, features)
        qkv = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, time, head_dim)
        y = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(functional.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """GPT-2's shape: token and position embeddings, blocks, a final norm, an untied head."""

    def __init__(
        self, layers: int, d: int, heads: int, ctx: int, vocab: int, checkpointed: bool = False
    ) -> None:
        super().__init__()
        self.checkpointed = checkpointed  # recompute each block's activations in the backward
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return self.head(self.ln_f(x))  # (batch, time, vocab)
