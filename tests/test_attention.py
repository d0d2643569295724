import pytest
import torch

from dalle_pytorch.attention import attention_mask, causal_mask
from dalle_pytorch.attention.layer import Attention, rotary_tables
from dalle_pytorch.attention.pattern import fast_plan
from dalle_pytorch.attention.patterns import AxialRow

# a grid of 3 x 3 image tokens after 2 text positions: positions 0-1 text, 2-10 image
TEXT, FMAP = 2, 3


def _hand_mask(image_rule):
    """Build a mask from a rule over ((query row, col), (key row, col)) of image positions."""
    n = TEXT + FMAP * FMAP
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(i + 1):
            if j < TEXT:
                mask[i, j] = True
            elif i >= TEXT:
                qi, kj = divmod(i - TEXT, FMAP), divmod(j - TEXT, FMAP)
                mask[i, j] = image_rule(qi, kj)
    return mask


def test_full_is_causal():
    assert torch.equal(attention_mask("full", TEXT, FMAP), causal_mask(TEXT + FMAP * FMAP))


def test_axial_row_by_hand():
    expected = _hand_mask(lambda q, k: q[0] == k[0])
    assert torch.equal(attention_mask("axial_row", TEXT, FMAP), expected)
    # the middle token (row 1, col 1) at position 2 + 4 sees text and (1, 0), (1, 1)
    assert attention_mask("axial_row", TEXT, FMAP)[6].nonzero().flatten().tolist() == [0, 1, 5, 6]


def test_axial_col_by_hand():
    expected = _hand_mask(lambda q, k: q[1] == k[1])
    assert torch.equal(attention_mask("axial_col", TEXT, FMAP), expected)
    assert attention_mask("axial_col", TEXT, FMAP)[6].nonzero().flatten().tolist() == [0, 1, 3, 6]


def test_conv_like_by_hand():
    expected = _hand_mask(lambda q, k: abs(q[0] - k[0]) <= 1 and abs(q[1] - k[1]) <= 1)
    got = attention_mask("conv_like", TEXT, FMAP, kernel_size=3)
    assert torch.equal(got, expected)
    # bottom-right token (2, 2) sees text, (1, 1), (1, 2), (2, 1), (2, 2)
    assert got[10].nonzero().flatten().tolist() == [0, 1, 6, 7, 9, 10]


def test_conv_like_dilation():
    got = attention_mask("conv_like", 1, 5, kernel_size=3, dilation=2)
    # token (4, 4) = position 1 + 24 sees text, (2, 2), (2, 4), (4, 2), (4, 4)
    assert got[25].nonzero().flatten().tolist() == [0, 1 + 12, 1 + 14, 1 + 22, 25]


def test_sparse_layout():
    n = 3 + 16
    mask = attention_mask("sparse", 3, 4, sparse_block_size=4, sparse_num_local_blocks=2, sparse_num_random_blocks=0)
    block = torch.arange(n) // 4
    for i in range(n):
        for j in range(n):
            local = 0 <= block[i] - block[j] < 2
            text_block = block[j] == 0  # holds the text positions 0-2
            assert mask[i, j] == (j <= i and (local or text_block)), (i, j)
    with_random = attention_mask(
        "sparse", 3, 4, sparse_block_size=4, sparse_num_local_blocks=1, sparse_num_random_blocks=1
    )
    assert torch.equal(with_random, with_random.tril())
    assert torch.equal(
        with_random,
        attention_mask("sparse", 3, 4, sparse_block_size=4, sparse_num_local_blocks=1, sparse_num_random_blocks=1),
    )


@pytest.mark.parametrize("attn_type", ["full", "axial_row", "axial_col", "conv_like", "sparse"])
def test_no_position_sees_the_future_and_everyone_sees_itself(attn_type):
    mask = attention_mask(attn_type, 4, 5, kernel_size=3, sparse_block_size=3)
    assert not mask.triu(diagonal=1).any()
    assert mask.diagonal().all()
    assert mask[4:, :4].all()  # every image token sees all text


def test_bad_options():
    with pytest.raises(ValueError, match="attn_type"):
        attention_mask("diagonal", 2, 2)
    with pytest.raises(ValueError, match="kernel_size"):
        attention_mask("conv_like", 2, 3, kernel_size=4)
    with pytest.raises(ValueError, match="dilation"):
        attention_mask("conv_like", 2, 3, dilation=0)


def test_causal_fast_path_equals_dense_mask():
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8)
    x = torch.randn(2, 7, 16, requires_grad=True)
    fast = attn(x, causal=True)
    (grad_fast,) = torch.autograd.grad(fast.sum(), x)
    dense = attn(x, causal_mask(7))
    (grad_dense,) = torch.autograd.grad(dense.sum(), x)
    torch.testing.assert_close(fast, dense)
    torch.testing.assert_close(grad_fast, grad_dense)


def test_attention_equals_explicit_softmax():
    torch.manual_seed(0)
    attn = Attention(8, heads=2, dim_head=4, stable=True)
    x = torch.randn(1, 5, 8)
    mask = attention_mask("axial_row", 1, 2)
    q, k, v = attn.to_qkv(x).view(1, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) / 2.0
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    expected = attn.to_out((weights @ v).transpose(1, 2).reshape(1, 5, 8))
    torch.testing.assert_close(attn(x, mask), expected)


@pytest.mark.parametrize("attn_type", ["full", "axial_row"])
def test_rotary_attention_does_not_keep_the_whole_qkv_projection_for_backward(attn_type):
    # with rotary, q and k are new tensors: the kernels keep v, which must not hold on to the (b, n, 3 * inner)
    # projection through a view
    attn = Attention(16, heads=2, dim_head=8)
    text_len, fmap = 3, 4
    n = text_len + fmap * fmap - 1
    rotary = rotary_tables(torch.randn(n, 8), 8)
    x = torch.randn(2, n, 16, requires_grad=True)
    plan = fast_plan(AxialRow(), text_len, fmap, n) if attn_type != "full" else None
    mask = None if plan is None else attention_mask(attn_type, text_len, fmap)[:n, :n]
    sizes = []

    def pack(t):
        sizes.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = attn(x, mask, causal=plan is None, rotary=rotary, plan=plan)
    qkv_bytes = 2 * n * 3 * 16 * 4
    assert sizes and max(sizes) < qkv_bytes
    out.sum().backward()  # and the gradients still flow
    assert x.grad is not None and torch.isfinite(x.grad).all()
