"""The decoder U-Net: shapes, conditioning (null conditions, text padding), batch independence, gradients, errors."""

import pytest
import torch

from dalle_pytorch.diffusion.unet import Unet

EMBED_DIM, TEXT_DIM = 16, 12


def make_unet(**overrides) -> Unet:
    torch.manual_seed(0)
    config = dict(dim=8, image_embed_dim=EMBED_DIM, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)
    return Unet(**{**config, **overrides}).eval()


def inputs(batch: int = 3, size: int = 8, seed: int = 0, channels: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.randint(0, 100, (batch,), generator=g)
    embed = torch.randn(batch, EMBED_DIM, generator=g)
    text = torch.randn(batch, 5, TEXT_DIM, generator=g)
    text_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)[:batch]
    return x, t, embed, text, text_mask


def test_output_shape_for_every_variant():
    x, t, embed, text, text_mask = inputs(size=16)
    assert make_unet()(x, t, image_embed=embed).shape == x.shape
    unet = make_unet(cond_on_text_encodings=True, text_embed_dim=TEXT_DIM, lowres_cond=True, predict_x0=True,
                     dim_mults=(1, 2, 2), layer_attns=(False, True, True), num_resnet_blocks=2)  # fmt: skip
    out = unet(x, t, image_embed=embed, text_encodings=text, text_mask=text_mask, lowres_cond_img=x.flip(0),
               lowres_noise_level=t.flip(0))  # fmt: skip
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    latent = make_unet(channels=5)
    assert latent(torch.randn(2, 5, 8, 8), t[:2], image_embed=embed[:2]).shape == (2, 5, 8, 8)


def test_batch_rows_are_independent():
    unet = make_unet(cond_on_text_encodings=True, text_embed_dim=TEXT_DIM)
    x, t, embed, text, text_mask = inputs()
    keep = torch.tensor([True, False, True])
    batched = unet(x, t, image_embed=embed, text_encodings=text, text_mask=text_mask, image_cond_mask=keep,
                   text_cond_mask=keep.flip(0))  # fmt: skip
    for i in range(3):
        row = unet(x[i : i + 1], t[i : i + 1], image_embed=embed[i : i + 1], text_encodings=text[i : i + 1],
                   text_mask=text_mask[i : i + 1], image_cond_mask=keep[i : i + 1],
                   text_cond_mask=keep.flip(0)[i : i + 1])  # fmt: skip
        torch.testing.assert_close(batched[i : i + 1], row, atol=1e-5, rtol=1e-4)


def test_dropped_conditions_and_text_padding_are_ignored():
    unet = make_unet(cond_on_text_encodings=True, text_embed_dim=TEXT_DIM)
    x, t, embed, text, text_mask = inputs()
    base = unet(x, t, image_embed=embed, text_encodings=text, text_mask=text_mask)
    # padded text positions do not matter
    padded_changed = torch.where(text_mask[..., None], text, torch.randn_like(text))
    same = unet(x, t, image_embed=embed, text_encodings=padded_changed, text_mask=text_mask)
    torch.testing.assert_close(base, same)
    # a real text position does
    assert not torch.allclose(base, unet(x, t, image_embed=embed, text_encodings=text + 1, text_mask=text_mask))
    # with both conditions dropped, neither the embedding nor the text changes anything
    off = torch.zeros(3, dtype=torch.bool)
    null = unet(x, t, image_embed=embed, text_encodings=text, text_mask=text_mask, image_cond_mask=off,
                text_cond_mask=off)  # fmt: skip
    other = unet(x, t, image_embed=torch.randn_like(embed), text_encodings=torch.randn_like(text),
                 text_mask=text_mask, image_cond_mask=off, text_cond_mask=off)  # fmt: skip
    torch.testing.assert_close(null, other)
    # no text at all is the null text condition
    torch.testing.assert_close(unet(x, t, image_embed=embed, text_cond_mask=off),
                               unet(x, t, image_embed=embed, text_encodings=text, text_mask=text_mask,
                                    text_cond_mask=off))  # fmt: skip
    assert not torch.allclose(null, base)


def test_every_parameter_gets_a_finite_gradient():
    unet = make_unet(cond_on_text_encodings=True, text_embed_dim=TEXT_DIM, lowres_cond=True).train()
    x, t, embed, text, text_mask = inputs()
    keep = torch.tensor([True, False, True])  # kept and dropped rows reach the real and the null parameters
    out = unet(x, t, image_embed=embed, text_encodings=text, text_mask=text_mask, lowres_cond_img=x.flip(0),
               lowres_noise_level=t, image_cond_mask=keep, text_cond_mask=keep.flip(0))  # fmt: skip
    out.square().mean().backward()
    for name, param in unet.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_bad_inputs_get_clear_errors():
    unet = make_unet(dim_mults=(1, 2, 4))
    x, t, embed, _, _ = inputs(size=8)
    with pytest.raises(ValueError, match="divisible by 4"):
        unet(torch.randn(3, 3, 6, 6), t, image_embed=embed)
    with pytest.raises(ValueError, match="x must be a float tensor"):
        unet(torch.randn(3, 1, 8, 8), t, image_embed=embed)
    with pytest.raises(ValueError, match=r"image_embed must have shape \(3, 16\)"):
        unet(x, t, image_embed=torch.randn(3, 15))
    with pytest.raises(ValueError, match="lowres_cond=False"):
        unet(x, t, image_embed=embed, lowres_cond_img=x)
    with pytest.raises(ValueError, match="lowres_cond=True"):
        make_unet(lowres_cond=True)(x, t, image_embed=embed)
    with pytest.raises(ValueError, match="text_encodings must have shape"):
        make_unet(cond_on_text_encodings=True, text_embed_dim=TEXT_DIM)(x, t, image_embed=embed,
                                                                        text_encodings=torch.randn(3, 4, 7))
    with pytest.raises(ValueError, match="layer_attns"):
        make_unet(layer_attns=(True,))
    with pytest.raises(ValueError, match="dim_mults"):
        make_unet(dim_mults=())


def test_save_and_load_give_the_same_outputs(tmp_path):
    unet = make_unet(cond_on_text_encodings=True, text_embed_dim=TEXT_DIM, dim_mults=(1, 2, 2))
    x, t, embed, text, text_mask = inputs()
    unet.save_pretrained(tmp_path / "unet")
    loaded = Unet.from_pretrained(tmp_path / "unet")
    assert loaded.config == unet.config
    torch.testing.assert_close(
        loaded(x, t, image_embed=embed, text_encodings=text, text_mask=text_mask),
        unet(x, t, image_embed=embed, text_encodings=text, text_mask=text_mask),
    )
