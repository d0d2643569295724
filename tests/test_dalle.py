import pytest
import torch
from conftest import NUM_TEXT_TOKENS, TEXT_SEQ_LEN, make_dalle, make_vae, random_images, random_text

ATTN_MIXES = [
    ("full",),
    ("axial_row",),
    ("axial_col",),
    ("conv_like",),
    ("sparse",),
    ("full", "axial_row", "axial_col", "conv_like"),
]


def test_loss_and_logits_shapes(dalle):
    text, images = random_text(2), random_images(2)
    loss = dalle(text, images, return_loss=True)
    assert loss.ndim == 0 and torch.isfinite(loss)
    logits = dalle(text, images)
    total = NUM_TEXT_TOKENS + TEXT_SEQ_LEN + dalle.num_image_tokens
    assert logits.shape == (2, TEXT_SEQ_LEN + dalle.image_seq_len, total)
    # text positions predict text (and padding) tokens only; image positions image codes only
    text_part, image_part = logits[:, :TEXT_SEQ_LEN], logits[:, TEXT_SEQ_LEN:]
    assert torch.isinf(text_part[..., NUM_TEXT_TOKENS + TEXT_SEQ_LEN :]).all()
    assert torch.isfinite(text_part[..., : NUM_TEXT_TOKENS + TEXT_SEQ_LEN]).all()
    assert torch.isinf(image_part[..., : NUM_TEXT_TOKENS + TEXT_SEQ_LEN]).all()
    assert torch.isfinite(image_part[..., NUM_TEXT_TOKENS + TEXT_SEQ_LEN :]).all()
    assert dalle(text).shape == (2, TEXT_SEQ_LEN, total)


def test_loss_is_the_weighted_mean_of_text_and_image_ce(dalle):
    text, images = random_text(2), random_images(2)
    logits = dalle(text, images)
    codes = dalle.vae.get_codebook_indices(images)
    text_ids = dalle._prepare_text(text, None)
    offset = NUM_TEXT_TOKENS + TEXT_SEQ_LEN
    ce_text = torch.nn.functional.cross_entropy(logits[:, :TEXT_SEQ_LEN].transpose(1, 2), text_ids)
    ce_image = torch.nn.functional.cross_entropy(logits[:, TEXT_SEQ_LEN:, offset:].transpose(1, 2), codes)
    expected = (ce_text + 7 * ce_image) / 8
    torch.testing.assert_close(dalle(text, images, return_loss=True), expected)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(reversible=True),
        dict(rotary_emb=False, shift_tokens=False),
        dict(share_input_output_emb=True, stable=True, sandwich_norm=True),
    ],
)
def test_gradients_reach_every_trainable_parameter_and_not_the_vae(options):
    dalle = make_dalle(**options)
    dalle(random_text(2), random_images(2), return_loss=True).backward()
    for name, p in dalle.named_parameters():
        if name.startswith("vae."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
    assert not dalle.vae.training
    dalle.train()
    assert dalle.training and not dalle.vae.training


def test_image_codes_and_pixels_give_the_same_loss(dalle):
    text, images = random_text(2), random_images(2)
    codes = dalle.vae.get_codebook_indices(images)
    torch.testing.assert_close(dalle(text, images, return_loss=True), dalle(text, codes, return_loss=True))


def test_mask_false_means_padding_and_padding_is_per_position(dalle):
    text = random_text(2)
    mask = torch.ones_like(text, dtype=torch.bool)
    mask[:, 3:] = False
    zeroed = text.clone()
    zeroed[:, 3:] = 0
    torch.testing.assert_close(dalle(text, mask=mask), dalle(zeroed))
    ids = dalle._prepare_text(zeroed, None)
    assert ids[0, 3:].tolist() == [NUM_TEXT_TOKENS + i for i in range(3, TEXT_SEQ_LEN)]
    # shorter text is padded on the right
    torch.testing.assert_close(dalle(zeroed[:, :3]), dalle(zeroed))


@pytest.mark.parametrize("attn_types", ATTN_MIXES)
def test_no_position_sees_the_future(attn_types):
    dalle = make_dalle(attn_types=attn_types).eval()
    text, codes = random_text(1), torch.randint(0, 32, (1, 16), generator=torch.Generator().manual_seed(3))
    base = dalle(text, codes)
    for t in [2, TEXT_SEQ_LEN + 5]:  # a text input position and an image input position
        if t < TEXT_SEQ_LEN + 1:
            changed_text = text.clone()
            changed_text[0, t - 1] = (text[0, t - 1] % (NUM_TEXT_TOKENS - 1)) + 1
            out = dalle(changed_text, codes)
        else:
            changed = codes.clone()
            changed[0, t - TEXT_SEQ_LEN - 1] = (codes[0, t - TEXT_SEQ_LEN - 1] + 1) % 32
            out = dalle(text, changed)
        torch.testing.assert_close(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t:], base[:, t:])


def test_deterministic_with_seed():
    a = make_dalle(attn_dropout=0.1, ff_dropout=0.1)
    b = make_dalle(attn_dropout=0.1, ff_dropout=0.1)
    text, images = random_text(2), random_images(2)
    torch.manual_seed(7)
    la = a(text, images, return_loss=True)
    torch.manual_seed(7)
    lb = b(text, images, return_loss=True)
    assert torch.equal(la, lb)


def test_null_cond_prob_one_drops_all_text(dalle):
    text, images = random_text(2), random_images(2)
    null = torch.zeros_like(text)
    torch.testing.assert_close(
        dalle(text, images, return_loss=True, null_cond_prob=1.0), dalle(null, images, return_loss=True)
    )


def test_inputs_are_not_modified(dalle):
    text, images = random_text(2), random_images(2)
    text[:, -1] = 0
    mask = torch.ones_like(text).bool()
    mask[:, -2] = False
    copies = [t.clone() for t in (text, images, mask)]
    dalle(text, images, mask=mask, return_loss=True, null_cond_prob=0.5).backward()
    dalle.generate_images(text, mask=mask, img=images, cond_scale=2.0)
    for original, copy in zip((text, images, mask), copies):
        assert torch.equal(original, copy)


def test_overfits_one_batch():
    dalle = make_dalle()
    text, codes = random_text(2), torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(4))
    opt = torch.optim.Adam([p for p in dalle.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(40):
        loss = dalle(text, codes, return_loss=True)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.2


def test_bad_inputs(dalle):
    text, images = random_text(2), random_images(2)
    with pytest.raises(TypeError, match="integer token ids"):
        dalle(text.float(), images)
    with pytest.raises(ValueError, match=r"text token ids must be in \[0, 20\)"):
        dalle(text + NUM_TEXT_TOKENS, images)
    with pytest.raises(ValueError, match="more than text_seq_len"):
        dalle(random_text(2, length=TEXT_SEQ_LEN + 1), images)
    with pytest.raises(ValueError, match="image must have shape"):
        dalle(text, random_images(2, size=32))
    with pytest.raises(ValueError, match="image must have shape"):
        dalle(text, torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="batch sizes differ"):
        dalle(text, random_images(3))
    with pytest.raises(ValueError, match="image token ids must be in"):
        dalle(text, torch.full((2, 16), 32))
    with pytest.raises(ValueError, match="return_loss=True needs an image"):
        dalle(text, return_loss=True)
    with pytest.raises(ValueError, match="null_cond_prob"):
        dalle(text, images, null_cond_prob=1.5)
    with pytest.raises(TypeError, match="vae must be an image tokenizer"):
        type(dalle)(dim=32, vae=torch.nn.Linear(2, 2), depth=1)
    with pytest.raises(ValueError, match="attn_types"):
        make_dalle(attn_types=("nonsense",))
    with pytest.raises(ValueError, match="shared_attn_ids"):
        make_dalle(attn_types=("full", "axial_row"), shared_attn_ids=(0, 0))


def test_shared_ids_share_weights():
    dalle = make_dalle(depth=4, shared_attn_ids=(0, 1, 0, 1), shared_ff_ids=(0, 0, 0, 0))
    layers = dalle.transformer.layers
    assert layers[0][0].fn is layers[2][0].fn and layers[0][0].fn is not layers[1][0].fn
    assert all(layer[1].fn is layers[0][1].fn for layer in layers)
    dalle(random_text(1), random_images(1), return_loss=True).backward()


def test_derived_tables_are_not_in_the_state_dict():
    dalle = make_dalle(attn_types=("full", "conv_like", "sparse"))
    keys = dalle.state_dict().keys()
    assert not any("mask" in k or "rotary" in k or "shift_sources" in k or "pad_ids" in k for k in keys)


def test_vae_with_other_sizes_sets_sequence_lengths():
    vae = make_vae(image_size=32, num_layers=3)
    dalle = make_dalle(vae=vae)
    assert dalle.image_seq_len == 16 and dalle.fmap == 4
    assert dalle(random_text(1), random_images(1, size=32), return_loss=True).ndim == 0
