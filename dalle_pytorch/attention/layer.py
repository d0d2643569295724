"""Attention: one kernel (`F.scaled_dot_product_attention`) and pure builders of the masks DALLE uses.

The sequence DALLE attends over is ``[BOS, text tokens, image tokens]``: ``text_len`` = 1 + text_seq_len
positions of text followed by an ``fmap x fmap`` grid of image tokens in raster order. Every mask here is a
boolean ``(n, n)`` matrix, ``mask[i, j] = True`` when query ``i`` may attend to key ``j``. Text queries always
see all earlier text (causally); the attention type decides which earlier image tokens an image query sees.

Shape letters: b batch, h heads, n / i / j sequence (query / key) positions, d head dim.

Sparse patterns follow the Sparse Transformer (Child et al. 2019, https://arxiv.org/abs/1904.10509) and the
DALL-E paper (Ramesh et al. 2021, https://arxiv.org/abs/2102.12092, appendix B.1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from dalle_pytorch.kernels.dropout_attention import dropout_attention, saves_memory

if TYPE_CHECKING:
    from dalle_pytorch.kernels.sparse_attention import SparsePattern

ATTENTION_TYPES = ("full", "axial_row", "axial_col", "conv_like", "sparse")


# ---------------------------------------------------------------------------------------------------------
# Masks: small pure functions of (text length, grid size, options)
# ---------------------------------------------------------------------------------------------------------


def causal_mask(n: int, device: torch.device | None = None) -> Tensor:
    """(n, n) bool, True on and below the diagonal."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def _grid_coordinates(text_len: int, fmap: int) -> tuple[Tensor, Tensor, Tensor]:
    """For every position of [text | image grid]: (is_image, row, col); rows/cols are -1 for text."""
    n = text_len + fmap * fmap
    pos = torch.arange(n)
    is_image = pos >= text_len
    grid_index = (pos - text_len).clamp(min=0)
    row = torch.where(is_image, grid_index // fmap, -1)
    col = torch.where(is_image, grid_index % fmap, -1)
    return is_image, row, col


def attention_mask(
    attn_type: str,
    text_len: int,
    fmap: int,
    *,
    kernel_size: int = 5,
    dilation: int = 1,
    sparse_block_size: int = 16,
    sparse_num_local_blocks: int = 4,
    sparse_num_random_blocks: int = 2,
    sparse_seed: int = 0,
) -> Tensor:
    """The (n, n) boolean mask of one attention type, n = text_len + fmap ** 2.

    - ``full``: causal over everything.
    - ``axial_row``: all text + earlier-or-same image tokens of the same row.
    - ``axial_col``: all text + earlier-or-same image tokens of the same column.
    - ``conv_like``: all text + the causal half of a ``kernel_size`` x ``kernel_size`` window (spacing
      ``dilation``) centred on the token: window rows above it, and the window tokens left of it in its row.
    - ``sparse``: block-sparse over the whole sequence: blocks of ``sparse_block_size`` positions see the
      ``sparse_num_local_blocks`` blocks ending at their own, every block holding text, and
      ``sparse_num_random_blocks`` earlier blocks drawn from ``sparse_seed``; all restricted to causal.
    """
    if attn_type not in ATTENTION_TYPES:
        raise ValueError(f"attn_type must be one of {ATTENTION_TYPES}, got {attn_type!r}")
    n = text_len + fmap * fmap
    causal = causal_mask(n)
    if attn_type == "full":
        return causal
    if attn_type == "sparse":
        return causal & _block_sparse_mask(
            n, text_len, sparse_block_size, sparse_num_local_blocks, sparse_num_random_blocks, sparse_seed
        )

    is_image, row, col = _grid_coordinates(text_len, fmap)
    # (i, j) grids of query / key coordinates
    qi, kj = is_image[:, None], is_image[None, :]
    dr = row[:, None] - row[None, :]  # query row - key row
    dc = col[:, None] - col[None, :]
    if attn_type == "axial_row":
        image_part = dr == 0
    elif attn_type == "axial_col":
        image_part = dc == 0
    else:  # conv_like
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        if dilation < 1:
            raise ValueError(f"dilation must be >= 1, got {dilation}")
        reach = (kernel_size // 2) * dilation
        image_part = (dr.abs() <= reach) & (dc.abs() <= reach) & (dr % dilation == 0) & (dc % dilation == 0)
    # text queries: causal text; image queries: all text + the pattern among image keys
    allowed = ~kj | (qi & kj & image_part)
    return causal & allowed


def _block_sparse_mask(n: int, text_len: int, block_size: int, num_local: int, num_random: int, seed: int) -> Tensor:
    layout = block_sparse_layout(n, text_len, block_size, num_local, num_random, seed)
    block_of = torch.arange(n) // block_size
    return layout[block_of[:, None], block_of[None, :]]


def block_sparse_layout(n: int, text_len: int, block_size: int, num_local: int, num_random: int, seed: int) -> Tensor:
    """(num_blocks, num_blocks) bool: which key block each query block of ``block_size`` positions may see.

    Local blocks (the ``num_local`` ending at the query block), every block holding text, and ``num_random``
    earlier blocks drawn from ``seed``. The draws for block q depend only on the blocks before it, so the
    layout of a shorter sequence is the top-left corner of the layout of a longer one. Not yet causal inside
    a block: :func:`attention_mask` intersects it with the causal mask.
    """
    if block_size < 1 or num_local < 1 or num_random < 0:
        raise ValueError(
            "sparse attention needs sparse_block_size >= 1, sparse_num_local_blocks >= 1 and "
            f"sparse_num_random_blocks >= 0, got {block_size}, {num_local}, {num_random}"
        )
    num_blocks = -(-n // block_size)
    qb, kb = torch.meshgrid(torch.arange(num_blocks), torch.arange(num_blocks), indexing="ij")
    layout = (qb - kb >= 0) & (qb - kb < num_local)
    layout |= (kb * block_size < text_len) & (kb <= qb)  # blocks that hold text are global
    generator = torch.Generator().manual_seed(seed)
    for q in range(num_blocks):
        if q == 0 or num_random == 0:
            continue
        picks = torch.randperm(q, generator=generator)[:num_random]
        layout[q, picks] = True
    return layout


# ---------------------------------------------------------------------------------------------------------
# Rotary embeddings (Su et al. 2021, https://arxiv.org/abs/2104.09864)
# ---------------------------------------------------------------------------------------------------------


def rotate_half(x: Tensor) -> Tensor:
    x = rearrange(x, "... (d two) -> ... d two", two=2)
    x1, x2 = x.unbind(-1)
    return rearrange(torch.stack((-x2, x1), dim=-1), "... d two -> ... (d two)")


def apply_rotary(angles: Tensor, x: Tensor) -> Tensor:
    """Rotate the first ``angles.shape[-1]`` features of x (b, h, n, d) by angles (n, r); the rest pass.

    The reference definition; models use the precomputed tables of :func:`rotary_tables` with :func:`rotate`.
    """
    rot_dim = angles.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    angles = angles.to(x.dtype)
    x_rot = x_rot * angles.cos() + rotate_half(x_rot) * angles.sin()
    return torch.cat((x_rot, x_pass), dim=-1)


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
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0, stable: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.dropout, self.stable = heads, dim_head, dropout, stable
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
        pattern: SparsePattern | None = None,
    ) -> Tensor:
        """x: (b, n, dim). mask: bool, broadcastable to (b, h, n, keys), True = may attend.

        ``rotary``: (cos, sin) tables (n, dim_head) of x's positions, from :func:`rotary_tables`.
        ``causal`` asks for a plain causal mask (a faster kernel path) and may not be combined with ``mask``.
        With ``cache`` (a :class:`~dalle_pytorch.models.transformer.DecodingCache`), keys and values of x are
        appended to those of earlier positions and the queries of x attend to all of them.
        ``pattern`` (a :class:`~dalle_pytorch.kernels.sparse_attention.SparsePattern`, only for positions [0, n)
        without a cache) computes the same attention as ``mask`` with a kernel that skips what the mask
        hides; where that kernel cannot run (see ``SparsePattern.supports``), ``mask`` is used.
        """
        qkv = rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        if rotary is not None:
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
        if pattern is not None and cache is None and pattern.supports(q.device, dropout_p):
            out = pattern(q, k, v, scale=scale, dropout_p=dropout_p)
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
