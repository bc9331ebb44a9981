"""The torch towers of xmodal-mini: a small convolutional stem, then a few transformer blocks over its cells, so each
output token (an image patch, an audio frame span) sees the others (counts, order and spatial relations need that).

Both emit the bundle contract: ``embedding`` [B, D] (mean of the contextual tokens, projected), ``tokens`` [B, T, D]
(each token projected), both L2-normalised, and ``token_mask`` [B, T] (all ones: every cell is real). Attention is
written out by hand (no nn.MultiheadAttention fast paths), so the dynamo exporter sees plain matmuls and softmax.
Needs torch (the ``export`` extra).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-norm transformer block: self-attention and a GELU MLP, both residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // self.heads), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.norm2(x))


def _conv(cin: int, cout: int, stride: tuple[int, int]) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.GELU())


class Head(nn.Module):
    """Cells [B, T, width] → (embedding, tokens, token_mask) in the joint space."""

    def __init__(self, cells: int, width: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, cells, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.token_proj, self.pool_proj = nn.Linear(width, dim), nn.Linear(width, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x + self.pos
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        tokens = F.normalize(self.token_proj(x), dim=-1)
        embedding = F.normalize(self.pool_proj(x.mean(1)), dim=-1)
        return embedding, tokens, torch.ones_like(x[..., 0], dtype=torch.int32)


class ImageTower(nn.Module):
    """``pixel_values`` [B, 3, 64, 64] (normalised RGB) → 4 x 4 = 16 patch tokens."""

    input_names = ("pixel_values",)

    def __init__(self, dim: int = 384, width: int = 128, layers: int = 2, heads: int = 4, size: int = 64) -> None:
        super().__init__()
        chans = [3, 32, 64, 96, width]
        self.stem = nn.Sequential(*(_conv(a, b, (2, 2)) for a, b in zip(chans, chans[1:], strict=False)))
        self.head = Head((size // 16) ** 2, width, dim, layers, heads)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.stem(pixel_values)  # [B, width, S/16, S/16]
        return self.head(x.flatten(2).transpose(1, 2))


class AudioTower(nn.Module):
    """``input_features`` [B, 1, T, n_mels] (log-mel dB) → one frame token per 4 feature frames (80 ms at a 20 ms hop).

    The dB features are standardised inside the graph with constants measured on the training set, so the runtime
    feeds the preprocessor's output as it is."""

    input_names = ("input_features",)

    def __init__(
        self, frames: int, n_mels: int, dim: int = 384, width: int = 128, layers: int = 2, heads: int = 4
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("std", torch.ones(()))
        chans = [1, 32, 64, 96, width]
        strides = [(2, 2), (2, 2), (1, 2), (1, 2)]
        self.stem = nn.Sequential(*(_conv(a, b, s) for a, b, s in zip(chans, chans[1:], strides, strict=False)))
        t, f = frames, n_mels
        for st, sf in strides:
            t, f = (t - 1) // st + 1, (f - 1) // sf + 1
        self.cells = t
        self.flat = nn.Linear(width * f, width)
        self.head = Head(t, width, dim, layers, heads)

    def forward(self, input_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.stem((input_features - self.mean) / self.std)  # [B, width, T', F']
        b, c, t, f = x.shape
        return self.head(self.flat(x.permute(0, 2, 1, 3).reshape(b, t, c * f)))
