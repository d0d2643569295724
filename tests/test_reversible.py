import pytest
import torch
from conftest import make_dalle, random_images, random_text

from dalle_pytorch.models.reversible import ReversibleSequence


def _loss_and_grads(dalle, checkpointing: bool, monkeypatch, seed: int = 3):
    original = ReversibleSequence.__call__
    with monkeypatch.context() as patch:
        patch.setattr(
            ReversibleSequence,
            "__call__",
            lambda self, x, ctx, use_checkpointing=True: original(self, x, ctx, checkpointing),
        )
        torch.manual_seed(seed)
        loss = dalle(random_text(2), random_images(2), return_loss=True)
        dalle.zero_grad()
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in dalle.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("dropout", "shared_attn_ids", "attn_types"),
    [(0.0, None, ("full", "axial_row", "sparse")), (0.2, None, ("full", "axial_row", "sparse")),
     (0.1, (0, 1, 0), ("full", "axial_row"))],
)  # fmt: skip
def test_reversible_gradients_equal_plain_autograd(dropout, shared_attn_ids, attn_types, monkeypatch):
    # the memory-saving backward recomputes each sublayer (replaying dropout) and must match autograd;
    # a weight shared by two layers gets the sum of both layers' gradients
    dalle = make_dalle(
        reversible=True,
        depth=3,
        attn_dropout=dropout,
        ff_dropout=dropout,
        attn_types=attn_types,
        sparse_block_size=4,
        shared_attn_ids=shared_attn_ids,
    )  # the sparse types run their fast kernels, with attention dropout replayed from the global generator
    loss_fast, grads_fast = _loss_and_grads(dalle, True, monkeypatch)
    loss_ref, grads_ref = _loss_and_grads(dalle, False, monkeypatch)
    torch.testing.assert_close(loss_fast, loss_ref)
    for name in grads_ref:
        torch.testing.assert_close(grads_fast[name], grads_ref[name], atol=1e-5, rtol=1e-4, msg=name)


def test_reversible_training_does_not_store_activations_per_layer():
    # with the reversible function, autograd keeps one saved output for the whole stack
    dalle = make_dalle(reversible=True, depth=4)
    x = torch.randn(1, dalle.seq_len, 32, requires_grad=True)
    out = dalle.transformer(x)
    node = out.grad_fn
    names = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n is None or n in names:
            continue
        names.add(n)
        stack.extend(f for f, _ in n.next_functions)
    assert any("ReversibleLayer" in type(n).__name__ for n in names)
    assert not any("ScaledDotProduct" in type(n).__name__ for n in names)


def test_reversible_gradients_through_autograd_grad_and_repeated_backward():
    # the gradients are returned through autograd (not written to .grad behind its back), so
    # torch.autograd.grad sees them, and retain_graph allows a second identical backward
    dalle = make_dalle(reversible=True, depth=2)
    params = [p for p in dalle.parameters() if p.requires_grad]
    torch.manual_seed(0)
    loss = dalle(random_text(2), random_images(2), return_loss=True)
    first = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    second = torch.autograd.grad(loss, params, allow_unused=True)
    assert all(p.grad is None for p in params)
    assert sum(g is not None for g in first) > len(params) // 2
    for a, b in zip(first, second):
        if a is not None:
            torch.testing.assert_close(a, b)
