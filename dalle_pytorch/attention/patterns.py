"""The built-in attention patterns, one small class each, and helpers that take a pattern or its name.

- :class:`Full` (``"full"``): causal over everything.
- :class:`AxialRow` (``"axial_row"``) / :class:`AxialCol` (``"axial_col"``): all text + the earlier-or-same
  image tokens of the query's row / column.
- :class:`ConvLike` (``"conv_like"``): all text + the causal half of a ``kernel_size`` x ``kernel_size``
  window (spacing ``dilation``) centred on the query.
- :class:`ConvLikeCorner` (``"conv_like_corner"``): all text + the ``kernel_size`` x ``kernel_size`` window
  (spacing ``dilation``) whose bottom-right corner is the query, the original DALLE-pytorch's conv-like window.
- :class:`BlockSparse` (``"sparse"``): block-sparse over the whole sequence (local blocks, the blocks
  holding text, and random earlier blocks).

The grid patterns follow the DALL-E paper (Ramesh et al. 2021, https://arxiv.org/abs/2102.12092, appendix
B.1); block-sparse attention the Sparse Transformer (Child et al. 2019, https://arxiv.org/abs/1904.10509) and
BigBird (Zaheer et al. 2020, https://arxiv.org/abs/2007.14062). Every pattern but ``Full`` has a fast path (a
tile plan of :mod:`dalle_pytorch.kernels.tile_plans`); ``Full``'s mask is the causal mask, which the
transformer recognises and runs with the causal kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from dalle_pytorch.attention.pattern import (
    AttentionPattern,
    build_pattern,
    causal_mask,
    fast_plan,
    grid_mask,
    register_pattern,
)
from dalle_pytorch.kernels.sparse_attention import planned_attention
from dalle_pytorch.kernels.tile_plans import TilePlan, axial_plan, block_sparse_plan, conv_like_plan


@register_pattern("full")
@dataclass(frozen=True)
class Full(AttentionPattern):
    """Every query sees every earlier key."""

    def mask(self, text_len: int, fmap: int) -> Tensor:
        return causal_mask(text_len + fmap * fmap)


@register_pattern("axial_row")
@dataclass(frozen=True)
class AxialRow(AttentionPattern):
    """Image queries see all text and the earlier-or-same image tokens of their row."""

    def mask(self, text_len: int, fmap: int) -> Tensor:
        return grid_mask(text_len, fmap, lambda q_row, q_col, k_row, k_col: q_row == k_row)

    def tile_plan(self, text_len: int, fmap: int, n: int) -> TilePlan:
        return axial_plan(text_len, fmap, n, "row")


@register_pattern("axial_col")
@dataclass(frozen=True)
class AxialCol(AttentionPattern):
    """Image queries see all text and the earlier-or-same image tokens of their column."""

    def mask(self, text_len: int, fmap: int) -> Tensor:
        return grid_mask(text_len, fmap, lambda q_row, q_col, k_row, k_col: q_col == k_col)

    def tile_plan(self, text_len: int, fmap: int, n: int) -> TilePlan:
        return axial_plan(text_len, fmap, n, "col")


@register_pattern("conv_like")
@dataclass(frozen=True)
class ConvLike(AttentionPattern):
    """Image queries see all text and the causal half of a ``kernel_size`` x ``kernel_size`` window
    (odd size, every ``dilation``-th token) centred on them: the window rows above, and the window tokens
    left of them in their own row."""

    kernel_size: int = 5
    dilation: int = 1
    option_names: ClassVar = {"conv_kernel_size": "kernel_size", "conv_dilation": "dilation"}

    def __post_init__(self):
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {self.kernel_size}")
        if self.dilation < 1:
            raise ValueError(f"dilation must be >= 1, got {self.dilation}")

    def mask(self, text_len: int, fmap: int) -> Tensor:
        reach, step = (self.kernel_size // 2) * self.dilation, self.dilation

        def window(q_row, q_col, k_row, k_col):
            dr, dc = q_row - k_row, q_col - k_col
            return (dr.abs() <= reach) & (dc.abs() <= reach) & (dr % step == 0) & (dc % step == 0)

        return grid_mask(text_len, fmap, window)

    def tile_plan(self, text_len: int, fmap: int, n: int) -> TilePlan:
        return conv_like_plan(text_len, fmap, n, self.kernel_size, self.dilation)


@register_pattern("sparse")
@dataclass(frozen=True)
class BlockSparse(AttentionPattern):
    """Block-sparse attention over the whole sequence: blocks of ``block_size`` positions see the
    ``num_local_blocks`` blocks ending at their own, every block holding text, and ``num_random_blocks``
    earlier blocks drawn from ``seed``; causal inside a block."""

    block_size: int = 16
    num_local_blocks: int = 4
    num_random_blocks: int = 2
    seed: int = 0
    option_names: ClassVar = {
        "sparse_block_size": "block_size", "sparse_num_local_blocks": "num_local_blocks",
        "sparse_num_random_blocks": "num_random_blocks", "sparse_seed": "seed",
    }  # fmt: skip

    def __post_init__(self):
        if self.block_size < 1 or self.num_local_blocks < 1 or self.num_random_blocks < 0:
            raise ValueError(
                "sparse attention needs sparse_block_size >= 1, sparse_num_local_blocks >= 1 and "
                f"sparse_num_random_blocks >= 0, got {self.block_size}, {self.num_local_blocks}, "
                f"{self.num_random_blocks}"
            )

    def layout(self, n: int, text_len: int) -> Tensor:
        """(num_blocks, num_blocks) bool: which key block each query block may see, for n positions.

        The draws for block q depend only on the blocks before it, so the layout of a shorter sequence is the
        top-left corner of the layout of a longer one (the fast path pads the sequence to whole tiles).
        """
        num_blocks = -(-n // self.block_size)
        qb, kb = torch.meshgrid(torch.arange(num_blocks), torch.arange(num_blocks), indexing="ij")
        layout = (qb - kb >= 0) & (qb - kb < self.num_local_blocks)
        layout |= (kb * self.block_size < text_len) & (kb <= qb)  # blocks that hold text are global
        generator = torch.Generator().manual_seed(self.seed)
        for q in range(1, num_blocks if self.num_random_blocks else 0):
            picks = torch.randperm(q, generator=generator)[: self.num_random_blocks]
            layout[q, picks] = True
        return layout

    def mask(self, text_len: int, fmap: int) -> Tensor:
        n = text_len + fmap * fmap
        block_of = torch.arange(n) // self.block_size
        return causal_mask(n) & self.layout(n, text_len)[block_of[:, None], block_of[None, :]]

    def tile_plan(self, text_len: int, fmap: int, n: int) -> TilePlan:
        return block_sparse_plan(text_len, n, self.block_size, self.num_local_blocks, self.layout)


@register_pattern("conv_like_corner")
@dataclass(frozen=True)
class ConvLikeCorner(ConvLike):
    """Image queries see all text and the ``kernel_size`` x ``kernel_size`` window (every ``dilation``-th token)
    whose bottom-right corner they are: the tokens up to ``(kernel_size - 1) * dilation`` rows above and columns
    left of them, never right of their column. The conv-like window of the original DALLE-pytorch."""

    def mask(self, text_len: int, fmap: int) -> Tensor:
        reach, step = (self.kernel_size - 1) * self.dilation, self.dilation

        def window(q_row, q_col, k_row, k_col):
            dr, dc = q_row - k_row, q_col - k_col
            return (dr >= 0) & (dr <= reach) & (dc >= 0) & (dc <= reach) & (dr % step == 0) & (dc % step == 0)

        return grid_mask(text_len, fmap, window)

    def tile_plan(self, text_len: int, fmap: int, n: int) -> TilePlan:
        return conv_like_plan(text_len, fmap, n, self.kernel_size, self.dilation, corner=True)


def attention_mask(
    attn_type: str | AttentionPattern,
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
    """The (n, n) bool mask of a pattern or pattern name, n = text_len + fmap ** 2; a name takes its
    options from the keywords (named as DALLE's, ``kernel_size`` and ``dilation`` for ``conv_like``)."""
    options = dict(
        conv_kernel_size=kernel_size, conv_dilation=dilation, sparse_block_size=sparse_block_size,
        sparse_num_local_blocks=sparse_num_local_blocks, sparse_num_random_blocks=sparse_num_random_blocks,
        sparse_seed=sparse_seed,
    )  # fmt: skip
    return build_pattern(attn_type, options).mask(text_len, fmap)


def pattern_attention(
    pattern: AttentionPattern | str, q: Tensor, k: Tensor, v: Tensor, text_len: int, fmap: int, *,
    scale: float | None = None, dropout_p: float = 0.0,
) -> Tensor:  # fmt: skip
    """A pattern's fast kernel on q, k, v (b, h, n, d) for the positions [0, n), n <= text_len + fmap ** 2;
    returns (b, h, n, d), equal to ``F.scaled_dot_product_attention(q, k, v, attn_mask=pattern.mask(text_len,
    fmap)[:n, :n], scale=scale)`` (with ``dropout_p`` > 0, the same with attention dropout, masks drawn from
    torch's global generator). A name means the pattern with its default options."""
    pattern = build_pattern(pattern)
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
    plan = fast_plan(pattern, text_len, fmap, n)
    if plan is None:
        raise ValueError(f"attention pattern {pattern!r} has no fast path for text_len={text_len}, fmap={fmap}")
    return planned_attention(q, k, v, plan, scale=scale, dropout_p=dropout_p)
