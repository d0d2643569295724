"""Attention with dropout that keeps no (n x n) matrix for the backward pass, for the CPU.

``F.scaled_dot_product_attention`` with ``dropout_p > 0`` runs, on CPU, the reference ("math") path, which
stores the attention probabilities and the dropout mask of every layer for the backward pass: 1.3 GB per
layer for the README's full-size DALLE (batch 4, 16 heads, 1280 positions), more than a 24 GB machine holds
at depth 12. Here queries are processed in chunks; a layer keeps q, k, v, the output, the log-sum-exp of
each row and one random seed, and the backward pass recomputes each chunk's probabilities and dropout mask
(the recomputation of FlashAttention, Dao et al. 2022, https://arxiv.org/abs/2205.14135, with dropout
replayed from the seed instead of stored).

With A = dropout(P) = P * keep / (1 - p) and O = A V, the gradients are dV = A^T dO, dA = dO V^T,
dP = dA * keep / (1 - p) and dS = P * (dP - rowsum(dO * O)) (since rowsum(dP * P) = rowsum(dO * O)).

Shape letters: b batch, h heads, i query positions (a chunk: c), j key positions, d head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

_CHUNK_ELEMENTS = 1 << 22  # scores per query chunk (16 MB in fp32): bounds the memory of one chunk
# below this size of one layer's (b, h, n, n) probabilities, PyTorch's dense kernel is faster and what it
# keeps is small; above it the chunked kernel is faster too (whole DALLE steps, dim 256, 2 threads: dense
# 1.12x faster at 10 MB, chunked 1.20x faster at 34 MB and 1.21x at 50 MB)
DENSE_PROBABILITIES_LIMIT = 16 << 20  # bytes


def saves_memory(q: Tensor, k: Tensor) -> bool:
    """Whether the dense kernel's probabilities for q (b, h, i, d) and k (b, h, j, d) exceed
    :data:`DENSE_PROBABILITIES_LIMIT`, so that :func:`dropout_attention` is worth its recomputation."""
    return q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.element_size() > DENSE_PROBABILITIES_LIMIT


def _chunk_len(q: Tensor, num_keys: int) -> int:
    batch_heads = q.shape[0] * q.shape[1]
    return max(1, min(q.shape[2], _CHUNK_ELEMENTS // max(1, batch_heads * num_keys)))


def _chunk_mask(mask: Tensor | None, causal: bool, start: int, end: int, num_keys: int, device) -> Tensor | None:
    """Boolean (..., c, j) mask of queries [start, end), True = may attend; None = all keys."""
    if causal:  # top-left aligned, as F.scaled_dot_product_attention(is_causal=True)
        rows = torch.arange(start, end, device=device)[:, None]
        return torch.arange(num_keys, device=device)[None, :] <= rows
    if mask is None:
        return None
    return mask[..., start:end, :] if mask.shape[-2] != 1 else mask


def keep_mask(shape: tuple[int, ...], dropout_p: float, seed: int, chunk_index: int, device) -> Tensor:
    """The dropout keep mask (bool, ``shape``) of one query chunk: a pure function of (seed, chunk), so the
    backward pass draws the same one again."""
    generator = torch.Generator(device=device).manual_seed((seed * 1_000_003 + chunk_index) % (2**63))
    return torch.rand(shape, generator=generator, device=device) >= dropout_p


def _probabilities(q, k, mask, causal, scale, start, end, lse=None) -> tuple[Tensor, Tensor]:
    """Scores of queries [start, end): softmax probabilities (..., c, j) and log-sum-exp (..., c).

    With ``causal``, only the keys [0, end) are scored (later ones are masked for every query of the chunk),
    so j = min(end, keys). Given ``lse`` (the queries' log-sum-exp over a larger key set), the probabilities
    are those of that softmax restricted to these keys."""
    num_keys = min(end, k.shape[2]) if causal else k.shape[2]
    scores = torch.matmul(q[:, :, start:end] * scale, k[:, :, :num_keys].transpose(-1, -2))
    allowed = _chunk_mask(mask, causal, start, end, num_keys, q.device)
    if allowed is not None:
        scores.masked_fill_(~allowed, float("-inf"))
    if lse is not None:
        return scores.sub_(lse[:, :, start:end, None]).exp_(), lse[:, :, start:end]
    # the softmax in place (logsumexp would copy the scores twice more)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max.masked_fill_(torch.isinf(row_max), 0.0)  # a row that sees no key: probabilities 0, log-sum-exp 0
    probs = scores.sub_(row_max).exp_()
    total = probs.sum(dim=-1, keepdim=True)
    probs.div_(total.clamp_min(torch.finfo(total.dtype).tiny))
    return probs, (row_max + total.log()).squeeze(-1).masked_fill_(total.squeeze(-1) == 0, 0.0)


def dropout_forward(q, k, v, mask, causal: bool, dropout_p: float, scale: float, seed: int):
    """(output, log-sum-exp) of attention with dropout; q (x, y, i, d), k and v (x, y, j, d), ``mask``
    broadcastable to (x, y, i, j). A row that sees no key gets output 0 and log-sum-exp 0."""
    # (x, i, y, d) in memory, as PyTorch's kernels: DALLE's "b h n d -> b n (h d)" of the output is then a view
    out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1]).transpose(1, 2)
    lse = q.new_empty(q.shape[:3])
    chunk = _chunk_len(q, k.shape[2])
    for index, start in enumerate(range(0, q.shape[2], chunk)):
        end = min(start + chunk, q.shape[2])
        probs, lse[:, :, start:end] = _probabilities(q, k, mask, causal, scale, start, end)
        dropped = probs.masked_fill_(~keep_mask(probs.shape, dropout_p, seed, index, q.device), 0.0)
        # the 1 / (1 - p) of the kept probabilities, applied to the (c, d) output rather than the (c, j) scores
        out[:, :, start:end] = torch.matmul(dropped, v[:, :, : probs.shape[-1]]).mul_(1.0 / (1.0 - dropout_p))
    return out, lse


def dropout_backward(grad_out, q, k, v, out, lse, mask, causal: bool, dropout_p: float, scale: float, seed: int):
    """Gradients (dq, dk, dv) of :func:`dropout_forward` with the same seed. For any (out, lse) it returns
    the gradients through P = exp(q k^T scale - lse) and dS = P (dP - rowsum(dO * out)): given the output and
    log-sum-exp of a softmax over a larger key set, exactly these keys' share (as the fused kernel's)."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    row_dot = (grad_out * out).sum(-1, keepdim=True)  # rowsum(dO * O): (..., i, 1)
    inverse_keep = 1.0 / (1.0 - dropout_p)
    chunk = _chunk_len(q, k.shape[2])
    for index, start in enumerate(range(0, q.shape[2], chunk)):
        end = min(start + chunk, q.shape[2])
        probs, _ = _probabilities(q, k, mask, causal, scale, start, end, lse)
        j = probs.shape[-1]
        kept = probs.masked_fill(~keep_mask(probs.shape, dropout_p, seed, index, q.device), 0.0)  # P * keep
        d_out = grad_out[:, :, start:end] * inverse_keep  # the 1 / (1 - p) of A = P * keep / (1 - p), on (c, d)
        dv[:, :, :j] += torch.matmul(kept.transpose(-1, -2), d_out)  # dV = A^T dO
        # dS = P * (dA * keep / (1 - p) - rowsum(dO * O)) = dO' V^T * (P * keep) - P * rowsum(dO * O)
        d_scores = torch.matmul(d_out, v[:, :, :j].transpose(-1, -2)).mul_(kept)
        d_scores = d_scores.sub_(probs.mul_(row_dot[:, :, start:end]))
        dq[:, :, start:end] = torch.matmul(d_scores, k[:, :, :j]).mul_(scale)
        dk[:, :, :j] += torch.matmul(d_scores.transpose(-1, -2), q[:, :, start:end]).mul_(scale)
    return dq, dk, dv


class _DropoutAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, causal: bool, dropout_p: float, scale: float, seed: int):
        out, lse = dropout_forward(q, k, v, mask, causal, dropout_p, scale, seed)
        ctx.save_for_backward(q, k, v, out, lse, *([mask] if mask is not None else []))
        ctx.causal, ctx.dropout_p, ctx.scale, ctx.seed = causal, dropout_p, scale, seed
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        mask = rest[0] if rest else None
        grads = dropout_backward(grad_out, q, k, v, out, lse, mask, ctx.causal, ctx.dropout_p, ctx.scale, ctx.seed)
        return (*grads, None, None, None, None, None)


def random_seed() -> int:
    """A dropout seed drawn from torch's global generator, so that ``torch.manual_seed`` (and the replay of
    the random state by reversible layers) reproduces the masks."""
    return int(torch.randint(0, 2**62, (), device="cpu"))


def dropout_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    causal: bool = False,
    dropout_p: float,
    scale: float | None = None,
    seed: int | None = None,
) -> Tensor:
    """softmax(q k^T * scale, masked) with dropout, times v; q, k, v (b, h, n, d) -> (b, h, n, d).

    ``mask``: bool, broadcastable to (b, h, n, keys), True = may attend (not combined with ``causal``).
    ``seed`` fixes the dropout masks; by default it is drawn from torch's global generator, so
    ``torch.manual_seed`` (and the replay of the random state by reversible layers) reproduces them.
    """
    if not 0.0 < dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in (0, 1), got {dropout_p}")
    if causal and mask is not None:
        raise ValueError("give either causal=True or a mask, not both")
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if seed is None:
        seed = random_seed()
    return _DropoutAttention.apply(q, k, v, mask, causal, dropout_p, scale, seed)
