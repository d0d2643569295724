import pytest
import torch
from conftest import make_clip, make_dalle, random_images, random_text

from dalle_pytorch.models.sampling import sample, top_k_filter, top_p_filter

CONFIGS = {
    "full": dict(),
    "axial_row": dict(attn_types=("axial_row",)),
    "axial_col": dict(attn_types=("axial_col",)),
    "conv_like": dict(attn_types=("conv_like",), conv_kernel_size=3),
    "sparse": dict(attn_types=("sparse",), sparse_block_size=4),
    "mixed": dict(depth=4, attn_types=("full", "axial_row", "axial_col", "conv_like")),
    "reversible": dict(reversible=True, attn_types=("full", "sparse"), sparse_block_size=4),
    "no_rotary_no_shift": dict(rotary_emb=False, shift_tokens=False),
    "stable_sandwich_tied": dict(stable=True, sandwich_norm=True, share_input_output_emb=True),
    # the original DALLE-pytorch's variants, on a width its token shift splits unevenly (groups of 8, 7, 1)
    "original": dict(
        dim=30,
        depth=3,
        attn_types=("full", "conv_like_corner", "axial_col"),
        conv_kernel_size=3,
        shift_tokens_style="original",
        rotary_emb_style="original",
    ),
    "original_reversible": dict(
        reversible=True,
        attn_types=("conv_like_corner", "axial_row"),
        shift_tokens_style="original",
        rotary_emb_style="original",
    ),
}


def _decode(dalle, use_cache, **kwargs):
    logits = []
    codes = dalle.generate_image_codes(
        kwargs.pop("text"),
        use_cache=use_cache,
        generator=torch.Generator().manual_seed(11),
        step_logits=logits,
        **kwargs,
    )
    return codes, torch.stack(logits)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("mode", ["plain", "guided_primed"])
def test_cached_equals_uncached(name, mode):
    dalle = make_dalle(**CONFIGS[name])
    kwargs = dict(text=random_text(2), filter_thres=0.0)
    if mode == "guided_primed":
        kwargs.update(cond_scale=3.0, img=random_images(2), num_init_img_tokens=5)
    cached_codes, cached_logits = _decode(dalle, True, **dict(kwargs))
    plain_codes, plain_logits = _decode(dalle, False, **dict(kwargs))
    assert torch.equal(cached_codes, plain_codes)
    torch.testing.assert_close(cached_logits, plain_logits, atol=1e-4, rtol=1e-4)
    assert cached_logits.shape[0] == dalle.image_seq_len - kwargs.get("num_init_img_tokens", 0)


def test_priming_keeps_the_first_codes(dalle):
    images = random_images(2)
    codes = dalle.generate_image_codes(random_text(2), img=images, num_init_img_tokens=6)
    assert torch.equal(codes[:, :6], dalle.vae.get_codebook_indices(images)[:, :6])
    default = dalle.generate_image_codes(random_text(2), img=images)
    assert torch.equal(default[:, :7], dalle.vae.get_codebook_indices(images)[:, :7])  # 14/32 of 16


def test_per_sample_generators_make_results_batch_invariant(dalle):
    text = random_text(3)
    seeds = [5, 6, 7]
    batched = dalle.generate_image_codes(text, generator=[torch.Generator().manual_seed(s) for s in seeds])
    for i, seed in enumerate(seeds):
        alone = dalle.generate_image_codes(text[i : i + 1], generator=[torch.Generator().manual_seed(seed)])
        assert torch.equal(alone[0], batched[i])
    reordered = dalle.generate_image_codes(text[[2, 0]], generator=[torch.Generator().manual_seed(s) for s in (7, 5)])
    assert torch.equal(reordered, batched[[2, 0]])


def test_same_seed_same_images_and_clip_scores(dalle):
    clip = make_clip()
    text = random_text(2)
    mask = torch.ones_like(text).bool()
    a, scores = dalle.generate_images(text, mask=mask, clip=clip, generator=torch.Generator().manual_seed(1))
    b = dalle.generate_images(text, mask=mask, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 3, 16, 16) and scores.shape == (2,)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(scores, clip(text, a, text_mask=mask))
    assert dalle.training  # generation restores the training flag


def test_short_text_is_padded_and_long_text_is_an_error_unless_truncated(dalle):
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    text = random_text(1)
    short = text.clone()
    short[:, 4:] = 0
    torch.testing.assert_close(
        dalle.generate_images(short[:, :4], generator=g()), dalle.generate_images(short, generator=g())
    )
    long = random_text(1, length=10)
    with pytest.raises(ValueError, match="truncate_text"):
        dalle.generate_images(long)
    torch.testing.assert_close(
        dalle.generate_images(long, truncate_text=True, generator=g()),
        dalle.generate_images(long[:, :6], generator=g()),
    )


def test_generation_bad_arguments(dalle):
    text = random_text(2)
    with pytest.raises(ValueError, match="filter_thres"):
        dalle.generate_images(text, filter_thres=1.0)
    with pytest.raises(ValueError, match="top_p"):
        dalle.generate_images(text, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        dalle.generate_images(text, temperature=0.0)
    with pytest.raises(ValueError, match="generator list"):
        dalle.generate_images(text, generator=[torch.Generator()])
    with pytest.raises(ValueError, match="num_init_img_tokens"):
        dalle.generate_images(text, img=random_images(2), num_init_img_tokens=16)


class _DigitTokenizer:
    def encode(self, text):
        return [int(c) + 1 for c in text.split()]

    def decode(self, ids):
        return " ".join(str(i - 1) for i in ids)


def test_generate_texts_completes_the_prompt(dalle):
    ids, texts = dalle.generate_texts(_DigitTokenizer(), "3 4", generator=torch.Generator().manual_seed(0))
    assert ids.shape == (1, dalle.text_seq_len) and ids.dtype == torch.long
    assert ids[0, :2].tolist() == [4, 5]
    assert texts[0].startswith("3 4")
    assert ids.max() < dalle.num_text_tokens
    again = dalle.generate_texts(_DigitTokenizer(), "3 4", generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, again[0])
    empty_ids, _ = dalle.generate_texts(_DigitTokenizer(), generator=torch.Generator().manual_seed(0))
    assert empty_ids.shape == (1, dalle.text_seq_len)


def test_top_k_keeps_the_requested_fraction():
    logits = torch.arange(10.0).repeat(2, 1)
    kept = torch.isfinite(top_k_filter(logits, 0.5))
    assert kept.sum(dim=-1).tolist() == [5, 5] and kept[:, 5:].all()
    assert torch.isfinite(top_k_filter(logits, 0.99)).sum() == 2  # at least one per row


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(top_p_filter(probs.log(), 0.75))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(probs.log(), 1.0)).all()


def test_sample_follows_the_distribution_and_never_picks_filtered_tokens():
    logits = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf")]]).repeat(4000, 1)
    tokens = sample(logits, generator=torch.Generator().manual_seed(0))
    assert set(tokens.unique().tolist()) == {0, 2}
    frequency = (tokens == 2).float().mean().item()
    assert abs(frequency - torch.tensor(1.0).exp() / (1 + torch.tensor(1.0).exp())) < 0.03
