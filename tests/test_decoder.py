"""The cascaded diffusion decoder: resolutions, guidance, per-sample generators, inpainting, latent spaces,
learning, gradients, errors and checkpoints. Tiny sizes (8 and 16 px, dim 8, 20 timesteps)."""

import pytest
import torch
from conftest import make_clip, make_vae, random_images, random_text

from dalle_pytorch.diffusion.decoder import Decoder
from dalle_pytorch.diffusion.samplers import guide
from dalle_pytorch.diffusion.unet import Unet
from dalle_pytorch.image_tokenizers.pretrained_vae import VQGanVAE

EMBED_DIM = 16  # make_clip's dim_latent
TEXT_DIM = 32  # make_clip's dim_text


def make_unet(**overrides) -> Unet:
    config = dict(dim=8, image_embed_dim=EMBED_DIM, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)
    return Unet(**{**config, **overrides})


def make_decoder(clip=None, text: bool = False, **overrides) -> Decoder:
    torch.manual_seed(0)
    unets = (make_unet(cond_on_text_encodings=text, text_embed_dim=TEXT_DIM), make_unet(lowres_cond=True))
    config = dict(unet=unets, clip=clip if clip is not None else make_clip(), image_sizes=(8, 16), timesteps=20)
    return Decoder(**{**config, **overrides}).eval()


def generators(batch: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(batch)]


class ShapeSpy:
    """Records the shapes each U-Net's forward sees."""

    def __init__(self, decoder: Decoder):
        self.calls = []
        for number, unet in enumerate(decoder.unets, start=1):
            unet.register_forward_pre_hook(self._hook(number), with_kwargs=True)

    def _hook(self, number):
        def hook(module, args, kwargs):
            lowres = kwargs.get("lowres_cond_img")
            self.calls.append((number, tuple(args[0].shape), None if lowres is None else tuple(lowres.shape)))

        return hook


def test_cascade_passes_the_right_resolutions():
    decoder = make_decoder()
    spy = ShapeSpy(decoder)
    images = random_images(2)
    decoder(images, unet_number=1)
    decoder(images, unet_number=2)
    decoder(torch.nn.functional.interpolate(images, size=8), unet_number=1)  # the U-Net's own size works too
    assert spy.calls == [(1, (2, 3, 8, 8), None), (2, (2, 3, 16, 16), (2, 3, 16, 16)), (1, (2, 3, 8, 8), None)]
    spy.calls.clear()
    out = decoder.sample(torch.randn(2, EMBED_DIM), sample_steps=2)
    assert out.shape == (2, 3, 16, 16)
    assert spy.calls == [(1, (2, 3, 8, 8), None)] * 2 + [(2, (2, 3, 16, 16), (2, 3, 16, 16))] * 2
    assert decoder.sample(torch.randn(2, EMBED_DIM), sample_steps=2, stop_at_unet_number=1).shape == (2, 3, 8, 8)


def test_wrong_sizes_and_unet_numbers_get_clear_errors():
    decoder = make_decoder()
    images = random_images(2)
    with pytest.raises(ValueError, match=r"unet_number must be an int in \[1, 2\], got 3"):
        decoder(images, unet_number=3)
    with pytest.raises(ValueError, match=r"unet_number must be an int in \[1, 2\], got 0"):
        decoder(images, unet_number=0)
    with pytest.raises(ValueError, match=r"U-Net 2 trains on .* s in \[16\]"):
        decoder(images[..., :8, :8], unet_number=2)
    with pytest.raises(ValueError, match=r"U-Net 1 trains on .* s in \[8, 16\]"):
        decoder(random_images(2, size=12), unet_number=1)
    with pytest.raises(ValueError, match="image_embed must have shape"):
        decoder.sample(torch.randn(2, EMBED_DIM + 1))
    with pytest.raises(ValueError, match="cond_scale"):
        decoder.sample(torch.randn(2, EMBED_DIM), cond_scale=0.5)
    with pytest.raises(ValueError, match="divisible by 2"):
        Decoder(unet=make_unet(), image_sizes=(9,))
    with pytest.raises(ValueError, match="image_sizes needs one size per U-Net"):
        Decoder(unet=make_unet(), image_sizes=(8, 16))
    with pytest.raises(ValueError, match="lowres_cond=True"):
        Decoder(unet=(make_unet(), make_unet()), image_sizes=(8, 16))
    with pytest.raises(ValueError, match=r"same image embedding width, got image_embed_dim \[16, 8\]"):
        Decoder(unet=(make_unet(), make_unet(lowres_cond=True, image_embed_dim=8)), image_sizes=(8, 16))
    with pytest.raises(ValueError, match="no clip"):
        Decoder(unet=make_unet(), image_sizes=(8,))(random_images(2, size=8))
    with pytest.raises(ValueError, match="encodes 16px images"):
        Decoder(unet=make_unet(channels=16), vae=make_vae(), image_sizes=(8,))
    with pytest.raises(ValueError, match="latent space has 16 channels"):
        Decoder(unet=make_unet(), vae=make_vae(), image_sizes=(16,))
    with pytest.raises(ValueError, match="image_embed_dim=8; the CLIP's is 16"):
        Decoder(unet=make_unet(image_embed_dim=8), clip=make_clip(), image_sizes=(8,))
    with pytest.raises(ValueError, match="text_embed_dim=16; the CLIP's text encodings have 32"):
        Decoder(unet=make_unet(cond_on_text_encodings=True), clip=make_clip(), image_sizes=(8,))
    with pytest.raises(ValueError, match="pass text or text_encodings"):
        make_decoder(text=True)(images, unet_number=1)
    with pytest.raises(TypeError, match="OpenAIDiscreteVAE"):
        Decoder(unet=make_unet(), vae=torch.nn.Linear(1, 1), image_sizes=(16,))


def test_guidance_is_one_batched_forward_equal_to_separate_forwards():
    decoder = make_decoder(text=True)
    unet = decoder.unets[0]
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 17])
    embed, text = torch.randn(2, EMBED_DIM), random_text(2)
    encodings, mask = decoder.encode_text(text)
    conditions = dict(image_embed=embed, text_encodings=encodings, text_mask=mask)
    batches = []
    unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    guided = decoder._x0_fn(0, 3.0, **conditions)(x, t)
    assert batches == [4]  # conditioned and null rows in one forward
    cond = unet(x, t, **conditions)
    off = torch.zeros(2, dtype=torch.bool)
    null = unet(x, t, **conditions, image_cond_mask=off, text_cond_mask=off)
    expected = decoder.schedule.predict_x0_from_noise(x, t, guide(cond, null, 3.0))
    torch.testing.assert_close(guided, expected, atol=1e-5, rtol=1e-4)
    plain = decoder._x0_fn(0, 1.0, **conditions)(x, t)
    torch.testing.assert_close(plain, decoder.schedule.predict_x0_from_noise(x, t, cond))


def test_cond_scale_one_equals_no_guidance_and_a_batch_equals_its_rows():
    decoder = make_decoder(text=True)
    embed, text = torch.randn(3, EMBED_DIM), random_text(3)
    batched = decoder.sample(embed, text=text, cond_scale=2.0, generator=generators(3), sample_steps=3)
    for i in range(3):
        row = decoder.sample(embed[i : i + 1], text=text[i : i + 1], cond_scale=2.0, generator=generators(1, seed=i),
                             sample_steps=3)  # fmt: skip
        # float rounding of batched kernels differs slightly; a different draw would differ by O(1)
        torch.testing.assert_close(batched[i : i + 1], row, atol=5e-4, rtol=1e-3)
    once = decoder.sample(embed, text=text, cond_scale=1.0, generator=torch.Generator().manual_seed(5), sample_steps=3)
    again = decoder.sample(embed, text=text, cond_scale=1, generator=torch.Generator().manual_seed(5), sample_steps=3)
    torch.testing.assert_close(once, again)
    # DDPM over every timestep (the default) also gives images in range
    full = decoder.sample(embed[:1], text=text[:1], generator=torch.Generator().manual_seed(0), stop_at_unet_number=1)
    assert full.shape == (1, 3, 8, 8) and full.min() >= 0 and full.max() <= 1


@pytest.mark.parametrize("sample_steps", [None, 4])
def test_inpainting_keeps_every_known_pixel(sample_steps):
    decoder = make_decoder(timesteps=8) if sample_steps is None else make_decoder()
    images = random_images(2)
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[0, :, :9] = True
    mask[1, 4:12, 4:12] = True
    out = decoder.sample(torch.randn(2, EMBED_DIM), inpaint_image=images, inpaint_mask=mask, sample_steps=sample_steps,
                         inpaint_resample_times=2, generator=generators(2))  # fmt: skip
    known = mask[:, None].expand_as(images)
    assert torch.equal(out[known], images[known])
    assert not torch.allclose(out[~known], images[~known])
    assert out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="both inpaint_image and inpaint_mask"):
        decoder.sample(torch.randn(2, EMBED_DIM), inpaint_image=images)
    with pytest.raises(ValueError, match="inpaint_mask must have shape"):
        decoder.sample(torch.randn(2, EMBED_DIM), inpaint_image=images, inpaint_mask=mask[:, :8])


def tiny_vqgan() -> VQGanVAE:
    torch.manual_seed(0)
    ddconfig = dict(ch=32, out_ch=3, ch_mult=[1, 1], num_res_blocks=1, attn_resolutions=[], in_channels=3,
                    resolution=16, z_channels=8)  # fmt: skip
    return VQGanVAE._from_config(dict(ddconfig=ddconfig, n_embed=16, embed_dim=4, quantizer="vector")).eval()


@pytest.mark.parametrize("tokenizer", ["discrete_vae", "vqgan"])
def test_latent_diffusion_decodes_images_in_range(tokenizer):
    vae = make_vae() if tokenizer == "discrete_vae" else tiny_vqgan()
    channels = 16 if tokenizer == "discrete_vae" else 4
    unets = (make_unet(), make_unet(lowres_cond=True, channels=channels))
    decoder = Decoder(unet=unets, vae=(None, vae), clip=make_clip(), image_sizes=(8, 16), timesteps=20).eval()
    spy = ShapeSpy(decoder)
    images = random_images(2)
    assert decoder(images, unet_number=2).ndim == 0
    side = 16 // decoder.latents[1].downsample_factor
    assert spy.calls[-1] == (2, (2, channels, side, side), (2, channels, side, side))
    out = decoder.sample(torch.randn(2, EMBED_DIM), sample_steps=2)
    assert out.shape == (2, 3, 16, 16) and out.min() >= 0 and out.max() <= 1
    # the latent of an image decodes to the tokenizer's own reconstruction of it
    space = decoder.latents[1]
    if tokenizer == "discrete_vae":
        reference = vae.decode(vae.get_codebook_indices(images)).clamp(0, 1)
    else:
        reference = vae.decode(vae.get_codebook_indices(images))
    torch.testing.assert_close(space.decode(space.encode(images)), reference)


def test_a_tiny_decoder_overfits_a_handful_of_images():
    decoder = Decoder(unet=make_unet(), image_sizes=(8,), timesteps=20, image_cond_drop_prob=0.0)
    images = random_images(4, size=8)
    embed = torch.randn(4, EMBED_DIM)

    def eval_loss():
        torch.manual_seed(123)  # the same timesteps and noise each time
        with torch.no_grad():
            return sum(decoder(images, image_embed=embed).item() for _ in range(4)) / 4

    start = eval_loss()
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=2e-2)
    for _ in range(40):
        optimizer.zero_grad()
        decoder(images, image_embed=embed).backward()
        optimizer.step()
    # an untrained U-Net predicts noise no better than zero (loss ~1); this one has learnt the images
    assert eval_loss() < 0.5 * start


def test_gradients_reach_the_trained_unet_only():
    decoder = make_decoder(text=True, vae=(None, make_vae()), image_cond_drop_prob=0.5, unet=(
        make_unet(cond_on_text_encodings=True, text_embed_dim=TEXT_DIM), make_unet(lowres_cond=True, channels=16)))
    decoder.train()
    assert not decoder.clip.training and not decoder.vae_1.training
    images = random_images(8)
    # rows with kept and dropped conditions (drawn from this seed), so the null embeddings are used too
    torch.manual_seed(3)
    decoder(images, unet_number=1, text=random_text(8)).backward()
    for name, param in decoder.unets[0].named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in decoder.unets[1].parameters())
    frozen = [*decoder.clip.parameters(), *decoder.vae_1.parameters()]
    assert all(not p.requires_grad and p.grad is None for p in frozen)


def test_variations_are_samples_of_the_images_embedding():
    decoder = make_decoder()
    images = random_images(2)
    out = decoder.variations(images, sample_steps=2, generator=torch.Generator().manual_seed(1))
    expected = decoder.sample(decoder.clip.embed_image(images), sample_steps=2,
                              generator=torch.Generator().manual_seed(1))  # fmt: skip
    torch.testing.assert_close(out, expected)


def test_variations_of_a_text_reading_decoder_use_the_null_text():
    decoder = make_decoder(text=True)
    images, text = random_images(2), random_text(2)
    embed = decoder.clip.embed_image(images)
    out = decoder.variations(images, sample_steps=2, generator=generators(2))
    # any encodings with every token masked out are the null text condition of a dropped caption
    masked = decoder.sample(embed, text_encodings=torch.randn(2, 3, TEXT_DIM), text_mask=torch.zeros(2, 3).bool(),
                            sample_steps=2, generator=generators(2))  # fmt: skip
    torch.testing.assert_close(out, masked, atol=1e-4, rtol=1e-3)  # masked keys of another length: rounding
    captioned = decoder.variations(images, text=text, sample_steps=2, generator=generators(2))
    torch.testing.assert_close(captioned, decoder.sample(embed, text=text, sample_steps=2, generator=generators(2)))
    assert not torch.allclose(captioned, out)


def test_save_and_load_give_the_same_samples(tmp_path):
    vae = make_vae()
    unets = (make_unet(cond_on_text_encodings=True, text_embed_dim=TEXT_DIM), make_unet(lowres_cond=True, channels=16),
             make_unet(lowres_cond=True, channels=16))  # fmt: skip
    decoder = make_decoder(unet=unets, vae=(None, vae, vae), image_sizes=(8, 16, 16), sample_timesteps=2)
    decoder.save_pretrained(tmp_path / "decoder")
    assert sorted(p.name for p in (tmp_path / "decoder").iterdir()) == [
        "clip", "config.json", "model.safetensors", "vae_1"]  # the shared tokenizer is stored once
    loaded = Decoder.from_pretrained(tmp_path / "decoder")
    assert loaded.config == decoder.config and loaded.latents[1].vae is loaded.latents[2].vae
    embed, text = torch.randn(2, EMBED_DIM), random_text(2)
    torch.testing.assert_close(
        loaded.sample(embed, text=text, cond_scale=2.0, generator=generators(2)),
        decoder.sample(embed, text=text, cond_scale=2.0, generator=generators(2)),
    )
