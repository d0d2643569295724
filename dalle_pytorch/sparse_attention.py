"""Fast training kernels for DALLE's sparse attention patterns: axial rows / columns, conv-like, block-sparse.

Each function here returns exactly what ``F.scaled_dot_product_attention`` returns with the dense mask of
:func:`dalle_pytorch.attention.attention_mask` (outputs and gradients), for the positions ``[0, n)`` of a
full-sequence pass (training; no cache), while only computing the scores the pattern allows. All patterns
share one structure, a :class:`TilePlan`:

- a *prefix* of keys that every later query sees: the text for the grid patterns, the blocks holding text
  for ``sparse``. All queries attend to it causally in one call of PyTorch's fused CPU attention kernel.
- the positions after the prefix, cut into *tiles* of queries (image rows, image columns, runs of blocks).
  Each tile also sees one or two *bands* of keys: a window read in place through an overlapping strided view
  (its own row or column, the run of rows above it up to the conv window's top, the local blocks), or a few
  gathered blocks (the random blocks of ``sparse``), restricted by a small (tile x band) mask. All tiles'
  bands go through the same fused kernel in one call, the tiles standing in for the batch.

The partial softmaxes (prefix, each band) are merged through their log-sum-exps. The backward pass calls
the kernel's backward once per part with the *merged* output and log-sum-exp: it recomputes the
probabilities exp(q k^T * scale - lse) and dS = P (dP - rowsum(dO * O)), which is exactly that part's share
of the merged gradient (FlashAttention, Dao et al. 2022, https://arxiv.org/abs/2205.14135, algorithm 2).
So a layer keeps only q, k, v, the output and the log-sum-exp, like the causal kernel of ``full``.

The fused kernel is ``aten::_scaled_dot_product_flash_attention_for_cpu``, the one behind
``F.scaled_dot_product_attention`` on CPU; it has no dropout, so :func:`fast_path_available` is False on
other devices and with attention dropout, where callers keep the dense-mask path. (FlexAttention would be
the general tool, but it has no backward pass on CPU.)

Patterns: axial and conv-like attention as in the DALL-E paper (Ramesh et al. 2021,
https://arxiv.org/abs/2102.12092, appendix B.1); block-sparse attention after the Sparse Transformer (Child
et al. 2019, https://arxiv.org/abs/1904.10509) and BigBird (Zaheer et al. 2020, https://arxiv.org/abs/2007.14062).

Shape letters: b batch, h heads, n positions, d head dim, p prefix length, t tiles, c queries per tile,
B = b * h; a band's keys per tile are its ``length``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.autograd.function import once_differentiable

from dalle_pytorch.attention import block_sparse_layout

SPARSE_TYPES = ("axial_row", "axial_col", "conv_like", "sparse")

_SPARSE_TILE_LEN = 32  # query positions per tile of the sparse pattern, in whole blocks


def fast_path_available(device: torch.device, dropout_p: float = 0.0) -> bool:
    """Whether the kernels here can run: on CPU, without attention dropout (the fused kernel has none)."""
    return (
        device.type == "cpu"
        and dropout_p == 0.0
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


# ---------------------------------------------------------------------------------------------------------
# The plan of a pattern: prefix, tiles of queries, and the bands of keys each tile sees
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A band read in place: tile t sees the ``length`` keys at region positions
    ``start + t * tile_step + i * key_step`` (negative positions are zero padding, masked out).

    ``mask`` (t or 1, c, length) bool, or None for a causal band (the tile's own queries, ``length == c``).
    The backward pass adds key gradients back ``piece`` keys at a time: pieces never overlap across tiles.
    """

    start: int
    length: int
    key_step: int
    piece: int
    mask: Tensor | None

    @functools.cached_property
    def blind(self) -> Tensor | None:
        """(t or 1, 1, c) bool: queries that see no key of this band (None: every query sees one)."""
        return None if self.mask is None else ~self.mask.any(-1)[:, None]


@dataclass(frozen=True)
class Gathered:
    """A band copied per tile: the key blocks ``block_index`` (t, s) of ``block`` region positions
    (-1: none), side by side; ``mask`` (t, c, s * block) bool."""

    block: int
    block_index: Tensor
    mask: Tensor

    @functools.cached_property
    def blind(self) -> Tensor:
        """(t, 1, c) bool: queries that see no key of this band."""
        return ~self.mask.any(-1)[:, None]


@dataclass(frozen=True)
class TilePlan:
    """Which keys each query sees, as a prefix plus tiles with bands.

    Queries [0, prefix_len) see keys [0, prefix_len) causally. The positions after the prefix (the region,
    ``region_len`` long with padding) are the queries of ``num_tiles`` tiles of ``tile_len``: query i of tile
    t is region position ``t * tile_step + i * query_step`` (rows: steps (c, 1); columns: (1, fmap)). Each of
    these queries sees every prefix key plus, in every band, the keys its tile's band mask allows; one softmax
    spans them all. ``front`` zero positions before the region hold the keys that windows reach before it.
    """

    prefix_len: int
    num_tiles: int
    tile_len: int
    tile_step: int
    query_step: int
    region_len: int
    front: int
    bands: tuple  # of Window / Gathered

    def to(self, device: torch.device) -> TilePlan:
        if all(band.mask is None or band.mask.device == device for band in self.bands):
            return self

        def move(band):
            values = {f.name: getattr(band, f.name) for f in dataclasses.fields(band)}
            return type(band)(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in values.items()})

        return dataclasses.replace(self, bands=tuple(move(band) for band in self.bands))


def _rows(text_len: int, fmap: int, n: int) -> int:
    """Image rows holding at least one of the positions [0, n)."""
    return max(0, -(-(n - text_len) // fmap))


@functools.lru_cache(maxsize=64)
def axial_plan(text_len: int, fmap: int, n: int, axis: str) -> TilePlan:
    """``axial_row`` (axis="row": a tile per image row) or ``axial_col`` (a tile per column); the band is the
    tile itself, causally. Band keys after a query in its row (column) are masked, so positions past n never
    count."""
    if axis not in ("row", "col"):
        raise ValueError(f"axis must be 'row' or 'col', got {axis!r}")
    rows = _rows(text_len, fmap, n)
    if axis == "row":
        band = Window(start=0, length=fmap, key_step=1, piece=fmap, mask=None)
        return TilePlan(text_len, rows, fmap, fmap, 1, rows * fmap, 0, (band,))
    band = Window(start=0, length=rows, key_step=fmap, piece=rows, mask=None)
    return TilePlan(text_len, fmap if rows else 0, rows, 1, fmap, rows * fmap, 0, (band,))


@functools.lru_cache(maxsize=64)
def conv_like_plan(text_len: int, fmap: int, n: int, kernel_size: int = 5, dilation: int = 1) -> TilePlan:
    """``conv_like``: a tile per image row; its band is the run of rows from the window's top row to its own
    (``kernel_size // 2 * dilation + 1`` rows, read in place). The mask keeps the window's rows and columns,
    and in the own row only the tokens up to the query."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    rows = _rows(text_len, fmap, n)
    reach = kernel_size // 2 * dilation
    up = reach - torch.arange(reach + 1)  # rows above the query's row, for each row of the band
    col = torch.arange(fmap)
    dc = col[:, None] - col[None, :]  # query column - key column, (c, c)
    in_window = (dc.abs() <= reach) & (dc % dilation == 0)  # (c, c)
    row_ok = (up % dilation == 0)[:, None, None] & ((up > 0)[:, None, None] | (dc >= 0))  # (rows of band, c, c)
    exists = torch.arange(rows)[:, None] >= up[None, :]  # (t, rows of band): not above the first image row
    mask = rearrange(exists[:, :, None, None] & row_ok & in_window, "t r i j -> t i (r j)")
    band = Window(start=-reach * fmap, length=(reach + 1) * fmap, key_step=1, piece=fmap, mask=mask)
    return TilePlan(text_len, rows, fmap, fmap, 1, rows * fmap, reach * fmap, (band,))


@functools.lru_cache(maxsize=64)
def block_sparse_plan(
    text_len: int, fmap: int, n: int, block_size: int = 16, num_local_blocks: int = 4, num_random_blocks: int = 2,
    seed: int = 0,
) -> TilePlan:  # fmt: skip
    """``sparse``: the blocks holding text are the prefix; later blocks are grouped into tiles of about
    ``_SPARSE_TILE_LEN`` positions. Bands: a window from the first block local to the tile's first block up
    to its last block (read in place), and the tile's random blocks before that window (gathered). Masks
    follow the block layout, causal inside a block."""
    text_blocks = -(-text_len // block_size)
    prefix_len = text_blocks * block_size
    group = max(1, _SPARSE_TILE_LEN // block_size)  # blocks per tile
    tile_len = group * block_size
    num_tiles = max(0, -(-(n - prefix_len) // tile_len))
    num_blocks = num_tiles * group
    layout = block_sparse_layout(
        prefix_len + num_blocks * block_size, text_len, block_size, num_local_blocks, num_random_blocks, seed
    )[text_blocks:, text_blocks:]  # (blocks, blocks) after the text blocks
    query_block = torch.arange(num_tiles)[:, None] * group + torch.arange(group)  # (t, g)
    causal = torch.ones(block_size, block_size, dtype=torch.bool).tril()

    def band_mask(key_block: Tensor) -> Tensor:  # (t, s) key blocks -> (t, c, s * block) mask
        qb, kb = query_block[:, :, None], key_block[:, None, :]
        seen = (kb >= 0) & layout[qb, kb.clamp(min=0)]  # (t, g, s); the layout is causal between blocks
        mask = seen[..., None, None] & torch.where((qb == kb)[..., None, None], causal, True)
        return rearrange(mask, "t g s i j -> t (g i) (s j)")

    first = num_local_blocks - 1  # the window starts this many blocks before the tile's first block
    window_blocks = torch.arange(num_tiles)[:, None] * group - first + torch.arange(first + group)  # (t, s)
    window = Window(
        start=-first * block_size, length=(first + group) * block_size, key_step=1, piece=block_size,
        mask=band_mask(window_blocks.masked_fill(window_blocks < 0, -1)),
    )  # fmt: skip
    before = torch.arange(num_blocks)[None, :] < window_blocks[:, :1]  # (t, blocks) left of the window
    random = layout.view(num_tiles, group, num_blocks).any(dim=1) & before
    width = int(random.sum(1).max()) if num_tiles else 0
    bands = (window,)
    if width:
        picks = torch.where(random, torch.arange(num_blocks), -1).sort(dim=1, descending=True).values[:, :width]
        bands += (Gathered(block_size, picks, band_mask(picks)),)
    return TilePlan(prefix_len, num_tiles, tile_len, tile_len, 1, num_tiles * tile_len, first * block_size, bands)


# ---------------------------------------------------------------------------------------------------------
# The kernel: the fused attention kernel over the prefix and over every band, merged by log-sum-exp
# ---------------------------------------------------------------------------------------------------------


def _fused_forward(q, k, v, causal: bool, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """PyTorch's fused CPU attention: (output, log-sum-exp) of q (x, y, i, d) over k, v (x, y, j, d).

    Arbitrary strides are read in place, so bands can be overlapping views. A fully masked row gives
    output 0 and log-sum-exp 0 (not -inf): callers mask such rows' log-sum-exp themselves.
    """
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)


def _fused_backward(grad_out, q, k, v, out, lse, causal: bool, bias: Tensor | None, scale: float):
    """Its backward. For any (out, lse) it returns the gradients through P = exp(q k^T scale - lse) with
    dS = P (dP - rowsum(dO * out)): given the merged out and lse, exactly these keys' share."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, causal, attn_mask=bias, scale=scale
    )


def _region_buffer(x: Tensor, plan: TilePlan) -> Tensor:
    """(b, h, n, ...) -> (B, front + region_len, ...): the positions after the prefix, zero-padded around."""
    region = x[:, :, plan.prefix_len :]
    back = plan.region_len - region.shape[2]
    padded = F.pad(region, (0, 0) * (x.ndim - 3) + (plan.front, back))  # one copy
    return padded.flatten(0, 1)


def _view(buffer: Tensor, plan: TilePlan, start: int, length: int, step: int) -> Tensor:
    """(t, B, length, ...) view of a region buffer: item i of tile t is region position
    ``start + t * tile_step + i * step`` (overlapping tiles share memory; nothing is copied)."""
    per_position = buffer.stride(1)
    size = (plan.num_tiles, buffer.shape[0], length, *buffer.shape[2:])
    stride = (plan.tile_step * per_position, buffer.stride(0), step * per_position, *buffer.stride()[2:])
    return buffer.as_strided(size, stride, buffer.storage_offset() + (plan.front + start) * per_position)


def _tiles(buffer: Tensor, plan: TilePlan) -> Tensor:
    """The query tiles of a region buffer: (t, B, c, ...)."""
    return _view(buffer, plan, 0, plan.tile_len, plan.query_step)


def _from_tiles(tiles: Tensor, plan: TilePlan, x: Tensor) -> Tensor:
    """Query tiles (t, B, c, ...) back to the region of x's layout: (b, h, n - prefix_len, ...)."""
    buffer = tiles.new_empty(tiles.shape[1], plan.front + plan.region_len, *tiles.shape[3:])
    _tiles(buffer, plan).copy_(tiles)
    region = buffer[:, plan.front : plan.front + x.shape[2] - plan.prefix_len]
    return region.unflatten(0, x.shape[:2])


def _band_keys(buffer: Tensor, plan: TilePlan, band) -> Tensor:
    """The keys (or values) of a band: (t, B, length, d), a view for a Window, a copy for Gathered."""
    if isinstance(band, Window):
        return _view(buffer, plan, band.start, band.length, band.key_step)
    blocks = buffer[:, plan.front :].unflatten(1, (-1, band.block))  # (B, blocks, block, d)
    gathered = blocks[:, band.block_index.clamp(min=0)]  # (B, t, s, block, d)
    return rearrange(gathered, "B t s l d -> t B (s l) d")


def _add_band_grad(grad_buffer: Tensor, grad: Tensor, plan: TilePlan, band) -> None:
    """Add the gradients (t, B, length, d) of a band's keys onto the region buffer they were read from."""
    if isinstance(band, Window):
        for i in range(0, band.length, band.piece):  # pieces never overlap across tiles, so += is safe
            start = band.start + i * band.key_step
            _view(grad_buffer, plan, start, band.piece, band.key_step).add_(grad[:, :, i : i + band.piece])
        return
    blocks = grad_buffer[:, plan.front :].unflatten(1, (-1, band.block))  # (B, blocks, block, d)
    grad = rearrange(grad, "t B (s l) d -> B (t s) l d", l=band.block)
    # empty slots (-1) are fully masked, so the zero gradient they carry may land on block 0
    blocks.index_add_(1, band.block_index.clamp(min=0).flatten(), grad)


def _bias(band, dtype: torch.dtype) -> Tensor | None:
    """A band's mask as the fused kernel's additive bias (t or 1, 1, c, length): 0 or -inf; None if causal."""
    if band.mask is None:
        return None
    bias = torch.zeros(band.mask.shape, dtype=dtype, device=band.mask.device)
    return bias.masked_fill_(~band.mask, float("-inf"))[:, None]


def _merge(out: Tensor, lse: Tensor, other_out: Tensor, other_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two softmax attentions over disjoint key sets into one over their union.

    The first part's share of the union is exp(lse - logaddexp(lse, other_lse)) = sigmoid(lse - other_lse).
    """
    share = torch.sigmoid(lse - other_lse)
    return torch.lerp(other_out, out, share[..., None].to(out.dtype)), torch.logaddexp(lse, other_lse)


class _PlannedAttention(torch.autograd.Function):
    """softmax(q k^T * scale restricted to a :class:`TilePlan`) v for q, k, v (b, h, n, d); see the module doc."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: TilePlan, scale: float) -> Tensor:
        p = plan.prefix_len
        # every query over the prefix keys, causally (top-left aligned: queries past p see the whole prefix)
        out, lse = _fused_forward(q, k[:, :, :p], v[:, :, :p], True, None, scale)
        biases = [_bias(band, q.dtype) for band in plan.bands]
        if plan.num_tiles:
            q_tiles = _tiles(_region_buffer(q, plan), plan)
            k_buffer, v_buffer = _region_buffer(k, plan), _region_buffer(v, plan)
            band_out = band_lse = None
            for band, bias in zip(plan.bands, biases):
                keys, values = _band_keys(k_buffer, plan, band), _band_keys(v_buffer, plan, band)
                o, o_lse = _fused_forward(q_tiles, keys, values, band.mask is None, bias, scale)
                if band.blind is not None:  # the kernel gives log-sum-exp 0 where a row sees no key
                    o_lse = o_lse.masked_fill_(band.blind, float("-inf"))
                band_out, band_lse = (o, o_lse) if band_out is None else _merge(band_out, band_lse, o, o_lse)
            out[:, :, p:], lse[:, :, p:] = _merge(
                out[:, :, p:], lse[:, :, p:], _from_tiles(band_out, plan, q), _from_tiles(band_lse, plan, q)
            )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.biases = plan, scale, biases
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale, p = ctx.plan, ctx.scale, ctx.plan.prefix_len
        grad_out = grad_out.contiguous()
        # given the merged output and log-sum-exp, the fused backward returns the prefix keys' exact share
        dq, dk, dv = _fused_backward(grad_out, q, k[:, :, :p], v[:, :, :p], out, lse, True, None, scale)
        if not plan.num_tiles:
            return dq, dk, dv, None, None
        q_tiles = _tiles(_region_buffer(q, plan), plan)
        # empty query slots have dO = 0, so rowsum(dO * O) = 0 and they pass no gradient
        do_tiles, out_tiles = _tiles(_region_buffer(grad_out, plan), plan), _tiles(_region_buffer(out, plan), plan)
        lse_tiles = _tiles(_region_buffer(lse, plan), plan)
        k_buffer, v_buffer = _region_buffer(k, plan), _region_buffer(v, plan)
        dk_buffer, dv_buffer = torch.zeros_like(k_buffer), torch.zeros_like(v_buffer)
        dq_tiles = None
        for band, bias in zip(plan.bands, ctx.biases):
            keys, values = _band_keys(k_buffer, plan, band), _band_keys(v_buffer, plan, band)
            dq_band, dk_band, dv_band = _fused_backward(
                do_tiles, q_tiles, keys, values, out_tiles, lse_tiles, band.mask is None, bias, scale
            )
            dq_tiles = dq_band if dq_tiles is None else dq_tiles.add_(dq_band)
            _add_band_grad(dk_buffer, dk_band, plan, band)
            _add_band_grad(dv_buffer, dv_band, plan, band)
        dq[:, :, p:] += _from_tiles(dq_tiles, plan, q)
        n = q.shape[2]
        regions = [
            buffer[:, plan.front : plan.front + n - p].unflatten(0, q.shape[:2]) for buffer in (dk_buffer, dv_buffer)
        ]
        return dq, torch.cat((dk, regions[0]), dim=2), torch.cat((dv, regions[1]), dim=2), None, None


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
