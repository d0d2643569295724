"""The attention layer: one dense kernel (`F.scaled_dot_product_attention`), the fast kernels of a pattern's
tile plan, and rotary position embeddings.

Which keys a query sees comes from an attention pattern (:mod:`dalle_pytorch.attention.patterns`) as a
boolean mask, or, for a full-sequence pass, as the pattern's checked tile plan.

Shape letters: b batch, h heads, n / i / j sequence (query / key) positions, d head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from dalle_pytorch.kernels.dropout_attention import dropout_attention, saves_memory
from dalle_pytorch.kernels.sparse_attention import fast_path_available, planned_attention
from dalle_pytorch.kernels.tile_plans import TilePlan

# ---------------------------------------------------------------------------------------------------------
# Rotary embeddings (Su et al. 2021, https://arxiv.org/abs/2104.09864)
# ---------------------------------------------------------------------------------------------------------


def rotary_tables(angles: Tensor, dim_head: int) -> tuple[Tensor, Tensor]:
    """Angles (n, r) -> (cos, signed sin), each (n, dim_head), for :func:`rotate`.

    The features past ``r`` get cos 1 and sin 0 so they pass unchanged without slicing; the sin of the first
    feature of every pair is negated so that a rotation is ``x * cos + swap_pairs(x) * sin``.
    """
    n, rot_dim = angles.shape
    if rot_dim > dim_head or rot_dim % 2:
        raise ValueError(f"angles must have an even number of features <= dim_head={dim_head}, got {rot_dim}")
    cos = torch.ones(n, dim_head, dtype=angles.dtype, device=angles.device)
    sin = torch.zeros(n, dim_head, dtype=angles.dtype, device=angles.device)
    cos[:, :rot_dim] = angles.cos()
    sign = torch.tensor([-1.0, 1.0], dtype=angles.dtype, device=angles.device).repeat(rot_dim // 2)
    sin[:, :rot_dim] = angles.sin() * sign
    return cos, sin


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding of x (..., n, d) with tables (n, d) from :func:`rotary_tables`."""
    if x.shape[-1] % 2:  # an odd head dim: the last feature is never rotated (cos 1, sin 0)
        return torch.cat((rotate(x[..., :-1], cos[..., :-1], sin[..., :-1]), x[..., -1:]), dim=-1)
    if cos.dtype != x.dtype:  # reduced precision
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    # pairs (x1, x2) -> (x2, x1); one copy from strided views, about 3x faster than flip() on CPU
    swapped = torch.stack((x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    return torch.addcmul(x * cos, swapped, sin)


# ---------------------------------------------------------------------------------------------------------
# The attention module
# ---------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention over (b, n, dim) with an optional boolean mask and KV cache.

    ``stable`` (CogView, https://arxiv.org/abs/2105.13290) scales queries down before the dot product;
    the kernel subtracts the row maximum itself, which is the other half of the PB-relax trick.
    ``rotary_values``: rotary embeddings turn the values as well as queries and keys (as the original
    DALLE-pytorch does; each value then carries its key's angle into the output).
    """

    def __init__(
        self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0, stable: bool = False, *,
        rotary_values: bool = False,
    ):  # fmt: skip
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.dropout, self.stable = heads, dim_head, dropout, stable
        self.rotary_values = rotary_values
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        *,
        causal: bool = False,
        rotary: tuple[Tensor, Tensor] | None = None,
        cache=None,
        cache_key=None,
        plan: TilePlan | None = None,
    ) -> Tensor:
        """x: (b, n, dim). mask: bool, broadcastable to (b, h, n, keys), True = may attend.

        ``rotary``: (cos, sin) tables (n, dim_head) of x's positions, from :func:`rotary_tables`.
        ``causal`` asks for a plain causal mask (a faster kernel path) and may not be combined with ``mask``.
        With ``cache`` (a :class:`~dalle_pytorch.models.transformer.DecodingCache`), keys and values of x are
        appended to those of earlier positions and the queries of x attend to all of them.
        ``plan`` (a :class:`~dalle_pytorch.kernels.tile_plans.TilePlan` checked to cover exactly ``mask``, only
        for positions [0, n) without a cache) computes the same attention with a kernel that skips what the
        mask hides; where that kernel cannot run (see ``fast_path_available``), ``mask`` is used.
        """
        qkv = rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        if rotary is not None and self.rotary_values:
            q, k, v = rotate(qkv, *rotary).unbind(0)
        elif rotary is not None:
            # queries and keys in one go: (2, b, h, n, d)
            q, k = rotate(qkv[:2], *rotary).unbind(0)
            # q and k are new tensors; the attention kernel keeps v for its backward pass, and as a view v would
            # keep all of qkv alive (10% of a training step's activations at dim 256); decoding copies v anyway
            v = qkv[2] if cache is not None else qkv[2].contiguous()
        else:
            q, k, v = qkv.unbind(0)
        if cache is not None:
            k = cache.append((cache_key, "k"), k)
            v = cache.append((cache_key, "v"), v)
        scale = None
        if self.stable:
            # PB-relax: pre-divide q so that q.k cannot overflow in half precision; same result in fp32
            alpha = 32.0
            q = q / alpha
            scale = alpha / self.dim_head**0.5
        dropout_p = self.dropout if self.training else 0.0
        if plan is not None and cache is None and fast_path_available(q.device, dropout_p):
            out = planned_attention(q, k, v, plan, scale=scale, dropout_p=dropout_p)
            return self.to_out(rearrange(out, "b h n d -> b n (h d)"))
        if dropout_p > 0 and q.device.type == "cpu" and saves_memory(q, k):
            # the CPU kernel with dropout would keep large (n x n) probabilities per layer for the backward pass
            out = dropout_attention(
                q, k, v, mask, causal=causal and mask is None, dropout_p=dropout_p, scale=scale
            )  # fmt: skip
            return self.to_out(rearrange(out, "b h n d -> b n (h d)"))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout_p,
            is_causal=causal and mask is None,
            scale=scale,
        )
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))
