"""Fast training kernels for sparse attention patterns (axial rows / columns, conv-like, block-sparse, ...).

:func:`planned_attention` returns exactly what ``F.scaled_dot_product_attention`` returns with the dense mask
a :class:`~dalle_pytorch.kernels.tile_plans.TilePlan` covers (outputs and gradients), for the positions
``[0, n)`` of a full-sequence pass (training; no cache), while only computing the scores the plan allows. The
patterns of :mod:`dalle_pytorch.attention.patterns` build the plans; every plan has one structure:

- a *prefix* of keys that every later query sees: the text for the grid patterns, the blocks holding text
  for ``sparse``. All queries attend to it causally in one call of PyTorch's fused CPU attention kernel.
- the later positions also see one or two *bands* of keys. A band cuts their queries into *tiles* (image
  rows, image columns, runs of blocks, single blocks) and gives each tile the same number of keys: a window
  read in place through an overlapping strided view (its own row or column, the rows from the conv window's
  top down to its own, the local blocks) or a few gathered blocks (the random blocks of ``sparse``), with a
  small (tile x band) mask. All tiles of a band go through the same fused kernel in one call, as its batch.

The partial softmaxes (prefix, each band) are merged through their log-sum-exps. The backward pass calls
the kernel's backward once per part with the *merged* output and log-sum-exp: it recomputes the
probabilities exp(q k^T * scale - lse) and dS = P (dP - rowsum(dO * O)), which is exactly that part's share
of the merged gradient (FlashAttention, Dao et al. 2022, https://arxiv.org/abs/2205.14135, algorithm 2).
So a layer keeps only q, k, v, the output and the log-sum-exp, like the causal kernel of ``full``. Tiles and
windows are strided views of one zero-padded copy of the sequence per tensor (padding completes the last
tile and the windows that reach before the first image row; padded keys are always masked).

The fused kernel is ``aten::_scaled_dot_product_flash_attention_for_cpu``, the one behind
``F.scaled_dot_product_attention`` on CPU. It has no dropout: with attention dropout each part runs the
chunked kernel of :mod:`dalle_pytorch.kernels.dropout_attention` instead, which has the same (output, log-sum-exp)
interface and replays its dropout masks from a seed in the backward pass; dropout is linear in the
probabilities, so the merge above stays exact. :func:`fast_path_available` is False on other devices, where
callers keep the dense-mask path. (FlexAttention would be the general tool, but it has no backward pass on
CPU.)

Patterns: axial and conv-like attention as in the DALL-E paper (Ramesh et al. 2021,
https://arxiv.org/abs/2102.12092, appendix B.1); block-sparse attention after the Sparse Transformer (Child
et al. 2019, https://arxiv.org/abs/1904.10509) and BigBird (Zaheer et al. 2020, https://arxiv.org/abs/2007.14062).

Shape letters: b batch, h heads, n positions, d head dim, p prefix length, t tiles, c queries per tile,
B = b * h; a band's keys per tile are its ``length``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor
from torch.autograd.function import once_differentiable

from dalle_pytorch.kernels.dropout_attention import dropout_backward, dropout_forward, random_seed
from dalle_pytorch.kernels.tile_plans import TilePlan, Tiling, Window


def fast_path_available(device: torch.device, dropout_p: float = 0.0) -> bool:
    """Whether the kernels here can run: on CPU (with or without attention dropout)."""
    return (
        device.type == "cpu"
        and 0.0 <= dropout_p < 1.0
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


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


@dataclass(frozen=True)
class _Dropout:
    """Attention dropout of one planned call: probability ``p``; part i (0: prefix, then the bands) draws
    its masks from ``seed + i``, so the backward pass draws the same ones."""

    p: float = 0.0
    seed: int = 0


def _causal_and_mask(band) -> tuple[bool, Tensor | None]:
    """Whether a part (the prefix: band None) is causal, else its bool mask (t or 1, 1, c, length)."""
    if band is None or band.mask is None:
        return True, None
    return False, band.mask[:, None]


def _part_forward(part: int, dropout: _Dropout, q, k, v, band, bias, scale) -> tuple[Tensor, Tensor]:
    """(output, log-sum-exp) of one part: the fused kernel, or the chunked one with dropout."""
    causal, mask = _causal_and_mask(band)
    if not dropout.p:
        return _fused_forward(q, k, v, causal, bias, scale)
    return dropout_forward(q, k, v, mask, causal, dropout.p, scale, dropout.seed + part)


def _part_backward(part: int, dropout: _Dropout, grad_out, q, k, v, out, lse, band, bias, scale):
    """Gradients of one part given the merged output and log-sum-exp."""
    causal, mask = _causal_and_mask(band)
    if not dropout.p:
        return _fused_backward(grad_out, q, k, v, out, lse, causal, bias, scale)
    return dropout_backward(grad_out, q, k, v, out, lse, mask, causal, dropout.p, scale, dropout.seed + part)


def _lead(plan: TilePlan) -> int:
    """Zero positions a sequence buffer needs before position 0, for windows that reach before the sequence."""
    return max(0, plan.front - plan.prefix_len)


def _sequence_buffer(x: Tensor, plan: TilePlan) -> Tensor:
    """(b, h, n, ...) -> (B, lead + prefix_len + region_len, ...): x between zero padding (one copy).

    Region position r is at index ``lead + prefix_len + r`` (the buffer's *origin* plus r); the positions a
    window reads before the region are prefix positions or zeros, and they are always masked."""
    lead, n = _lead(plan), x.shape[2]
    buffer = x.new_empty(x.shape[0] * x.shape[1], lead + plan.prefix_len + plan.region_len, *x.shape[3:])
    buffer[:, :lead].zero_()
    buffer[:, lead + n :].zero_()  # (F.pad would zero the whole buffer before copying)
    buffer[:, lead : lead + n] = x.flatten(0, 1)
    return buffer


def _view(buffer: Tensor, origin: int, tiling: Tiling, start: int, length: int, step: int) -> Tensor:
    """(t, B, length, ...) view of a sequence buffer: item i of tile t is region position
    ``start + t * tile_step + i * step`` (overlapping tiles share memory; nothing is copied)."""
    per_position = buffer.stride(1)
    size = (tiling.num_tiles, buffer.shape[0], length, *buffer.shape[2:])
    stride = (tiling.tile_step * per_position, buffer.stride(0), step * per_position, *buffer.stride()[2:])
    return buffer.as_strided(size, stride, buffer.storage_offset() + (origin + start) * per_position)


def _tiles(buffer: Tensor, origin: int, tiling: Tiling) -> Tensor:
    """The query tiles of a sequence buffer: (t, B, c, ...)."""
    return _view(buffer, origin, tiling, 0, tiling.tile_len, tiling.query_step)


def _band_keys(buffer: Tensor, origin: int, band) -> Tensor:
    """The keys (or values) of a band: (t, B, length, d), a view for a Window, a copy for Gathered."""
    if isinstance(band, Window):
        return _view(buffer, origin, band.tiling, band.start, band.length, band.key_step)
    blocks = buffer[:, origin:].unflatten(1, (-1, band.block))  # (B, blocks, block, d)
    gathered = blocks[:, band.block_index.clamp(min=0)]  # (B, t, s, block, d)
    return rearrange(gathered, "B t s l d -> t B (s l) d")


def _add_band_grad(grad_buffer: Tensor, grad: Tensor, origin: int, band) -> None:
    """Add the gradients (t, B, length, d) of a band's keys onto the sequence buffer they were read from.
    Keys read before the region are masked: their gradient is exactly 0."""
    if isinstance(band, Window):
        for i in range(0, band.length, band.piece):  # pieces never overlap across tiles, so += is safe
            start = band.start + i * band.key_step
            piece = _view(grad_buffer, origin, band.tiling, start, band.piece, band.key_step)
            piece.add_(grad[:, :, i : i + band.piece])
        return
    blocks = grad_buffer[:, origin:].unflatten(1, (-1, band.block))  # (B, blocks, block, d)
    grad = rearrange(grad, "t B (s l) d -> B (t s) l d", l=band.block)
    # empty slots (-1) are fully masked, so the zero gradient they carry may land on block 0
    blocks.index_add_(1, band.block_index.clamp(min=0).flatten(), grad)


def _bias(band, dtype: torch.dtype) -> Tensor | None:
    """A band's mask as the fused kernel's additive bias (t or 1, 1, c, length): 0 or -inf; None if causal."""
    if band.mask is None:
        return None
    bias = torch.zeros(band.mask.shape, dtype=dtype, device=band.mask.device)
    return bias.masked_fill_(~band.mask, float("-inf"))[:, None]


def _blind(band) -> Tensor | None:
    """(t or 1, 1, c) bool: the queries that see no key of a band (None: every query sees one)."""
    return None if band.mask is None else ~band.mask.any(-1)[:, None]


def _merge_into(out: Tensor, lse: Tensor, other_out: Tensor, other_lse: Tensor) -> None:
    """Combine two softmax attentions over disjoint key sets into one over their union, in place of the first.

    The second part's share of the union is exp(other_lse - logaddexp(lse, other_lse)) = sigmoid(other_lse - lse).
    """
    share = torch.sigmoid(other_lse - lse)
    out.lerp_(other_out, share[..., None].to(out.dtype))
    lse.copy_(torch.logaddexp(lse, other_lse))


class _PlannedAttention(torch.autograd.Function):
    """softmax(q k^T * scale restricted to a :class:`TilePlan`) v for q, k, v (b, h, n, d); see the module doc."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: TilePlan, scale: float, dropout: _Dropout) -> Tensor:
        p = plan.prefix_len
        # every query over the prefix keys, causally (top-left aligned: queries past p see the whole prefix)
        out, lse = _part_forward(0, dropout, q, k[:, :, :p], v[:, :, :p], None, None, scale)
        biases = [None if dropout.p else _bias(band, q.dtype) for band in plan.bands]
        ctx.plan, ctx.scale, ctx.biases, ctx.dropout, ctx.heads = plan, scale, biases, dropout, q.shape[:2]
        if not plan.region_len:
            ctx.save_for_backward(q, k, v, out, lse)
            return out
        # a layer keeps the padded copies of q, k, v and the log-sum-exp, and the output: as much as PyTorch's kernel
        q_seq, k_seq, v_seq, out_seq, lse_seq = (_sequence_buffer(x, plan) for x in (q, k, v, out, lse))
        origin = _lead(plan) + p
        for part, (band, bias) in enumerate(zip(plan.bands, biases), start=1):
            keys, values = _band_keys(k_seq, origin, band), _band_keys(v_seq, origin, band)
            queries = _tiles(q_seq, origin, band.tiling)
            band_out, band_lse = _part_forward(part, dropout, queries, keys, values, band, bias, scale)
            blind = _blind(band)
            if blind is not None:  # the kernel gives log-sum-exp 0 where a row sees no key
                band_lse.masked_fill_(blind, float("-inf"))
            _merge_into(_tiles(out_seq, origin, band.tiling), _tiles(lse_seq, origin, band.tiling), band_out, band_lse)
        # the output in the memory layout of PyTorch's attention kernels, (b, n, h, d): the caller's
        # "b h n d -> b n (h d)" is then a view, so the output projection keeps this very tensor for backward
        b, h, n = q.shape[:3]
        out = q.new_empty(b, n, h, v.shape[-1]).transpose(1, 2).copy_(_unpad(out_seq, plan, (b, h), n))
        ctx.save_for_backward(q_seq, k_seq, v_seq, out, lse_seq)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        plan, scale, p, dropout = ctx.plan, ctx.scale, ctx.plan.prefix_len, ctx.dropout
        n = grad_out.shape[2]
        grad_out = grad_out.contiguous()
        if not plan.region_len:
            q, k, v, out, lse = ctx.saved_tensors
            return (*_part_backward(0, dropout, grad_out, q, k, v, out, lse, None, None, scale), None, None, None)
        q_seq, k_seq, v_seq, out, lse_seq = ctx.saved_tensors
        out_seq = _sequence_buffer(out, plan)
        q, k, v, lse = (_unpad(x, plan, ctx.heads, n) for x in (q_seq, k_seq, v_seq, lse_seq))
        # given the merged output and log-sum-exp, each part's backward returns its keys' exact share
        dq, dk, dv = _part_backward(0, dropout, grad_out, q, k[:, :, :p], v[:, :, :p], out, lse, None, None, scale)
        origin, lead = _lead(plan) + p, _lead(plan)
        # padding query slots have dO = 0, so rowsum(dO * O) = 0 and they pass no gradient
        do_seq, dq_seq = _sequence_buffer(grad_out, plan), _sequence_buffer(dq, plan)
        dk_seq, dv_seq = torch.zeros_like(k_seq), torch.zeros_like(v_seq)
        dk_seq[:, lead:origin], dv_seq[:, lead:origin] = dk.flatten(0, 1), dv.flatten(0, 1)
        for part, (band, bias) in enumerate(zip(plan.bands, ctx.biases), start=1):
            keys, values = _band_keys(k_seq, origin, band), _band_keys(v_seq, origin, band)
            tiles = [_tiles(buffer, origin, band.tiling) for buffer in (do_seq, q_seq, out_seq, lse_seq)]
            dq_band, dk_band, dv_band = _part_backward(
                part, dropout, tiles[0], tiles[1], keys, values, tiles[2], tiles[3], band, bias, scale
            )
            _tiles(dq_seq, origin, band.tiling).add_(dq_band)
            _add_band_grad(dk_seq, dk_band, origin, band)
            _add_band_grad(dv_seq, dv_band, origin, band)
        return (*(_unpad(x, plan, ctx.heads, n) for x in (dq_seq, dk_seq, dv_seq)), None, None, None)


def _unpad(buffer: Tensor, plan: TilePlan, heads: tuple[int, int], n: int) -> Tensor:
    """The positions [0, n) of a sequence buffer, as (b, h, n, ...): a view."""
    return buffer[:, _lead(plan) : _lead(plan) + n].unflatten(0, heads)


def planned_attention(
    q: Tensor, k: Tensor, v: Tensor, plan: TilePlan, *, scale: float | None = None, dropout_p: float = 0.0
) -> Tensor:
    """Attention of q, k, v (b, h, n, d) restricted to ``plan`` (see :class:`TilePlan`); returns (b, h, n, d).

    With ``dropout_p`` > 0, attention probabilities are dropped (and the rest scaled by 1 / (1 - dropout_p))
    with masks drawn from torch's global generator, so ``torch.manual_seed`` reproduces them."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not fast_path_available(q.device):
        raise ValueError(f"the fast sparse kernels run on CPU only, got tensors on {q.device}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dropout = _Dropout(dropout_p, random_seed()) if dropout_p else _Dropout()
    return _PlannedAttention.apply(q, k, v, plan.to(q.device), scale, dropout)
