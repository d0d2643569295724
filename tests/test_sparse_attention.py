import pytest
import torch
import torch.nn.functional as F
from conftest import make_dalle, random_images, random_text

from dalle_pytorch.attention.layer import Attention
from dalle_pytorch.attention.pattern import fast_plan
from dalle_pytorch.attention.patterns import (
    AxialCol,
    AxialRow,
    BlockSparse,
    ConvLike,
    ConvLikeCorner,
    Full,
    pattern_attention,
)
from dalle_pytorch.kernels import sparse_attention
from dalle_pytorch.kernels.sparse_attention import fast_path_available
from dalle_pytorch.kernels.tile_plans import Window, axial_plan, conv_like_plan

CASES = {  # name: a pattern with small options so that tiny grids still have several windows / blocks
    "axial_row": AxialRow(),
    "axial_col": AxialCol(),
    "conv_3x3": ConvLike(kernel_size=3),
    "conv_5x5_dilated": ConvLike(kernel_size=5, dilation=2),
    "conv_1x1": ConvLike(kernel_size=1),
    "conv_corner_3x3": ConvLikeCorner(kernel_size=3),
    "conv_corner_5x5_dilated": ConvLikeCorner(kernel_size=5, dilation=2),
    "sparse": BlockSparse(block_size=3, num_local_blocks=2, num_random_blocks=1),
    "sparse_random": BlockSparse(block_size=4, num_local_blocks=1, num_random_blocks=3, seed=5),
}


def _lengths(text_len: int, fmap: int) -> list[int]:
    """Text only, exactly the text, one image token, a partial row, DALLE's input (all but the last), all."""
    full = text_len + fmap * fmap
    return sorted({1, text_len, text_len + 1, text_len + fmap + 1, full - 1, full} - {0, full + 1})


def _reference_and_fast(pattern, q, k, v, text_len, fmap, scale=None):
    n = q.shape[2]
    mask = pattern.mask(text_len, fmap)[:n, :n]
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    reference = F.scaled_dot_product_attention(*leaves, attn_mask=mask, scale=scale)
    grad = torch.randn_like(reference)
    reference_grads = torch.autograd.grad(reference, leaves, grad)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    fast = pattern_attention(pattern, *leaves, text_len, fmap, scale=scale)
    fast_grads = torch.autograd.grad(fast, leaves, grad)
    return (reference, *reference_grads), (fast, *fast_grads)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("text_len, fmap", [(1, 1), (2, 3), (5, 4), (7, 5), (3, 2)])
def test_fast_kernel_equals_sdpa_with_the_dense_mask(case, text_len, fmap):
    generator = torch.Generator().manual_seed(text_len * 10 + fmap)
    for n in _lengths(text_len, fmap):
        q, k, v = torch.randn(3, 2, 3, n, 8, dtype=torch.float64, generator=generator)  # batch 2, 3 heads
        expected, got = _reference_and_fast(CASES[case], q, k, v, text_len, fmap)
        for name_, e, g in zip(("out", "dq", "dk", "dv"), expected, got):
            torch.testing.assert_close(g, e, msg=lambda m, n=n, x=name_: f"{x} at n={n}: {m}")


@pytest.mark.parametrize(
    "text_len, fmap, pattern",
    [
        (17, 12, BlockSparse(block_size=16, num_local_blocks=4, num_random_blocks=2)),  # defaults
        (5, 10, BlockSparse(block_size=4, num_local_blocks=1, num_random_blocks=3, seed=5)),
    ],
)
def test_sparse_random_blocks_band_including_queries_without_random_blocks(text_len, fmap, pattern):
    full = text_len + fmap * fmap
    plan = pattern.tile_plan(text_len, fmap, full - 1)
    gathered = [band for band in plan.bands if not isinstance(band, Window)]
    assert gathered and not gathered[0].mask.any(-1).all()  # a gathered band, with rows that see none of it
    generator = torch.Generator().manual_seed(fmap)
    for n in (full - 1, full, full - fmap - 3):
        q, k, v = torch.randn(3, 2, 2, n, 8, dtype=torch.float64, generator=generator)
        expected, got = _reference_and_fast(pattern, q, k, v, text_len, fmap)
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e)


@pytest.mark.parametrize("pattern", [AxialRow(), AxialCol(), ConvLike(), ConvLikeCorner(), BlockSparse(block_size=4)])
def test_float32_with_a_custom_scale_and_the_dalle_text_length(pattern):
    # 17 text positions (16 tokens + BOS) on a 6 x 6 grid; DALLE's input stops one token short
    text_len, fmap = 17, 6
    q, k, v = torch.randn(3, 2, 4, text_len + fmap * fmap - 1, 16, generator=torch.Generator().manual_seed(0))
    expected, got = _reference_and_fast(pattern, q, k, v, text_len, fmap, scale=0.3)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


def test_inputs_are_not_modified():
    q, k, v = torch.randn(3, 1, 2, 12, 8)
    copies = [x.clone() for x in (q, k, v)]
    pattern_attention(ConvLike(kernel_size=3), q, k, v, 3, 3)
    for x, y in zip((q, k, v), copies):
        assert torch.equal(x, y)


PLANS = [
    axial_plan(5, 4, 20, "row"),
    axial_plan(5, 4, 20, "col"),
    conv_like_plan(5, 4, 20, 3, 1),
    conv_like_plan(5, 4, 20, 5, 2),
    BlockSparse(3, 2, 1, 0).tile_plan(5, 4, 20),
]


@pytest.mark.parametrize("plan", PLANS)
def test_plans_tile_every_later_position_once_and_window_pieces_never_overlap(plan):
    n = 20
    assert plan.region_len >= n - plan.prefix_len
    for band in plan.bands:
        tiling = band.tiling
        t, i = torch.arange(tiling.num_tiles)[:, None], torch.arange(tiling.tile_len)[None, :]
        queries = (t * tiling.tile_step + i * tiling.query_step).flatten()
        assert sorted(queries.tolist()) == list(range(plan.region_len))  # each padded region position once
        assert band.mask is None or band.mask.shape[-2:] == (tiling.tile_len, band.mask.shape[-1])
        if isinstance(band, Window):  # the backward adds each piece's gradients in place
            assert plan.front + band.start >= 0 and band.length % band.piece == 0
            for first in range(0, band.length, band.piece):
                j = torch.arange(first, first + band.piece)[None, :]
                keys = (band.start + t * tiling.tile_step + j * band.key_step).flatten()
                assert keys.unique().numel() == keys.numel()


def test_sparse_bands_are_few_keys_per_query():
    plan = BlockSparse(16, 4, 2, 0).tile_plan(257, 32, 257 + 1023)
    assert plan.prefix_len == 17 * 16  # the blocks holding text
    window, gathered = plan.bands
    assert window.length == (3 + window.tiling.tile_len // 16) * 16  # 3 local blocks before the tile + its own
    assert gathered.tiling.tile_len == 16 and gathered.block_index.shape[1] <= 2  # a block's random blocks


def test_bad_input():
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="same shape"):
        pattern_attention("axial_row", q, q[:, :1], q, 1, 3)
    with pytest.raises(ValueError, match="more than text_len"):
        pattern_attention("axial_row", q, q, q, 1, 2)
    with pytest.raises(ValueError, match="no fast path"):
        pattern_attention(Full(), q, q, q, 1, 3)
    with pytest.raises(ValueError, match="attn_types"):
        pattern_attention("diagonal", q, q, q, 1, 3)
    with pytest.raises(ValueError, match="kernel_size"):
        pattern_attention(ConvLike(kernel_size=2), q, q, q, 1, 3)
    with pytest.raises(ValueError, match="axis"):
        axial_plan(1, 3, 10, "diagonal")
    with pytest.raises(ValueError, match="dropout_p"):
        pattern_attention("axial_row", q, q, q, 1, 3, dropout_p=1.0)
    assert fast_path_available(torch.device("cpu"))
    assert fast_path_available(torch.device("cpu"), dropout_p=0.1)
    assert not fast_path_available(torch.device("cpu"), dropout_p=1.0)
    assert not fast_path_available(torch.device("meta"))


class _Counter:
    """Counts the calls of ``owner.name`` (by default the planned kernel, i.e. every fast-path call)."""

    def __init__(self, monkeypatch, owner=sparse_attention._PlannedAttention, name="apply"):
        self.calls = 0
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("text_len, fmap", [(2, 3), (5, 4)])
def test_dropout_equals_the_dense_reference_with_the_kernels_own_masks(case, text_len, fmap, monkeypatch):
    # The kernel draws its dropout masks itself. With v = identity (dim_head = n) its output *is* the dropped
    # probability matrix P * keep / (1 - p), which reveals keep; a second call from the same random state with
    # random v must then equal dense attention with that keep, outputs and gradients.
    dropout_kernel = _Counter(monkeypatch, sparse_attention, "dropout_forward")
    pattern = CASES[case]
    dropout_p = 0.4
    for n in sorted({text_len + fmap + 1, text_len + fmap * fmap - 1}):
        generator = torch.Generator().manual_seed(n)
        q, k, v = torch.randn(3, 2, 3, n, n, dtype=torch.float64, generator=generator)
        allowed = pattern.mask(text_len, fmap)[:n, :n]
        dense_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        scores = (dense_leaves[0] @ dense_leaves[1].transpose(-1, -2)) * n**-0.5
        dense_probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        probs = dense_probs.detach()

        torch.manual_seed(7)
        dropped = pattern_attention(pattern, q, k, torch.eye(n).double().expand_as(q), text_len, fmap,
                                    dropout_p=dropout_p)  # fmt: skip
        keep = dropped != 0
        assert not keep[..., ~allowed].any()  # nothing outside the pattern
        torch.testing.assert_close(dropped[keep], (probs / (1 - dropout_p))[keep])  # kept entries scaled
        assert 0 < keep.sum() < allowed.sum() * q.shape[0] * q.shape[1]  # some dropped, some kept

        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        torch.manual_seed(7)
        fast = pattern_attention(pattern, *leaves, text_len, fmap, dropout_p=dropout_p)
        grad = torch.randn_like(fast)
        fast_grads = torch.autograd.grad(fast, leaves, grad)
        dense = (dense_probs * keep / (1 - dropout_p)) @ dense_leaves[2]
        dense_grads = torch.autograd.grad(dense, dense_leaves, grad)
        torch.testing.assert_close(fast, dense)
        for name_, e, g in zip(("dq", "dk", "dv"), dense_grads, fast_grads):
            torch.testing.assert_close(g, e, msg=lambda m, n=n, x=name_: f"{x} at n={n}: {m}")
    assert dropout_kernel.calls  # the dropout kernel ran (not a dropout-free path)


def test_dropout_masks_come_from_the_global_generator():
    q, k, v = torch.randn(3, 1, 2, 3 + 16 - 1, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    first = pattern_attention("conv_like", q, k, v, 3, 4, dropout_p=0.3)
    second = pattern_attention("conv_like", q, k, v, 3, 4, dropout_p=0.3)
    torch.manual_seed(1)
    torch.testing.assert_close(pattern_attention("conv_like", q, k, v, 3, 4, dropout_p=0.3), first)
    assert not torch.equal(first, second)


# ---------------------------------------------------------------------------------------------------------
# Dispatch: Attention and DALLE use the fast kernels for full-sequence passes only, with the same results
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stable", [False, True])
def test_attention_module_pattern_equals_mask(stable, monkeypatch):
    torch.manual_seed(0)
    counter = _Counter(monkeypatch)
    attn = Attention(16, heads=2, dim_head=8, stable=stable)
    text_len, fmap = 3, 4
    n = text_len + fmap * fmap - 1
    plan = fast_plan(ConvLike(kernel_size=3), text_len, fmap, n)
    mask = ConvLike(kernel_size=3).mask(text_len, fmap)[:-1, :-1]
    x = torch.randn(2, n, 16, requires_grad=True)
    fast = attn(x, mask, plan=plan)
    (grad_fast,) = torch.autograd.grad(fast.square().sum(), x)
    assert counter.calls == 1
    dense = attn(x, mask)
    (grad_dense,) = torch.autograd.grad(dense.square().sum(), x)
    torch.testing.assert_close(fast, dense)
    torch.testing.assert_close(grad_fast, grad_dense)


def test_attention_dropout_takes_the_fast_path_in_training_only(monkeypatch):
    counter = _Counter(monkeypatch)
    attn = Attention(16, heads=2, dim_head=8, dropout=0.5).train()
    plan = fast_plan(AxialRow(), 2, 3, 11)
    x = torch.randn(1, 11, 16)
    mask = AxialRow().mask(2, 3)
    torch.manual_seed(3)
    dropped = attn(x, mask, plan=plan)
    assert counter.calls == 1
    attn.eval()
    torch.testing.assert_close(attn(x, mask, plan=plan), attn(x, mask))
    assert counter.calls == 2
    assert not torch.allclose(dropped, attn(x, mask))  # training dropped some probabilities


DALLE_CONFIGS = {
    "axial_row": dict(attn_types=("axial_row",)),
    "axial_col": dict(attn_types=("axial_col",)),
    "conv_like": dict(attn_types=("conv_like",), conv_kernel_size=3),
    "sparse": dict(attn_types=("sparse",), sparse_block_size=4, sparse_num_local_blocks=2),
    "mixed_stable": dict(depth=4, attn_types=("full", "axial_row", "axial_col", "sparse"), stable=True),
    "reversible": dict(reversible=True, attn_types=("conv_like", "axial_col"), conv_dilation=2),
    "original_variants": dict(
        attn_types=("conv_like_corner", "axial_row"), shift_tokens_style="original", rotary_emb_style="original"
    ),
}


@pytest.mark.parametrize("name", list(DALLE_CONFIGS))
def test_dalle_loss_and_gradients_equal_with_and_without_the_fast_path(name, monkeypatch):
    counter = _Counter(monkeypatch)
    dalle = make_dalle(**DALLE_CONFIGS[name])
    text, images = random_text(2), random_images(2)

    def loss_and_grads(fast: bool):
        dalle.transformer.fast_path = fast
        dalle.zero_grad(set_to_none=True)
        loss = dalle(text, images, return_loss=True)
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in dalle.named_parameters() if p.grad is not None}

    fast_loss, fast_grads = loss_and_grads(True)
    sparse_layers = sum(not isinstance(p, Full) for p in dalle.transformer.layer_patterns)
    assert counter.calls >= sparse_layers  # the fast kernels ran (reversible runs them again in backward)
    calls = counter.calls
    dense_loss, dense_grads = loss_and_grads(False)
    assert counter.calls == calls
    torch.testing.assert_close(fast_loss, dense_loss)
    assert fast_grads.keys() == dense_grads.keys()
    for key in dense_grads:
        torch.testing.assert_close(fast_grads[key], dense_grads[key], atol=1e-5, rtol=1e-4, msg=key)


def test_text_only_and_cached_passes(monkeypatch):
    counter = _Counter(monkeypatch)
    dalle = make_dalle(attn_types=("axial_row", "sparse"), sparse_block_size=4).eval()
    text = random_text(2)
    fast = dalle(text)  # text only: shorter than text_len + fmap ** 2
    dalle.transformer.fast_path = False
    torch.testing.assert_close(fast, dalle(text))
    assert counter.calls == 2
    dalle.transformer.fast_path = True
    dalle.generate_image_codes(text[:1], filter_thres=0.0)  # cached decoding never takes the fast path
    assert counter.calls == 2
