"""Tile plans: which keys each query sees, as a prefix and bands, for the kernels of sparse attention.

A :class:`TilePlan` describes a pattern for the fast kernels of :mod:`dalle_pytorch.kernels.sparse_attention`: a
*prefix* of keys every later query sees (causally among themselves), then *bands*: each band cuts the later
queries into tiles (image rows, image columns, runs of blocks) and gives every tile the same number of keys,
either a window read in place (:class:`Window`) or gathered blocks (:class:`Gathered`), with a small mask.
Plans are pure functions of a pattern's data, cached, and tested to tile every position exactly once;
:func:`plan_covers` checks a plan against the boolean mask it is meant to compute. This module knows no
attention pattern class: the patterns of :mod:`dalle_pytorch.attention.patterns` call the builders here.

Shape letters: t tiles, c queries per tile, s gathered blocks per tile.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

_SPARSE_TILE_LEN = 32  # query positions per tile of the sparse pattern's window band, in whole blocks


@dataclass(frozen=True)
class Tiling:
    """Queries after the prefix cut into ``num_tiles`` tiles of ``tile_len``: query i of tile t is the region
    position ``t * tile_step + i * query_step`` (runs: steps (c, 1); grid columns: (1, fmap)). Every region
    position (padding included) is in exactly one tile."""

    num_tiles: int
    tile_len: int
    tile_step: int
    query_step: int


@dataclass(frozen=True)
class Window:
    """Band keys read in place: tile t sees the ``length`` keys at region positions
    ``start + t * tile_step + i * key_step`` (negative positions are zero padding, always masked).

    ``mask`` (t or 1, c, length) bool, or None for a causal band (the tile's own queries, ``length == c``).
    The backward pass adds key gradients back ``piece`` keys at a time: pieces never overlap across tiles.
    """

    tiling: Tiling
    start: int
    length: int
    key_step: int
    piece: int
    mask: Tensor | None


@dataclass(frozen=True)
class Gathered:
    """Band keys copied per tile: the key blocks ``block_index`` (t, s) of ``block`` region positions (-1:
    none), side by side; ``mask`` (t, c, s * block) bool."""

    tiling: Tiling
    block: int
    block_index: Tensor
    mask: Tensor


@dataclass(frozen=True)
class TilePlan:
    """Which keys each query sees: a prefix, then bands.

    Queries [0, prefix_len) see keys [0, prefix_len) causally. Every later query (the region, ``region_len``
    long with padding) sees all prefix keys plus, in each band, the keys its tile of that band's tiling may
    see; one softmax spans them all. ``front`` zero positions before the region hold the keys that windows
    reach before it.
    """

    prefix_len: int
    region_len: int
    front: int
    bands: tuple  # of Window / Gathered, each with its own tiling of the region's queries

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
    """Axial rows (axis="row": a tile per image row) or columns (a tile per column); the band is the
    tile itself, causally. Band keys after a query in its row (column) are masked, so positions past n never
    count."""
    if axis not in ("row", "col"):
        raise ValueError(f"axis must be 'row' or 'col', got {axis!r}")
    rows = _rows(text_len, fmap, n)
    if axis == "row":
        band = Window(Tiling(rows, fmap, fmap, 1), start=0, length=fmap, key_step=1, piece=fmap, mask=None)
    else:
        tiling = Tiling(fmap if rows else 0, rows, 1, fmap)
        band = Window(tiling, start=0, length=rows, key_step=fmap, piece=rows, mask=None)
    return TilePlan(text_len, rows * fmap, 0, (band,))


@functools.lru_cache(maxsize=64)
def conv_like_plan(
    text_len: int, fmap: int, n: int, kernel_size: int = 5, dilation: int = 1, corner: bool = False
) -> TilePlan:
    """The conv-like window: a tile per image row; its band is the run of rows from the window's top row to its own
    (read in place). The window is centred on the query (``kernel_size // 2 * dilation`` rows above it; the mask
    keeps the window's rows and columns, and in the own row only the tokens up to the query) or, with ``corner``,
    the ``kernel_size`` x ``kernel_size`` square whose bottom-right corner is the query (``(kernel_size - 1) *
    dilation`` rows above it, columns from as far left up to the query's)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    rows = _rows(text_len, fmap, n)
    reach = (kernel_size - 1 if corner else kernel_size // 2) * dilation
    up = reach - torch.arange(reach + 1)  # rows above the query's row, for each row of the band
    col = torch.arange(fmap)
    dc = col[:, None] - col[None, :]  # query column - key column, (c, c)
    in_window = (dc.abs() <= reach) & (dc % dilation == 0) & ((dc >= 0) if corner else True)  # (c, c)
    row_ok = (up % dilation == 0)[:, None, None] & ((up > 0)[:, None, None] | (dc >= 0))  # (rows of band, c, c)
    exists = torch.arange(rows)[:, None] >= up[None, :]  # (t, rows of band): not above the first image row
    mask = rearrange(exists[:, :, None, None] & row_ok & in_window, "t r i j -> t i (r j)")
    tiling = Tiling(rows, fmap, fmap, 1)
    band = Window(tiling, start=-reach * fmap, length=(reach + 1) * fmap, key_step=1, piece=fmap, mask=mask)
    return TilePlan(text_len, rows * fmap, reach * fmap, (band,))


@functools.lru_cache(maxsize=64)
def block_sparse_plan(
    text_len: int, n: int, block_size: int, num_local_blocks: int, layout: Callable[[int, int], Tensor]
) -> TilePlan:
    """Block-sparse attention over blocks of ``block_size`` positions: ``layout(num_positions, text_len)`` is
    the pattern's (blocks, blocks) bool layout (causal between blocks) for a sequence of that length, whose
    first ``num_local_blocks`` diagonals are all set. The blocks holding text are the prefix. Two bands:
    runs of blocks (about ``_SPARSE_TILE_LEN`` positions) see a window from the first block local to their
    first block up to their last block, read in place; single blocks see their other (random) blocks before
    that, gathered. Masks follow the layout, causal inside a block."""
    text_blocks = -(-text_len // block_size)
    prefix_len = text_blocks * block_size
    group = max(1, _SPARSE_TILE_LEN // block_size)  # blocks per tile of the window band
    num_tiles = max(0, -(-(n - prefix_len) // (block_size * group)))
    num_blocks = num_tiles * group
    # (blocks, blocks) after the text blocks
    layout = layout(prefix_len + num_blocks * block_size, text_len)[text_blocks:, text_blocks:]
    causal = torch.ones(block_size, block_size, dtype=torch.bool).tril()

    def band_mask(query_block: Tensor, key_block: Tensor) -> Tensor:  # (t, g), (t, s) -> (t, g * l, s * l)
        qb, kb = query_block[:, :, None], key_block[:, None, :]
        seen = (kb >= 0) & layout[qb, kb.clamp(min=0)]  # (t, g, s); the layout is causal between blocks
        mask = seen[..., None, None] & torch.where((qb == kb)[..., None, None], causal, True)
        return rearrange(mask, "t g s i j -> t (g i) (s j)")

    first = num_local_blocks - 1  # the window starts this many blocks before the tile's first block
    tile_blocks = torch.arange(num_tiles)[:, None] * group + torch.arange(group)  # (t, g)
    window_blocks = tile_blocks[:, :1] - first + torch.arange(first + group)  # (t, s)
    window = Window(
        Tiling(num_tiles, group * block_size, group * block_size, 1), start=-first * block_size,
        length=(first + group) * block_size, key_step=1, piece=block_size,
        mask=band_mask(tile_blocks, window_blocks.masked_fill(window_blocks < 0, -1)),
    )  # fmt: skip
    bands = (window,)
    # random blocks before the window of the block's tile (later ones are in the window already)
    window_start = window_blocks[:, :1].repeat_interleave(group, dim=0)  # (blocks, 1)
    random = layout & (torch.arange(num_blocks)[None, :] < window_start)  # (blocks, blocks)
    width = int(random.sum(1).max()) if num_blocks else 0
    if width:
        picks = torch.where(random, torch.arange(num_blocks), -1).sort(dim=1, descending=True).values[:, :width]
        tiling = Tiling(num_blocks, block_size, block_size, 1)
        bands += (Gathered(tiling, block_size, picks, band_mask(torch.arange(num_blocks)[:, None], picks)),)
    return TilePlan(prefix_len, num_blocks * block_size, first * block_size, bands)


def plan_covers(plan: TilePlan, mask: Tensor) -> bool:
    """Whether ``plan`` computes attention under ``mask`` (n, n) bool for the positions [0, n): every pair
    the mask allows is seen by exactly one part of the plan (the prefix or one band), and no other pair,
    nor any padding key."""
    n = mask.shape[0]
    count = torch.zeros(n, n, dtype=torch.int32)
    p = plan.prefix_len
    query, key = torch.arange(n)[:, None], torch.arange(min(p, n))[None, :]
    count[:, : min(p, n)] += key <= query  # the prefix part: causal, top-left aligned
    for band in plan.bands:
        tiling = band.tiling
        t, i = torch.arange(tiling.num_tiles)[:, None, None], torch.arange(tiling.tile_len)[None, :, None]
        queries = p + t * tiling.tile_step + i * tiling.query_step  # (t, c, 1)
        if isinstance(band, Window):
            j = torch.arange(band.length)[None, None, :]
            keys = p + band.start + t * tiling.tile_step + j * band.key_step  # (t, 1, length)
            seen = (j <= i) if band.mask is None else band.mask  # a causal band sees its own tile up to the query
        else:
            block_keys = band.block_index[:, :, None] * band.block + torch.arange(band.block)  # (t, s, l)
            keys = torch.where(band.block_index[:, :, None] >= 0, p + block_keys, -1).flatten(1)[:, None, :]
            seen = band.mask
        queries, keys = torch.broadcast_tensors(queries, keys, seen)[:2]
        seen = seen.expand_as(queries) & (queries < n)  # padding queries never reach the output
        queries, keys = queries[seen], keys[seen]
        if ((keys < 0) | (keys >= n)).any():  # a padding or missing key would take a share of the softmax
            return False
        count.index_put_((queries, keys), torch.ones_like(keys, dtype=torch.int32), accumulate=True)
    return torch.equal(count, mask.to(torch.int32))
