"""The building blocks of the decoder U-Net: timestep embeddings, ResNet blocks, attention with context tokens.

ResNet blocks with GroupNorm and a scale-shift from the conditioning vector (the "AdaGN" of Dhariwal & Nichol
2021, https://arxiv.org/abs/2105.05233); attention over the pixels of a feature map with extra context
tokens (CLIP image-embedding tokens, text encodings) concatenated to its keys and values, as GLIDE does
(Nichol et al. 2021, https://arxiv.org/abs/2112.10741) and unCLIP's decoder after it (Ramesh et al. 2022,
https://arxiv.org/abs/2204.06125, section 2.2).

Shape letters: b batch, c channels, x y spatial, h heads, i query positions, j key positions, d head dim,
n context tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Timesteps t (b,) (integer or float) -> (b, dim) sines and cosines of geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]  # (b, half)
    embedding = torch.cat((angles.sin(), angles.cos()), dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class TimestepEmbedding(nn.Module):
    """Timesteps (b,) -> (b, out_dim): a sinusoidal embedding through a two-layer MLP."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(t, self.dim))


def group_count(channels: int, groups: int) -> int:
    """The largest group count <= groups that divides channels (GroupNorm needs an exact division)."""
    return math.gcd(channels, groups)


class ResnetBlock(nn.Module):
    """(b, in_dim, x, y) -> (b, out_dim, x, y), conditioned on cond (b, cond_dim) by a per-channel scale and shift."""

    def __init__(self, in_dim: int, out_dim: int, cond_dim: int, groups: int = 8, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(group_count(in_dim, groups), in_dim)
        self.conv1 = nn.Conv2d(in_dim, out_dim, 3, padding=1)
        self.to_scale_shift = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, out_dim * 2))
        self.norm2 = nn.GroupNorm(group_count(out_dim, groups), out_dim)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1)
        self.skip = nn.Conv2d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = rearrange(self.to_scale_shift(cond), "b (two c) -> two b c 1 1", two=2)
        # AdaGN: the conditioning modulates the normalised features (scale around 1 so it starts as identity)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


class ContextAttention(nn.Module):
    """Self-attention over the positions of (b, c, x, y), whose keys and values also include context tokens.

    context: (b, n, context_dim) with context_mask (b, n) bool (True = may be attended to), or None. Pixels
    always see every pixel, so no query row is ever fully masked.
    """

    def __init__(self, dim: int, context_dim: int | None, heads: int = 4, dim_head: int = 32, groups: int = 8):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm = nn.GroupNorm(group_count(dim, groups), dim)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.context_norm = nn.LayerNorm(context_dim) if context_dim else None
        self.context_to_kv = nn.Linear(context_dim, inner * 2, bias=False) if context_dim else None
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        side = x.shape[-1]
        tokens = rearrange(self.norm(x), "b c x y -> b (x y) c")
        q, k, v = rearrange(self.to_qkv(tokens), "b i (three h d) -> three b h i d", three=3, h=self.heads)
        mask = None
        if context is not None and self.context_to_kv is not None:
            ck, cv = rearrange(
                self.context_to_kv(self.context_norm(context)), "b n (two h d) -> two b h n d", two=2, h=self.heads
            )
            k, v = torch.cat((k, ck), dim=2), torch.cat((v, cv), dim=2)  # (b, h, i + n, d)
            if context_mask is not None:
                pixels = torch.ones(x.shape[0], q.shape[2], dtype=torch.bool, device=x.device)
                mask = torch.cat((pixels, context_mask), dim=1)[:, None, None, :]  # (b, 1, 1, j)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.to_out(rearrange(out, "b h i d -> b i (h d)"))
        return x + rearrange(out, "b (x y) c -> b c x y", y=side)


class Downsample(nn.Module):
    """(b, c, x, y) -> (b, out_dim, x / 2, y / 2) by a strided convolution."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 4, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """(b, c, x, y) -> (b, out_dim, 2 x, 2 y): nearest-neighbour upsampling then a 3x3 convolution
    (no checkerboard artefacts of a transposed convolution)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
