"""Fast training kernels for DALLE's sparse attention patterns: axial rows / columns, conv-like, block-sparse.

Each function here returns exactly what ``F.scaled_dot_product_attention`` returns with the dense mask of
:func:`dalle_pytorch.attention.attention_mask` (outputs and gradients), for the positions ``[0, n)`` of a
full-sequence pass (training; no cache), while only computing the scores the pattern allows. All patterns
share one structure, a :class:`TilePlan`:

- a *prefix* of keys that every later query sees: the text for the grid patterns, the blocks holding text
  for ``sparse``. Every query attends to it causally, in one call of PyTorch's fused CPU FlashAttention kernel.
- the positions after the prefix, cut into equal *tiles* (image rows, image columns, blocks of positions).
  Each tile's queries also see a *band*: a few tiles' worth of keys (its own row, the window rows above it,
  the local and random blocks), restricted by a small (tile x band) mask. Bands are dense batched matmuls.

The two partial softmaxes are merged through their log-sum-exps, and the backward pass recomputes the
probabilities from the merged log-sum-exp, as FlashAttention does (Dao et al. 2022,
https://arxiv.org/abs/2205.14135, algorithm 2): the fused kernel's backward, given the merged output and
log-sum-exp, yields exactly the prefix keys' share of the gradient. A layer stores O(n d), never scores.

The fused kernel is ``aten::_scaled_dot_product_flash_attention_for_cpu`` (the kernel behind
``F.scaled_dot_product_attention`` on CPU); it has no dropout, so :func:`fast_path_available` is False for
other devices and for attention dropout, and callers keep the dense-mask path there.

Patterns: axial and conv-like attention as in the DALL-E paper (Ramesh et al. 2021,
https://arxiv.org/abs/2102.12092, appendix B.1); block-sparse attention after the Sparse Transformer (Child
et al. 2019, https://arxiv.org/abs/1904.10509) and BigBird (Zaheer et al. 2020, https://arxiv.org/abs/2007.14062).

Shape letters: b batch, h heads, n positions, d head dim, p prefix length, t tiles, c positions per tile,
s band slots (one tile of keys each), w = s * c band keys; "(b h)" is written B in comments.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.autograd.function import once_differentiable

from dalle_pytorch.attention import block_sparse_layout

SPARSE_TYPES = ("axial_row", "axial_col", "conv_like", "sparse")

_EXP_FLOOR = -80.0  # see _band_exp_scores
# band score elements computed at once; bounds the temporary memory of one chunk of tiles (32 MB in fp32)
_BAND_SCORES_PER_CHUNK = 1 << 23


def fast_path_available(device: torch.device, dropout_p: float = 0.0) -> bool:
    """Whether the kernels here can run: on CPU, without attention dropout (the fused kernel has none)."""
    return (
        device.type == "cpu"
        and dropout_p == 0.0
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


# ---------------------------------------------------------------------------------------------------------
# The plan of a pattern: prefix, tiles and the slots of each tile's band
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TilePlan:
    """Which keys each query sees, in the prefix + tiles form.

    Positions ``[prefix_len, prefix_len + num_tiles * tile_len)`` (those past n are empty) form ``num_tiles``
    tiles of ``tile_len`` positions: consecutive runs, or with ``column_major`` the columns of a grid of
    ``tile_len`` rows by ``num_tiles`` columns. Queries and keys are tiled alike. Band slot j of tile i holds
    key tile ``i - shifts[j]`` when ``shifts[j]`` is an int, else key tile ``slot_index[i, j]``; -1 (or a
    negative shift's result) is an empty slot. ``band_mask`` (t or 1, c, s * c) bool says which band keys
    each query of a tile may see; every query must see at least itself.
    """

    prefix_len: int
    num_tiles: int
    tile_len: int
    column_major: bool
    shifts: tuple  # one int (key tile = tile - shift) or None (key tile from slot_index) per slot
    slot_index: Tensor  # (t, s) long
    band_mask: Tensor  # (t or 1, c, s * c) bool

    def to(self, device: torch.device) -> TilePlan:
        fields = dict(self.__dict__, slot_index=self.slot_index.to(device), band_mask=self.band_mask.to(device))
        return TilePlan(**fields)


def _shift_slots(num_tiles: int, shifts: Tensor) -> Tensor:
    """(t, s) key tile of each shift slot, -1 where it would fall before the first tile."""
    index = torch.arange(num_tiles)[:, None] - shifts[None, :]
    return index.masked_fill(index < 0, -1)


@functools.lru_cache(maxsize=64)
def axial_plan(text_len: int, fmap: int, n: int, axis: str) -> TilePlan:
    """``axial_row`` (axis="row": a tile per image row) or ``axial_col`` (a tile per column); band = the tile.

    Band keys after a query in its row (column) are causally masked, so keys past n never count.
    """
    if axis not in ("row", "col"):
        raise ValueError(f"axis must be 'row' or 'col', got {axis!r}")
    rows = max(0, -(-(n - text_len) // fmap))  # image rows holding at least one position
    num_tiles, tile_len = (rows, fmap) if axis == "row" else (fmap if rows else 0, rows)
    causal = torch.ones(tile_len, tile_len, dtype=torch.bool).tril()[None]
    shifts = torch.zeros(1, dtype=torch.long)
    return TilePlan(text_len, num_tiles, tile_len, axis == "col", (0,), _shift_slots(num_tiles, shifts), causal)


@functools.lru_cache(maxsize=64)
def conv_like_plan(text_len: int, fmap: int, n: int, kernel_size: int = 5, dilation: int = 1) -> TilePlan:
    """``conv_like``: a tile per image row; its band holds the ``kernel_size // 2 + 1`` rows of the window.

    Slot j holds the row ``(kernel_size // 2 - j) * dilation`` above (the last slot the row itself); the band
    mask keeps the window's columns, and in the own row only the tokens up to the query.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    rows = max(0, -(-(n - text_len) // fmap))
    half = kernel_size // 2
    shifts = (half - torch.arange(half + 1)) * dilation  # (s,)
    slot_index = _shift_slots(rows, shifts)
    col = torch.arange(fmap)
    dc = col[:, None] - col[None, :]  # query column - key column, (c, c)
    in_window = (dc.abs() <= half * dilation) & (dc % dilation == 0)
    own_row = (shifts == 0)[:, None, None]  # (s, 1, 1)
    slot_mask = in_window[None] & (~own_row | (dc >= 0)[None])  # (s, c, c)
    band_mask = slot_mask[None] & (slot_index >= 0)[:, :, None, None]  # (t, s, c, c)
    band_mask = rearrange(band_mask, "t s i j -> t i (s j)")
    return TilePlan(text_len, rows, fmap, False, tuple(shifts.tolist()), slot_index, band_mask)


@functools.lru_cache(maxsize=64)
def block_sparse_plan(
    text_len: int, fmap: int, n: int, block_size: int = 16, num_local_blocks: int = 4, num_random_blocks: int = 2,
    seed: int = 0,
) -> TilePlan:  # fmt: skip
    """``sparse``: the blocks holding text are the prefix, every later block is a tile.

    A tile's band: ``num_local_blocks`` shift slots (its own block and those before it), then slots for its
    random blocks that are neither local nor text, padded with empty slots to the same count for all tiles.
    """
    layout = block_sparse_layout(
        text_len + fmap * fmap, text_len, block_size, num_local_blocks, num_random_blocks, seed
    )
    text_blocks = -(-text_len // block_size)
    prefix_len = text_blocks * block_size
    num_tiles = max(0, -(-(n - prefix_len) // block_size))
    local = _shift_slots(num_tiles, torch.arange(num_local_blocks))  # (t, local)
    seen = layout[text_blocks : text_blocks + num_tiles, text_blocks : text_blocks + num_tiles].clone()  # (t, t)
    distance = torch.arange(num_tiles)[:, None] - torch.arange(num_tiles)[None, :]
    seen &= distance >= num_local_blocks  # the random blocks left to gather
    width = int(seen.sum(1).max()) if num_tiles else 0
    random = torch.where(seen, torch.arange(num_tiles), -1).sort(dim=1, descending=True).values[:, :width]
    slot_index = torch.cat((local, random), dim=1)  # (t, s)
    causal = torch.ones(block_size, block_size, dtype=torch.bool).tril()
    own = torch.arange(slot_index.shape[1]) == 0  # slot 0 = shift 0 = the tile itself
    band_mask = torch.where(own[None, :, None, None], causal, (slot_index >= 0)[:, :, None, None])  # (t, s, c, c)
    band_mask = rearrange(band_mask, "t s i j -> t i (s j)")
    shifts = tuple(range(num_local_blocks)) + (None,) * width
    return TilePlan(prefix_len, num_tiles, block_size, False, shifts, slot_index, band_mask)


# ---------------------------------------------------------------------------------------------------------
# The kernel: fused causal attention over the prefix + batched band attention, merged by log-sum-exp
# ---------------------------------------------------------------------------------------------------------


def _to_tiles(x: Tensor, plan: TilePlan) -> Tensor:
    """(b, h, n, ...) -> (t, B, c, ...) positions after the prefix, zero-padded to whole tiles."""
    region = x[:, :, plan.prefix_len :]
    missing = plan.num_tiles * plan.tile_len - region.shape[2]
    region = F.pad(region, (0, 0) * (x.ndim - 3) + (0, missing))
    pattern = "b h (c t) ... -> t (b h) c ..." if plan.column_major else "b h (t c) ... -> t (b h) c ..."
    return rearrange(region, pattern, t=plan.num_tiles).contiguous()


def _from_tiles(x: Tensor, plan: TilePlan, batch: int, length: int) -> Tensor:
    """(t, B, c, ...) -> (b, h, length, ...), the inverse of :func:`_to_tiles` for ``length`` positions."""
    pattern = "t (b h) c ... -> b h (c t) ..." if plan.column_major else "t (b h) c ... -> b h (t c) ..."
    return rearrange(x, pattern, b=batch)[:, :, :length]


def _front_padded(tiles: Tensor, pad: int) -> Tensor:
    """Key tiles (t, B, c, d) with ``pad`` empty tiles in front, so that shifted slots are plain slices."""
    return F.pad(tiles, (0, 0, 0, 0, 0, 0, pad, 0))


def _chunks(plan: TilePlan, batch_heads: int) -> list[slice]:
    per_tile = max(1, batch_heads * plan.tile_len * plan.band_mask.shape[-1])
    size = max(1, _BAND_SCORES_PER_CHUNK // per_tile)
    return [slice(i, min(i + size, plan.num_tiles)) for i in range(0, plan.num_tiles, size)]


def _band(padded: Tensor, plan: TilePlan, chunk: slice, pad: int) -> Tensor:
    """Band keys (or values) of the tiles in ``chunk``: (chunk, B, w, d), the slots side by side."""
    slots = []
    for j, shift in enumerate(plan.shifts):
        if shift is not None:  # a slice of the (front-padded) tiles: no gather
            slots.append(padded[pad - shift + chunk.start : pad - shift + chunk.stop])
        else:
            slots.append(padded[pad:].index_select(0, plan.slot_index[chunk, j].clamp(min=0)))
    return slots[0] if len(slots) == 1 else torch.cat(slots, dim=2)


def _add_band(grad_padded: Tensor, grad_band: Tensor, plan: TilePlan, chunk: slice, pad: int) -> None:
    """Add band gradients (chunk, B, w, d) back onto the key tiles they came from (the inverse of _band)."""
    c = plan.tile_len
    for j, shift in enumerate(plan.shifts):
        part = grad_band[:, :, j * c : (j + 1) * c]
        if shift is not None:
            grad_padded[pad - shift + chunk.start : pad - shift + chunk.stop] += part
        else:  # empty slots (-1) are fully masked, so the zero gradient they carry may land on tile 0
            grad_padded.index_add_(0, plan.slot_index[chunk, j].clamp(min=0) + pad, part)


def _band_exp_scores(qs: Tensor, keys: Tensor, masked_out: Tensor, subtract: Tensor | None):
    """exp(band scores - subtract) (chunk, B, c, w), 0 where masked; ``subtract`` defaults to the row maximum.

    Returns (probabilities, subtract). Exponents are floored at ``_EXP_FLOOR``: below it exp() returns
    denormals (or 0 for -inf) that CPUs compute an order of magnitude slower, and e^-80 ~ 2e-35 is invisible
    next to a row's largest weight, which is at least 1 / (number of keys).
    """
    scores = (qs @ keys.transpose(-1, -2)).masked_fill_(masked_out, float("-inf"))
    if subtract is None:
        subtract = scores.amax(-1)
    probs = scores.sub_(subtract[..., None]).clamp_min_(_EXP_FLOOR).exp_().masked_fill_(masked_out, 0.0)
    return probs, subtract


def _band_forward(q: Tensor, k: Tensor, v: Tensor, plan: TilePlan, scale: float) -> tuple[Tensor, Tensor]:
    """Band attention of every tiled query: output (t, B, c, d) and log-sum-exp (t, B, c)."""
    pad = max((s for s in plan.shifts if s is not None), default=0)
    q_tiles = _to_tiles(q, plan)
    k_tiles, v_tiles = _front_padded(_to_tiles(k, plan), pad), _front_padded(_to_tiles(v, plan), pad)
    masked_out = (~plan.band_mask)[:, None]  # (t or 1, 1, c, w)
    out, lse = torch.empty_like(q_tiles), q_tiles.new_empty(q_tiles.shape[:-1])
    for chunk in _chunks(plan, q_tiles.shape[1]):
        mask = masked_out[chunk] if masked_out.shape[0] > 1 else masked_out
        keys = _band(k_tiles, plan, chunk, pad)
        weights, row_max = _band_exp_scores(q_tiles[chunk] * scale, keys, mask, None)
        total = weights.sum(-1)
        out[chunk] = (weights @ _band(v_tiles, plan, chunk, pad)).div_(total[..., None])
        lse[chunk] = row_max + total.log()
    return out, lse


def _band_backward(q, k, v, out, lse, grad_out, plan: TilePlan, scale: float):
    """Gradients (b, h, n - prefix, d) of q, k, v through the band keys, given the merged out and lse."""
    b, _, n, _ = q.shape
    pad = max((s for s in plan.shifts if s is not None), default=0)
    q_tiles, do_tiles = _to_tiles(q, plan), _to_tiles(grad_out, plan)  # empty slots: q = dO = 0
    k_tiles, v_tiles = _front_padded(_to_tiles(k, plan), pad), _front_padded(_to_tiles(v, plan), pad)
    lse_tiles = _to_tiles(lse, plan)
    # D = rowsum(dO * O) (FlashAttention, algorithm 2); zero for empty slots, so they pass no gradient
    delta_tiles = _to_tiles((grad_out * out).sum(-1), plan)
    dq_tiles = torch.empty_like(q_tiles)
    dk_tiles, dv_tiles = torch.zeros_like(k_tiles), torch.zeros_like(v_tiles)
    masked_out = (~plan.band_mask)[:, None]
    for chunk in _chunks(plan, q_tiles.shape[1]):
        mask = masked_out[chunk] if masked_out.shape[0] > 1 else masked_out
        qs, do = q_tiles[chunk] * scale, do_tiles[chunk]
        keys, values = _band(k_tiles, plan, chunk, pad), _band(v_tiles, plan, chunk, pad)
        probs, _ = _band_exp_scores(qs, keys, mask, lse_tiles[chunk])
        _add_band(dv_tiles, probs.transpose(-1, -2) @ do, plan, chunk, pad)
        ds = (do @ values.transpose(-1, -2)).sub_(delta_tiles[chunk][..., None]).mul_(probs)  # P * (dP - D)
        dq_tiles[chunk] = (ds @ keys).mul_(scale)
        _add_band(dk_tiles, ds.transpose(-1, -2) @ qs, plan, chunk, pad)
    length = n - plan.prefix_len
    return tuple(_from_tiles(x, plan, b, length) for x in (dq_tiles, dk_tiles[pad:], dv_tiles[pad:]))


class _PlannedAttention(torch.autograd.Function):
    """softmax(q k^T * scale restricted to a :class:`TilePlan`) v for q, k, v (b, h, n, d); see the module doc."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: TilePlan, scale: float) -> Tensor:
        b, _, n, _ = q.shape
        p = plan.prefix_len
        # every query over the prefix keys, causally (top-left aligned: queries past p see the whole prefix)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k[:, :, :p], v[:, :, :p], 0.0, True, scale=scale
        )
        if plan.num_tiles:
            band_out, band_lse = _band_forward(q, k, v, plan, scale)
            band_out, band_lse = _from_tiles(band_out, plan, b, n - p), _from_tiles(band_lse, plan, b, n - p)
            prefix_lse = lse[:, :, p:]
            merged = torch.logaddexp(prefix_lse, band_lse)
            out[:, :, p:] = (
                out[:, :, p:] * (prefix_lse - merged).exp()[..., None] + band_out * (band_lse - merged).exp()[..., None]
            )
            lse[:, :, p:] = merged
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale, p = ctx.plan, ctx.scale, ctx.plan.prefix_len
        grad_out = grad_out.contiguous()
        # given the merged output and log-sum-exp, the fused backward returns the prefix keys' exact share
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k[:, :, :p], v[:, :, :p], out, lse, 0.0, True, scale=scale
        )
        if plan.num_tiles:
            dq_band, dk_band, dv_band = _band_backward(q, k, v, out, lse, grad_out, plan, scale)
            dq[:, :, p:] += dq_band
            dk, dv = torch.cat((dk, dk_band), dim=2), torch.cat((dv, dv_band), dim=2)
        return dq, dk, dv, None, None


def planned_attention(q: Tensor, k: Tensor, v: Tensor, plan: TilePlan, *, scale: float | None = None) -> Tensor:
    """Attention of q, k, v (b, h, n, d) restricted to ``plan`` (see :class:`TilePlan`); returns (b, h, n, d)."""
    if not fast_path_available(q.device):
        raise ValueError(f"the fast sparse kernels run on CPU only, got tensors on {q.device}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _PlannedAttention.apply(q, k, v, plan.to(q.device), scale)


# ---------------------------------------------------------------------------------------------------------
# Public kernels, one per attention type
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


def axial_attention(
    q: Tensor, k: Tensor, v: Tensor, text_len: int, fmap: int, *, axis: str = "row", scale: float | None = None
) -> Tensor:
    """``axial_row`` (axis="row") or ``axial_col`` (axis="col") attention; q, k, v, output (b, h, n, d).

    n <= text_len + fmap ** 2: the sequence may stop anywhere (DALLE trains on all but the last image token).
    """
    n = _check(q, k, v, text_len, fmap)
    return planned_attention(q, k, v, axial_plan(text_len, fmap, n, axis), scale=scale)


def conv_like_attention(
    q: Tensor, k: Tensor, v: Tensor, text_len: int, fmap: int, *, kernel_size: int = 5, dilation: int = 1,
    scale: float | None = None,
) -> Tensor:  # fmt: skip
    """``conv_like`` attention; q, k, v, output (b, h, n, d), n <= text_len + fmap ** 2."""
    n = _check(q, k, v, text_len, fmap)
    return planned_attention(q, k, v, conv_like_plan(text_len, fmap, n, kernel_size, dilation), scale=scale)


def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, text_len: int, fmap: int, *, block_size: int = 16,
    num_local_blocks: int = 4, num_random_blocks: int = 2, seed: int = 0, scale: float | None = None,
) -> Tensor:  # fmt: skip
    """``sparse`` attention (blocks of ``block_size`` positions); q, k, v, output (b, h, n, d)."""
    n = _check(q, k, v, text_len, fmap)
    plan = block_sparse_plan(text_len, fmap, n, block_size, num_local_blocks, num_random_blocks, seed)
    return planned_attention(q, k, v, plan, scale=scale)


def pattern_attention(
    attn_type: str, q: Tensor, k: Tensor, v: Tensor, text_len: int, fmap: int, *, scale: float | None = None,
    kernel_size: int = 5, dilation: int = 1, sparse_block_size: int = 16, sparse_num_local_blocks: int = 4,
    sparse_num_random_blocks: int = 2, sparse_seed: int = 0,
) -> Tensor:  # fmt: skip
    """The fast kernel of ``attn_type`` (options named as in ``attention_mask``); q, k, v, output (b, h, n, d).

    Equals ``F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(...)[:n, :n], scale=scale)``.
    """
    if attn_type in ("axial_row", "axial_col"):
        return axial_attention(q, k, v, text_len, fmap, axis=attn_type[len("axial_") :], scale=scale)
    if attn_type == "conv_like":
        return conv_like_attention(q, k, v, text_len, fmap, kernel_size=kernel_size, dilation=dilation, scale=scale)
    if attn_type == "sparse":
        return block_sparse_attention(
            q, k, v, text_len, fmap, block_size=sparse_block_size, num_local_blocks=sparse_num_local_blocks,
            num_random_blocks=sparse_num_random_blocks, seed=sparse_seed, scale=scale,
        )  # fmt: skip
    raise ValueError(f"attn_type must be one of {SPARSE_TYPES} for a fast kernel, got {attn_type!r}")


@dataclass(frozen=True)
class SparsePattern:
    """A sparse attention type on a grid, with its ``attention_mask`` options; call it on q, k, v (b, h, n, d)."""

    attn_type: str
    text_len: int
    fmap: int
    options: tuple = ()  # (name, value) pairs of attention_mask options

    def supports(self, device: torch.device, dropout_p: float = 0.0) -> bool:
        """Whether the fast kernel runs for tensors on ``device`` with this attention dropout."""
        return fast_path_available(device, dropout_p)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None) -> Tensor:
        return pattern_attention(self.attn_type, q, k, v, self.text_len, self.fmap, scale=scale, **dict(self.options))
