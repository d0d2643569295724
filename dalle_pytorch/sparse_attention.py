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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from dalle_pytorch.attention import block_sparse_layout

SPARSE_TYPES = ("axial_row", "axial_col", "conv_like", "sparse")

# score elements (b * h * queries * keys) computed at once; bounds the temporary memory of one chunk of tiles
_SCORES_PER_CHUNK = 1 << 21


# ---------------------------------------------------------------------------------------------------------
# The shared kernel: tiles of queries over [prefix keys | a band of gathered key blocks]
# ---------------------------------------------------------------------------------------------------------


def _chunks(q: Tensor, prefix_len: int, band_len: int) -> list[slice]:
    b, h, t, c, _ = q.shape
    per_tile = max(1, b * h * c * (prefix_len + band_len))
    size = max(1, _SCORES_PER_CHUNK // per_tile)
    return [slice(i, min(i + size, t)) for i in range(0, t, size)]


def _band(blocks: Tensor, index: Tensor) -> Tensor:
    """blocks (b, h, nb, l, d), index (t, s) -> the band keys of each tile (b, h, t, s * l, d)."""
    gathered = blocks[:, :, index.clamp(min=0)]  # (b, h, t, s, l, d)
    return rearrange(gathered, "b h t s l d -> b h t (s l) d")


def _exp_scores(qs, k_prefix, k_band, masked_out, subtract):
    """exp(scores - subtract) for prefix keys (b, h, t*c, p) and band keys (b, h, t, c, w), computed in place."""
    s_prefix = rearrange(qs, "b h t c d -> b h (t c) d") @ k_prefix.transpose(-1, -2)
    s_band = (qs @ k_band.transpose(-1, -2)).masked_fill_(masked_out, float("-inf"))
    if subtract is None:  # forward: subtract the row maximum, and return it
        subtract = torch.maximum(s_prefix.amax(-1), rearrange(s_band.amax(-1), "b h t c -> b h (t c)"))
    s_prefix.sub_(subtract[..., None]).exp_()
    s_band.sub_(rearrange(subtract, "b h (t c) -> b h t c 1", c=qs.shape[3])).exp_()
    return s_prefix, s_band, subtract


def _dropout_masks(generator, p_prefix, p_band, dropout_p):
    keep = 1.0 - dropout_p
    masks = []
    for p in (p_prefix, p_band):
        masks.append(torch.empty_like(p).bernoulli_(keep, generator=generator).div_(keep))
    return masks


class _PrefixBandAttention(torch.autograd.Function):
    """softmax(q [k_prefix | k_band]^T * scale + band mask) [v_prefix | v_band] per tile, recomputed in backward.

    q (b, h, t, c, d); k_prefix, v_prefix (b, h, p, d); k_blocks, v_blocks (b, h, nb, l, d); block_index (t, s)
    long, the key blocks of each tile's band (-1: none); band_mask (t or 1, c, s * l) bool, True = may attend.
    Every query must see at least one key (p >= 1 guarantees it). Returns (b, h, t, c, d).
    """

    @staticmethod
    def forward(ctx, q, k_prefix, v_prefix, k_blocks, v_blocks, block_index, band_mask, scale, dropout_p, seed):
        masked_out = ~band_mask
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1])  # (b, h, t, c) log of each softmax normaliser
        generator = _generator(q.device, seed) if dropout_p > 0 else None
        for chunk in _chunks(q, k_prefix.shape[2], masked_out.shape[-1]):
            qs = q[:, :, chunk] * scale
            k_band, v_band = _band(k_blocks, block_index[chunk]), _band(v_blocks, block_index[chunk])
            mask_chunk = masked_out[chunk] if masked_out.shape[0] > 1 else masked_out
            e_prefix, e_band, row_max = _exp_scores(qs, k_prefix, k_band, mask_chunk, None)
            total = e_prefix.sum(-1) + rearrange(e_band.sum(-1), "b h t c -> b h (t c)")
            if generator is not None:
                drop_prefix, drop_band = _dropout_masks(generator, e_prefix, e_band, dropout_p)
                e_prefix, e_band = e_prefix * drop_prefix, e_band * drop_band
            o = e_prefix @ v_prefix + rearrange(e_band @ v_band, "b h t c d -> b h (t c) d")
            out[:, :, chunk] = rearrange(o / total[..., None], "b h (t c) d -> b h t c d", c=q.shape[3])
            lse[:, :, chunk] = rearrange(row_max + total.log(), "b h (t c) -> b h t c", c=q.shape[3])
        ctx.save_for_backward(q, k_prefix, v_prefix, k_blocks, v_blocks, block_index, masked_out, out, lse)
        ctx.scale, ctx.dropout_p, ctx.seed = scale, dropout_p, seed
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k_prefix, v_prefix, k_blocks, v_blocks, block_index, masked_out, out, lse = ctx.saved_tensors
        scale, dropout_p = ctx.scale, ctx.dropout_p
        grad_out = grad_out.contiguous()
        dq = torch.empty_like(q)
        dk_prefix, dv_prefix = torch.zeros_like(k_prefix), torch.zeros_like(v_prefix)
        dk_blocks, dv_blocks = torch.zeros_like(k_blocks), torch.zeros_like(v_blocks)
        # D = rowsum(P * dP) = rowsum(dO * O), also with dropout (FlashAttention, appendix B.2)
        delta = rearrange((grad_out * out).sum(-1), "b h t c -> b h (t c)")
        generator = _generator(q.device, ctx.seed) if dropout_p > 0 else None
        c = q.shape[3]
        for chunk in _chunks(q, k_prefix.shape[2], masked_out.shape[-1]):
            qs = q[:, :, chunk] * scale
            index = block_index[chunk]
            k_band, v_band = _band(k_blocks, index), _band(v_blocks, index)
            mask_chunk = masked_out[chunk] if masked_out.shape[0] > 1 else masked_out
            lse_chunk = rearrange(lse[:, :, chunk], "b h t c -> b h (t c)")
            p_prefix, p_band, _ = _exp_scores(qs, k_prefix, k_band, mask_chunk, lse_chunk)
            do = grad_out[:, :, chunk]  # (b, h, t, c, d)
            do_flat = rearrange(do, "b h t c d -> b h (t c) d")
            dp_prefix = do_flat @ v_prefix.transpose(-1, -2)  # (b, h, t*c, p)
            dp_band = do @ v_band.transpose(-1, -2)  # (b, h, t, c, w)
            if generator is not None:
                drop_prefix, drop_band = _dropout_masks(generator, p_prefix, p_band, dropout_p)
                dv_prefix += (p_prefix * drop_prefix).transpose(-1, -2) @ do_flat
                dv_band = (p_band * drop_band).transpose(-1, -2) @ do
                dp_prefix.mul_(drop_prefix)
                dp_band.mul_(drop_band)
            else:
                dv_prefix += p_prefix.transpose(-1, -2) @ do_flat
                dv_band = p_band.transpose(-1, -2) @ do
            # dS = P * (dP - D), in place over dP
            ds_prefix = dp_prefix.sub_(delta[:, :, _flat(chunk, c), None]).mul_(p_prefix)
            ds_band = dp_band.sub_(rearrange(delta[:, :, _flat(chunk, c)], "b h (t c) -> b h t c 1", c=c)).mul_(p_band)
            dq_chunk = ds_prefix @ k_prefix + rearrange(ds_band @ k_band, "b h t c d -> b h (t c) d")
            dq[:, :, chunk] = rearrange(dq_chunk * scale, "b h (t c) d -> b h t c d", c=c)
            dk_prefix += ds_prefix.transpose(-1, -2) @ rearrange(qs, "b h t c d -> b h (t c) d")
            dk_band = ds_band.transpose(-1, -2) @ qs  # (b, h, t, w, d)
            _scatter_band(dk_blocks, index, dk_band)
            _scatter_band(dv_blocks, index, dv_band)
        return dq, dk_prefix, dv_prefix, dk_blocks, dv_blocks, None, None, None, None, None


def _flat(chunk: slice, c: int) -> slice:
    """Tile slice -> slice of the flattened (tile, query) positions."""
    return slice(chunk.start * c, chunk.stop * c)


def _scatter_band(grad_blocks: Tensor, index: Tensor, grad_band: Tensor) -> None:
    """Add band gradients (b, h, t, s * l, d) back onto their key blocks (b, h, nb, l, d)."""
    length = grad_blocks.shape[3]
    grad_band = rearrange(grad_band, "b h t (s l) d -> b h (t s) l d", l=length)
    # entries with index -1 are fully masked, so their gradient is zero and block 0 may take it
    grad_blocks.index_add_(2, index.clamp(min=0).flatten(), grad_band)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _prefix_band_attention(q_tiles, k_prefix, v_prefix, k_blocks, v_blocks, block_index, band_mask, scale, dropout_p):
    seed = 0
    if dropout_p > 0:
        # drawn from the global generator, so seeding (and the reversible layers' RNG replay) governs dropout
        seed = int(torch.randint(0, 2**62, ()).item())
    return _PrefixBandAttention.apply(
        q_tiles, k_prefix, v_prefix, k_blocks, v_blocks, block_index, band_mask, scale, dropout_p, seed
    )


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


def _causal(q: Tensor, k: Tensor, v: Tensor, scale: float, dropout_p: float) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p)


def _pad_to(x: Tensor, length: int) -> Tensor:
    """(b, h, m, d) -> (b, h, length, d) with zeros after m; padded keys always fall after every real query."""
    return F.pad(x, (0, 0, 0, length - x.shape[2]))


def _run(q, k, v, prefix_len, scale, dropout_p, to_tiles, from_tiles, block_index, band_mask):
    """Causal attention for the prefix queries, prefix + band attention for the rest; returns (b, h, n, d)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n = q.shape[2]
    if n <= prefix_len:
        return _causal(q, k, v, scale, dropout_p)
    prefix = slice(0, prefix_len)
    out_prefix = _causal(q[:, :, prefix], k[:, :, prefix], v[:, :, prefix], scale, dropout_p)
    rest = slice(prefix_len, n)
    q_tiles, k_blocks, v_blocks = (to_tiles(x[:, :, rest]) for x in (q, k, v))
    out_tiles = _prefix_band_attention(
        q_tiles, k[:, :, prefix], v[:, :, prefix], k_blocks, v_blocks, block_index.to(q.device),
        band_mask.to(q.device), scale, dropout_p,
    )  # fmt: skip
    return torch.cat((out_prefix, from_tiles(out_tiles)[:, :, : n - prefix_len]), dim=2)


def axial_attention(
    q: Tensor, k: Tensor, v: Tensor, text_len: int, fmap: int, *, axis: str = "row",
    scale: float | None = None, dropout_p: float = 0.0,
) -> Tensor:  # fmt: skip
    """``axial_row`` (axis="row") or ``axial_col`` (axis="col") attention; q, k, v, output (b, h, n, d).

    n <= text_len + fmap ** 2 (a prefix of the sequence is fine). Image queries of one row (column) form a
    tile whose band is that row (column); a causal mask inside it keeps only earlier-or-same tokens.
    """
    if axis not in ("row", "col"):
        raise ValueError(f"axis must be 'row' or 'col', got {axis!r}")
    n = _check(q, k, v, text_len, fmap)
    rows = max(0, -(-(n - text_len) // fmap))  # image rows holding at least one query
    pattern = "b h (r c) d -> b h r c d" if axis == "row" else "b h (r c) d -> b h c r d"

    def to_tiles(x):  # (b, h, m, d) -> (b, h, tiles, tile length, d)
        return rearrange(_pad_to(x, rows * fmap), pattern, c=fmap).contiguous()

    def from_tiles(x):
        return rearrange(x, "b h r c d -> b h (r c) d" if axis == "row" else "b h c r d -> b h (r c) d")

    tiles, length = (rows, fmap) if axis == "row" else (fmap, rows)
    block_index = torch.arange(tiles)[:, None]  # each tile's band is its own row / column
    band_mask = torch.ones(length, length, dtype=torch.bool).tril()[None]
    return _run(q, k, v, text_len, scale, dropout_p, to_tiles, from_tiles, block_index, band_mask)


def conv_like_attention(
    q: Tensor, k: Tensor, v: Tensor, text_len: int, fmap: int, *, kernel_size: int = 5, dilation: int = 1,
    scale: float | None = None, dropout_p: float = 0.0,
) -> Tensor:  # fmt: skip
    """``conv_like`` attention; q, k, v, output (b, h, n, d), n <= text_len + fmap ** 2.

    A tile is one image row; its band is the ``kernel_size // 2 + 1`` rows of the causal window (spacing
    ``dilation``), and the band mask keeps the window's columns and, in the own row, the tokens to the left.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    n = _check(q, k, v, text_len, fmap)
    rows = max(0, -(-(n - text_len) // fmap))
    half = kernel_size // 2
    # band slot j of row r holds image row r - (half - j) * dilation; the last slot is the row itself
    offsets = (half - torch.arange(half + 1)) * dilation  # (s,)
    block_index = torch.arange(rows)[:, None] - offsets[None, :]  # (rows, s)
    block_index = block_index.masked_fill(block_index < 0, -1)
    col = torch.arange(fmap)
    dc = col[:, None] - col[None, :]  # query column - key column, (c, c)
    in_window = (dc.abs() <= half * dilation) & (dc % dilation == 0)
    own_row = (offsets == 0)[:, None, None]  # (s, 1, 1)
    slot_mask = in_window[None] & (~own_row | (dc >= 0)[None])  # (s, c, c)
    band_mask = slot_mask[None] & (block_index >= 0)[:, :, None, None]  # (rows, s, c, c)
    band_mask = rearrange(band_mask, "t s i j -> t i (s j)")

    def to_tiles(x):
        return rearrange(_pad_to(x, rows * fmap), "b h (r c) d -> b h r c d", c=fmap)

    def from_tiles(x):
        return rearrange(x, "b h r c d -> b h (r c) d")

    return _run(q, k, v, text_len, scale, dropout_p, to_tiles, from_tiles, block_index, band_mask)


def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, text_len: int, fmap: int, *, block_size: int = 16,
    num_local_blocks: int = 4, num_random_blocks: int = 2, seed: int = 0,
    scale: float | None = None, dropout_p: float = 0.0,
) -> Tensor:  # fmt: skip
    """``sparse`` attention (blocks of ``block_size`` positions); q, k, v, output (b, h, n, d).

    The blocks holding text are the prefix every later block sees; a tile is one later block, and its band
    gathers its local and random blocks (padded with masked slots to the same count for every tile).
    """
    n = _check(q, k, v, text_len, fmap)
    layout = block_sparse_layout(
        text_len + fmap * fmap, text_len, block_size, num_local_blocks, num_random_blocks, seed
    )
    text_blocks = -(-text_len // block_size)
    prefix_len = text_blocks * block_size
    tiles = max(0, -(-(n - prefix_len) // block_size))
    # key blocks after the text blocks, per tile; those left of the diagonal are always earlier positions
    seen = layout[text_blocks : text_blocks + tiles, text_blocks : text_blocks + tiles]  # (t, t)
    candidates = torch.where(seen, torch.arange(tiles), -1)
    width = max(1, int(seen.sum(1).max())) if tiles else 1
    block_index = candidates.sort(dim=1, descending=True).values[:, :width]  # (t, s), -1 = empty slot
    diagonal = (block_index == torch.arange(tiles)[:, None])[:, :, None, None]
    causal = torch.ones(block_size, block_size, dtype=torch.bool).tril()
    band_mask = torch.where(diagonal, causal, (block_index >= 0)[:, :, None, None])  # (t, s, c, c)
    band_mask = rearrange(band_mask, "t s i j -> t i (s j)")

    def to_tiles(x):
        return rearrange(_pad_to(x, tiles * block_size), "b h (t c) d -> b h t c d", c=block_size)

    def from_tiles(x):
        return rearrange(x, "b h t c d -> b h (t c) d")

    return _run(q, k, v, prefix_len, scale, dropout_p, to_tiles, from_tiles, block_index, band_mask)


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
