"""Fast training kernels for DALLE's sparse attention patterns: axial rows / columns, conv-like, block-sparse.

Each function here computes exactly what ``F.scaled_dot_product_attention`` computes with the dense mask of
:func:`dalle_pytorch.attention.attention_mask`, for the queries ``[0, n)`` of a full-sequence forward pass (no
cache), but only touches the key blocks the pattern allows. They all share one structure:

- a *prefix* of keys every later query sees (the text for the grid patterns, the blocks holding text for
  ``sparse``): its own queries run plain causal attention over it;
- the remaining queries are cut into *tiles* (an image row, an image column, a block of positions); every query
  of a tile sees the whole prefix plus a *band* of a few key blocks gathered for its tile (its row, its column,
  the window rows above it, the local and random blocks), restricted by a small (tile x band) mask.

One softmax spans prefix and band. :class:`_PrefixBandAttention` computes it tile chunk by tile chunk and
recomputes the probabilities in the backward pass, like FlashAttention (Dao et al. 2022,
https://arxiv.org/abs/2205.14135), so it stores O(n d) per layer instead of the (n x keys) probabilities.

Patterns: axial and conv-like attention as in the DALL-E paper (Ramesh et al. 2021,
https://arxiv.org/abs/2102.12092, appendix B.1) and block-sparse attention after the Sparse Transformer (Child
et al. 2019, https://arxiv.org/abs/1904.10509) and BigBird (Zaheer et al. 2020, https://arxiv.org/abs/2007.14062).

Shape letters: b batch, h heads, n positions, d head dim, p prefix keys, t tiles, c queries per tile,
s key blocks per band, w = s * (block length) band keys.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from dalle_pytorch.attention import block_sparse_layout

SPARSE_TYPES = ("axial_row", "axial_col", "conv_like", "sparse")

# score elements (b * h * queries * keys) computed at once; bounds the temporary memory of one chunk of tiles
_SCORES_PER_CHUNK = 1 << 21


# ---------------------------------------------------------------------------------------------------------
# The shared kernel: causal attention over the prefix, then tiles of queries over [prefix | band] keys
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TilePlan:
    """Which keys each query sees, in the prefix + tiles form every pattern here takes.

    Queries [0, prefix_len) attend causally to keys [0, prefix_len). Every later position is the query of
    exactly one tile: tile i holds the queries ``query_index[i]`` (t, c) (value n or more: an empty slot) and
    sees every prefix key plus the band keys ``key_index[i]`` (t, w) (-1: an empty slot) where
    ``band_mask[i]`` (t or 1, c, w) is True.
    """

    prefix_len: int
    query_index: Tensor
    key_index: Tensor
    band_mask: Tensor

    def to(self, device: torch.device) -> TilePlan:
        return TilePlan(self.prefix_len, *(x.to(device) for x in (self.query_index, self.key_index, self.band_mask)))


def _chunks(plan: TilePlan, batch_heads: int) -> list[slice]:
    tiles, c = plan.query_index.shape
    per_tile = max(1, batch_heads * c * (plan.prefix_len + plan.key_index.shape[1]))
    size = max(1, _SCORES_PER_CHUNK // per_tile)
    return [slice(i, min(i + size, tiles)) for i in range(0, tiles, size)]


def _exp_scores(qs, k_prefix, k_band, masked_out, subtract):
    """exp(scores - subtract) against prefix keys (b, h, t*c, p) and band keys (b, h, t, c, w), in place.

    ``subtract`` (b, h, t*c) is the log-normaliser in the backward pass; None in the forward pass, which
    subtracts the row maximum instead and returns it.
    """
    s_prefix = rearrange(qs, "b h t c d -> b h (t c) d") @ k_prefix.transpose(-1, -2)
    s_band = (qs @ k_band.transpose(-1, -2)).masked_fill_(masked_out, float("-inf"))
    if subtract is None:
        subtract = torch.maximum(s_prefix.amax(-1), rearrange(s_band.amax(-1), "b h t c -> b h (t c)"))
    s_prefix.sub_(subtract[..., None]).exp_()
    s_band.sub_(rearrange(subtract, "b h (t c) -> b h t c 1", c=qs.shape[3])).exp_()
    return s_prefix, s_band, subtract


def _keep_masks(generator: torch.Generator | None, shapes_like: tuple[Tensor, ...], dropout_p: float) -> list:
    """Dropout keep masks scaled by 1 / (1 - p), drawn in a fixed order so the backward pass redraws them."""
    if generator is None:
        return [None] * len(shapes_like)
    keep = 1.0 - dropout_p
    return [torch.empty_like(x).bernoulli_(keep, generator=generator).div_(keep) for x in shapes_like]


def _times(x: Tensor, mask: Tensor | None) -> Tensor:
    return x if mask is None else x * mask


class _TiledAttention(torch.autograd.Function):
    """softmax(q k^T * scale restricted to a :class:`TilePlan`) v for q, k, v (b, h, n, d), recomputed in backward.

    Forward keeps only the output and the log-normaliser of every query; backward recomputes each chunk's
    probabilities from them (FlashAttention, arXiv 2205.14135, algorithm 2, in PyTorch ops).
    """

    @staticmethod
    def forward(ctx, q, k, v, plan: TilePlan, scale: float, dropout_p: float, seed: int):
        b, h, n, d = q.shape
        p_len = plan.prefix_len
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = q.new_empty(b, h, n)  # log of each query's softmax normaliser
        generator = _generator(q.device, seed) if dropout_p > 0 else None
        k_prefix, v_prefix = k[:, :, :p_len], v[:, :, :p_len]
        causal_out = ~torch.ones(p_len, p_len, dtype=torch.bool, device=q.device).tril()

        e, row_max = _prefix_exp_scores(q[:, :, :p_len] * scale, k_prefix, causal_out, None)
        total = e.sum(-1)
        (keep,) = _keep_masks(generator, (e,), dropout_p)
        out[:, :, :p_len] = (_times(e, keep) @ v_prefix) / total[..., None]
        lse[:, :, :p_len] = row_max + total.log()

        masked_out = ~plan.band_mask
        for chunk in _chunks(plan, b * h):
            qi, ki = plan.query_index[chunk], plan.key_index[chunk].clamp(0, n - 1)
            valid = (qi < n).flatten()
            qs = q[:, :, qi.clamp(max=n - 1)] * scale  # (b, h, t, c, d)
            k_band, v_band = k[:, :, ki], v[:, :, ki]  # (b, h, t, w, d)
            mask = masked_out[chunk] if masked_out.shape[0] > 1 else masked_out
            e_prefix, e_band, row_max = _exp_scores(qs, k_prefix, k_band, mask, None)
            total = e_prefix.sum(-1) + rearrange(e_band.sum(-1), "b h t c -> b h (t c)")
            keep_prefix, keep_band = _keep_masks(generator, (e_prefix, e_band), dropout_p)
            o = _times(e_prefix, keep_prefix) @ v_prefix
            o += rearrange(_times(e_band, keep_band) @ v_band, "b h t c d -> b h (t c) d")
            positions = qi.flatten()[valid]
            out.index_copy_(2, positions, (o / total[..., None])[:, :, valid])
            lse.index_copy_(2, positions, (row_max + total.log())[:, :, valid])
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.dropout_p, ctx.seed = plan, scale, dropout_p, seed
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale, dropout_p = ctx.plan, ctx.scale, ctx.dropout_p
        b, h, n, d = q.shape
        p_len = plan.prefix_len
        grad_out = grad_out.contiguous()
        dq = torch.empty_like(out)
        dk, dv = torch.zeros_like(out), torch.zeros_like(out)
        # D = rowsum(P * dP) = rowsum(dO * O), with dropout too (FlashAttention, appendix B.2)
        delta = (grad_out * out).sum(-1)  # (b, h, n)
        generator = _generator(q.device, ctx.seed) if dropout_p > 0 else None
        k_prefix, v_prefix = k[:, :, :p_len], v[:, :, :p_len]
        dk_prefix, dv_prefix = dk[:, :, :p_len], dv[:, :, :p_len]  # views: accumulate in place
        causal_out = ~torch.ones(p_len, p_len, dtype=torch.bool, device=q.device).tril()

        qs = q[:, :, :p_len] * scale
        p, _ = _prefix_exp_scores(qs, k_prefix, causal_out, lse[:, :, :p_len])
        (keep,) = _keep_masks(generator, (p,), dropout_p)
        do = grad_out[:, :, :p_len]
        dv_prefix += _times(p, keep).transpose(-1, -2) @ do
        ds = _times(do @ v_prefix.transpose(-1, -2), keep).sub_(delta[:, :, :p_len, None]).mul_(p)
        dq[:, :, :p_len] = (ds @ k_prefix) * scale
        dk_prefix += ds.transpose(-1, -2) @ qs

        masked_out = ~plan.band_mask
        c = plan.query_index.shape[1]
        for chunk in _chunks(plan, b * h):
            qi, ki = plan.query_index[chunk], plan.key_index[chunk].clamp(0, n - 1)
            valid = (qi < n).flatten()
            gather = qi.clamp(max=n - 1)
            qs = q[:, :, gather] * scale  # (b, h, t, c, d)
            k_band, v_band = k[:, :, ki], v[:, :, ki]  # (b, h, t, w, d)
            mask = masked_out[chunk] if masked_out.shape[0] > 1 else masked_out
            lse_chunk = rearrange(lse[:, :, gather], "b h t c -> b h (t c)")
            p_prefix, p_band, _ = _exp_scores(qs, k_prefix, k_band, mask, lse_chunk)
            keep_prefix, keep_band = _keep_masks(generator, (p_prefix, p_band), dropout_p)
            # empty query slots (gathered from a real position) must pass no gradient: zero their dO and D
            is_query = valid.to(grad_out.dtype)
            do = grad_out[:, :, gather] * rearrange(is_query, "(t c) -> t c 1", c=c)
            do_flat = rearrange(do, "b h t c d -> b h (t c) d")
            dv_prefix += _times(p_prefix, keep_prefix).transpose(-1, -2) @ do_flat
            dv_band = _times(p_band, keep_band).transpose(-1, -2) @ do  # (b, h, t, w, d)
            delta_chunk = rearrange(delta[:, :, gather], "b h t c -> b h (t c)") * is_query
            # dS = P * (dP - D), in place over dP
            ds_prefix = _times(do_flat @ v_prefix.transpose(-1, -2), keep_prefix)
            ds_prefix.sub_(delta_chunk[..., None]).mul_(p_prefix)
            ds_band = _times(do @ v_band.transpose(-1, -2), keep_band)
            ds_band.sub_(rearrange(delta_chunk, "b h (t c) -> b h t c 1", c=c)).mul_(p_band)
            dq_chunk = ds_prefix @ k_prefix + rearrange(ds_band @ k_band, "b h t c d -> b h (t c) d")
            dq.index_copy_(2, qi.flatten()[valid], (dq_chunk * scale)[:, :, valid])
            dk_prefix += ds_prefix.transpose(-1, -2) @ rearrange(qs, "b h t c d -> b h (t c) d")
            band_positions = ki.flatten()
            dk.index_add_(2, band_positions, rearrange(ds_band.transpose(-1, -2) @ qs, "b h t w d -> b h (t w) d"))
            dv.index_add_(2, band_positions, rearrange(dv_band, "b h t w d -> b h (t w) d"))
        return dq, dk, dv, None, None, None, None


def _prefix_exp_scores(qs, k_prefix, masked_out, subtract):
    """Like :func:`_exp_scores` for the prefix queries (b, h, p, d) over the prefix keys, causally."""
    s = (qs @ k_prefix.transpose(-1, -2)).masked_fill_(masked_out, float("-inf"))
    if subtract is None:
        subtract = s.amax(-1)
    return s.sub_(subtract[..., None]).exp_(), subtract


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def tiled_attention(
    q: Tensor, k: Tensor, v: Tensor, plan: TilePlan, *, scale: float | None = None, dropout_p: float = 0.0
) -> Tensor:
    """Attention of q, k, v (b, h, n, d) restricted to ``plan``; returns (b, h, n, d)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    seed = 0
    if dropout_p > 0:
        # drawn from the global generator, so seeding (and the reversible layers' RNG replay) governs dropout
        seed = int(torch.randint(0, 2**62, ()).item())
    return _TiledAttention.apply(q, k, v, plan.to(q.device), scale, dropout_p, seed)


# ---------------------------------------------------------------------------------------------------------
# The patterns: how each one cuts queries into tiles and which key blocks form a tile's band
# ---------------------------------------------------------------------------------------------------------


def _check(q: Tensor, k: Tensor, v: Tensor, text_len: int, fmap: int) -> int:
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k and v must have the same shape (batch, heads, n, dim_head), got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if text_len < 1 or fmap < 1:
        raise ValueError(f"text_len and fmap must be >= 1, got {text_len} and {fmap}")
    n = q.shape[2]
    if n > text_len + fmap * fmap:
        raise ValueError(f"the sequence has {n} positions, more than text_len + fmap ** 2 = {text_len + fmap * fmap}")
    return n


def _grid_plan(prefix_len: int, n: int, tile_positions: Tensor, key_index: Tensor, band_mask: Tensor) -> TilePlan:
    """Plan for tiles of positions counted from ``prefix_len``; key slots before the grid (-1) stay empty."""
    query_index = tile_positions + prefix_len
    key_index = torch.where(key_index >= 0, key_index + prefix_len, -1)
    return TilePlan(min(prefix_len, n), query_index, key_index, band_mask)


@functools.lru_cache(maxsize=64)
def axial_plan(text_len: int, fmap: int, n: int, axis: str, device: torch.device | None = None) -> TilePlan:
    """Tiles of ``axial_row`` (axis="row": one per image row) or ``axial_col`` (one per column), band = the tile.

    Band keys after a query in its row (column) are causally masked, so keys past n never count.
    """
    if axis not in ("row", "col"):
        raise ValueError(f"axis must be 'row' or 'col', got {axis!r}")
    rows = max(0, -(-(n - text_len) // fmap))  # image rows holding at least one query
    grid = torch.arange(rows * fmap).view(rows, fmap)  # grid position of (row, column)
    tiles = grid if axis == "row" or rows == 0 else grid.t()
    band_mask = torch.ones(tiles.shape[1], tiles.shape[1], dtype=torch.bool).tril()[None]
    return _grid_plan(text_len, n, tiles, tiles, band_mask).to(device)


@functools.lru_cache(maxsize=64)
def conv_like_plan(
    text_len: int, fmap: int, n: int, kernel_size: int = 5, dilation: int = 1, device: torch.device | None = None
) -> TilePlan:
    """Tiles of ``conv_like``: one per image row; the band is the ``kernel_size // 2 + 1`` window rows.

    Band slot j of row r holds image row r - (kernel_size // 2 - j) * dilation (the last slot the row
    itself); the band mask keeps the window's columns, and in the own row only the tokens to the left.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    rows = max(0, -(-(n - text_len) // fmap))
    half = kernel_size // 2
    offsets = (half - torch.arange(half + 1)) * dilation  # (s,) rows above the query's row
    key_rows = torch.arange(rows)[:, None] - offsets[None, :]  # (t, s)
    col = torch.arange(fmap)
    key_index = torch.where(key_rows[..., None] >= 0, key_rows[..., None] * fmap + col, -1)  # (t, s, c)
    dc = col[:, None] - col[None, :]  # query column - key column, (c, c)
    in_window = (dc.abs() <= half * dilation) & (dc % dilation == 0)
    own_row = (offsets == 0)[:, None, None]  # (s, 1, 1)
    slot_mask = in_window[None] & (~own_row | (dc >= 0)[None])  # (s, c, c)
    band_mask = slot_mask[None] & (key_rows >= 0)[:, :, None, None]  # (t, s, c, c)
    tiles = torch.arange(rows * fmap).view(rows, fmap)
    return _grid_plan(
        text_len, n, tiles, rearrange(key_index, "t s c -> t (s c)"), rearrange(band_mask, "t s i j -> t i (s j)")
    ).to(device)


@functools.lru_cache(maxsize=64)
def block_sparse_plan(
    text_len: int, fmap: int, n: int, block_size: int = 16, num_local_blocks: int = 4, num_random_blocks: int = 2,
    seed: int = 0, device: torch.device | None = None,
) -> TilePlan:  # fmt: skip
    """Tiles of ``sparse``: the blocks holding text are the prefix; every later block is a tile whose band
    gathers its local and random blocks, padded with empty slots to the same count for every tile.
    """
    layout = block_sparse_layout(text_len + fmap * fmap, text_len, block_size, num_local_blocks, num_random_blocks, seed)
    text_blocks = -(-text_len // block_size)
    prefix_len = text_blocks * block_size
    tiles = max(0, -(-(n - prefix_len) // block_size))
    seen = layout[text_blocks : text_blocks + tiles, text_blocks : text_blocks + tiles]  # (t, t) key blocks
    width = max(1, int(seen.sum(1).max())) if tiles else 1
    # the seen blocks of each tile, latest first (its own block leads), then empty slots (-1)
    block_index = torch.where(seen, torch.arange(tiles), -1).sort(dim=1, descending=True).values[:, :width]
    diagonal = (block_index == torch.arange(tiles)[:, None])[:, :, None, None]
    causal = torch.ones(block_size, block_size, dtype=torch.bool).tril()
    band_mask = torch.where(diagonal, causal, (block_index >= 0)[:, :, None, None])  # (t, s, c, c)
    offsets = torch.arange(block_size)
    key_index = torch.where(block_index[..., None] >= 0, block_index[..., None] * block_size + offsets, -1)
    query_index = torch.arange(tiles * block_size).view(tiles, block_size)
    return _grid_plan(
        prefix_len, n, query_index, rearrange(key_index, "t s l -> t (s l)"),
        rearrange(band_mask, "t s i j -> t i (s j)"),
    ).to(device)  # fmt: skip


def axial_attention(
    q: Tensor, k: Tensor, v: Tensor, text_len: int, fmap: int, *, axis: str = "row",
    scale: float | None = None, dropout_p: float = 0.0,
) -> Tensor:  # fmt: skip
    """``axial_row`` (axis="row") or ``axial_col`` (axis="col") attention; q, k, v, output (b, h, n, d).

    n <= text_len + fmap ** 2: the sequence may stop anywhere (DALLE trains on all but the last image token).
    """
    n = _check(q, k, v, text_len, fmap)
    plan = axial_plan(text_len, fmap, n, axis, q.device)
    return tiled_attention(q, k, v, plan, scale=scale, dropout_p=dropout_p)


def conv_like_attention(
    q: Tensor, k: Tensor, v: Tensor, text_len: int, fmap: int, *, kernel_size: int = 5, dilation: int = 1,
    scale: float | None = None, dropout_p: float = 0.0,
) -> Tensor:  # fmt: skip
    """``conv_like`` attention; q, k, v, output (b, h, n, d), n <= text_len + fmap ** 2."""
    n = _check(q, k, v, text_len, fmap)
    plan = conv_like_plan(text_len, fmap, n, kernel_size, dilation, q.device)
    return tiled_attention(q, k, v, plan, scale=scale, dropout_p=dropout_p)


def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, text_len: int, fmap: int, *, block_size: int = 16,
    num_local_blocks: int = 4, num_random_blocks: int = 2, seed: int = 0,
    scale: float | None = None, dropout_p: float = 0.0,
) -> Tensor:  # fmt: skip
    """``sparse`` attention (blocks of ``block_size`` positions); q, k, v, output (b, h, n, d)."""
    n = _check(q, k, v, text_len, fmap)
    plan = block_sparse_plan(text_len, fmap, n, block_size, num_local_blocks, num_random_blocks, seed, q.device)
    return tiled_attention(q, k, v, plan, scale=scale, dropout_p=dropout_p)


def pattern_attention(
    attn_type: str, q: Tensor, k: Tensor, v: Tensor, text_len: int, fmap: int, *,
    scale: float | None = None, dropout_p: float = 0.0, kernel_size: int = 5, dilation: int = 1,
    sparse_block_size: int = 16, sparse_num_local_blocks: int = 4, sparse_num_random_blocks: int = 2,
    sparse_seed: int = 0,
) -> Tensor:  # fmt: skip
    """The fast kernel of ``attn_type`` (options named as in ``attention_mask``); q, k, v, output (b, h, n, d).

    Equals ``F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(...)[:n, :n])``.
    """
    if attn_type == "axial_row":
        return axial_attention(q, k, v, text_len, fmap, axis="row", scale=scale, dropout_p=dropout_p)
    if attn_type == "axial_col":
        return axial_attention(q, k, v, text_len, fmap, axis="col", scale=scale, dropout_p=dropout_p)
    if attn_type == "conv_like":
        return conv_like_attention(
            q, k, v, text_len, fmap, kernel_size=kernel_size, dilation=dilation, scale=scale, dropout_p=dropout_p
        )
    if attn_type == "sparse":
        return block_sparse_attention(
            q, k, v, text_len, fmap, block_size=sparse_block_size, num_local_blocks=sparse_num_local_blocks,
            num_random_blocks=sparse_num_random_blocks, seed=sparse_seed, scale=scale, dropout_p=dropout_p,
        )  # fmt: skip
    raise ValueError(f"attn_type must be one of {SPARSE_TYPES} for a fast kernel, got {attn_type!r}")


@dataclass
class SparsePattern:
    """A sparse attention type on a given grid; calling it runs :func:`pattern_attention` on (b, h, n, d)."""

    attn_type: str
    text_len: int
    fmap: int
    options: dict

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, dropout_p: float = 0.0) -> Tensor:
        return pattern_attention(
            self.attn_type, q, k, v, self.text_len, self.fmap, scale=scale, dropout_p=dropout_p, **self.options
        )
