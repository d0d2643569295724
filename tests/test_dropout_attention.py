"""Chunked attention with dropout: the same maths as the dense reference, gradients exact, no (n x n) saved."""

import pytest
import torch

from dalle_pytorch.attention import causal_mask
from dalle_pytorch.attention.layer import Attention
from dalle_pytorch.kernels import dropout_attention as module
from dalle_pytorch.kernels.dropout_attention import dropout_attention, keep_mask


def _reference(q, k, v, allowed, dropout_p, scale, seed, chunk, causal=False):
    """Dense attention with the kernel's keep masks, chunk by chunk, through plain autograd. A causal chunk
    of queries [start, end) draws masks for the keys [0, end) only."""
    scores = (q @ k.transpose(-1, -2)) * scale
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    n, keeps = k.shape[2], []
    for index, start in enumerate(range(0, q.shape[2], chunk)):
        shape = probs[:, :, start : start + chunk].shape
        keys = min(start + chunk, n) if causal else n
        keep = keep_mask((*shape[:-1], keys), dropout_p, seed, index, q.device)
        keeps.append(torch.nn.functional.pad(keep, (0, n - keys)))
    return (probs * torch.cat(keeps, dim=2) / (1 - dropout_p)) @ v


def _qkv(n=11, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, n, 8, generator=generator, dtype=dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("chunk_elements", [1 << 22, 2 * 3 * 11 * 4])  # one chunk; chunks of 4 queries
@pytest.mark.parametrize("kind", ["causal", "mask"])
def test_equals_dense_reference_with_the_same_dropout(kind, chunk_elements, monkeypatch):
    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", chunk_elements)
    q, k, v = _qkv()
    n = q.shape[2]
    allowed = causal_mask(n) & (torch.rand(n, n, generator=torch.Generator().manual_seed(1)) > 0.3)
    allowed |= torch.eye(n, dtype=torch.bool)
    if kind == "causal":
        allowed = causal_mask(n)
    out = dropout_attention(
        q, k, v, None if kind == "causal" else allowed, causal=kind == "causal", dropout_p=0.3, seed=5
    )
    chunk = module._chunk_len(q, n)
    expected = _reference(q, k, v, allowed, 0.3, 8**-0.5, 5, chunk, causal=kind == "causal")
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_gradcheck_in_double_precision(monkeypatch):
    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 2 * 3 * 5 * 2)  # several chunks
    q, k, v = _qkv(n=5, dtype=torch.double)
    fn = lambda q, k, v: dropout_attention(q, k, v, causal=True, dropout_p=0.25, seed=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_no_square_matrix_is_kept_for_backward():
    q, k, v = _qkv(n=64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        dropout_attention(q, k, v, causal=True, dropout_p=0.1).sum()
    assert saved and max(saved) <= q.numel()  # q, k, v, output, log-sum-exp


def test_seed_comes_from_the_global_generator_and_dropout_is_unbiased():
    q, k, v = (t.detach() for t in _qkv(n=6))
    torch.manual_seed(0)
    first = dropout_attention(q, k, v, causal=True, dropout_p=0.5)
    torch.manual_seed(0)
    assert torch.equal(first, dropout_attention(q, k, v, causal=True, dropout_p=0.5))
    assert not torch.equal(first, dropout_attention(q, k, v, causal=True, dropout_p=0.5))
    mean = torch.stack([dropout_attention(q, k, v, causal=True, dropout_p=0.5) for _ in range(2000)]).mean(0)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(mean, exact, atol=0.1, rtol=0)


def test_bad_input():
    q, k, v = _qkv(n=4)
    with pytest.raises(ValueError, match="dropout_p"):
        dropout_attention(q, k, v, dropout_p=0.0)
    with pytest.raises(ValueError, match="causal"):
        dropout_attention(q, k, v, causal_mask(4), causal=True, dropout_p=0.1)
    with pytest.raises(TypeError, match="mask"):
        dropout_attention(q, k, v, torch.ones(4, 4), dropout_p=0.1)


@pytest.mark.parametrize("limit", [0, 1 << 40])
def test_attention_module_uses_the_chunked_kernel_only_for_large_probabilities(limit, monkeypatch):
    # above the limit the module's result is the chunked kernel's, below it PyTorch's dense kernel's
    monkeypatch.setattr(module, "DENSE_PROBABILITIES_LIMIT", limit)
    attention = Attention(dim=16, heads=2, dim_head=8, dropout=0.3).train()
    x = torch.randn(2, 9, 16)
    torch.manual_seed(0)
    out = attention(x, causal=True)
    q, k, v = attention.to_qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4).unbind(0)
    torch.manual_seed(0)
    if limit == 0:
        expected = dropout_attention(q, k, v, causal=True, dropout_p=0.3)
    else:
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)
    torch.testing.assert_close(out, attention.to_out(expected.transpose(1, 2).flatten(2)))
    assert module.saves_memory(q, k) == (limit == 0)
