"""DALLE2: the seed's code block (tiny sizes here, full sizes in a slow test), strings == token ids, per-sample
generators, guidance arguments, save/load with the CLIP stored once."""

import pytest
import torch
from conftest import make_clip

from dalle_pytorch import CLIP, DALLE2, Decoder, DiffusionPrior, DiffusionPriorNetwork, Unet
from dalle_pytorch.io.checkpoint import CONFIG_NAME
from dalle_pytorch.text.tokenizer import tokenizer

CAPTION = "a butterfly trying to escape a tornado"


def make_parts(text_conditioned_decoder: bool = False, share_clip: bool = False):
    """A tiny version of the seed's models: CLIP on the real BPE vocabulary, prior, one 16px U-Net."""
    torch.manual_seed(0)
    clip = CLIP(
        dim_text=32, dim_image=32, dim_latent=16, num_text_tokens=49408, text_enc_depth=1, text_seq_len=16,
        text_heads=2, visual_enc_depth=1, visual_image_size=16, visual_patch_size=8, visual_heads=2,
    )  # fmt: skip
    prior_network = DiffusionPriorNetwork(
        dim=32, depth=1, dim_head=8, heads=2, image_embed_dim=16, text_encoding_dim=32
    )
    diffusion_prior = DiffusionPrior(net=prior_network, clip=clip, timesteps=10, cond_drop_prob=0.2)
    unet1 = Unet(
        dim=8, image_embed_dim=16, cond_dim=8, channels=3, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8,
        cond_on_text_encodings=text_conditioned_decoder, text_embed_dim=32,
    )  # fmt: skip
    decoder = Decoder(
        unet=unet1, image_sizes=(16,), timesteps=10, image_cond_drop_prob=0.1, text_cond_drop_prob=0.5,
        clip=clip if share_clip else None,
    )  # fmt: skip
    return clip, diffusion_prior, decoder


def test_seed_code_block_at_tiny_sizes():
    clip, diffusion_prior, decoder = make_parts()
    dalle2 = DALLE2(prior=diffusion_prior, decoder=decoder)
    images = dalle2([CAPTION], cond_scale=2.0)
    assert images.shape == (1, 3, 16, 16) and images.min() >= 0 and images.max() <= 1

    # the training snippets: each part's loss backpropagates
    text = tokenizer.tokenize([CAPTION, "a red square"], context_length=16)
    train_images = torch.rand(2, 3, 16, 16)
    loss = diffusion_prior(text, train_images)
    loss.backward()
    loss = decoder(train_images, unet_number=1)
    loss.backward()
    assert decoder.clip is clip  # DALLE2 gave the CLIP-less decoder the prior's CLIP
    assert all(p.grad is None for p in clip.parameters())


def test_strings_equal_token_ids_and_generators_make_rows_independent():
    _, prior, decoder = make_parts(text_conditioned_decoder=True)
    dalle2 = DALLE2(prior=prior, decoder=decoder).eval()
    captions = [CAPTION, "a red square", "two blue circles"]
    ids = tokenizer.tokenize(captions, context_length=16)
    kwargs = dict(cond_scale=2.0, prior_cond_scale=1.5, prior_sample_steps=4, decoder_sample_steps=3)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    from_strings = dalle2(captions, generator=gens([1, 2, 3]), **kwargs)
    from_ids = dalle2(ids, generator=gens([1, 2, 3]), **kwargs)
    torch.testing.assert_close(from_strings, from_ids)
    for i, seed in enumerate([1, 2, 3]):
        alone = dalle2(captions[i : i + 1], generator=gens([seed]), **kwargs)
        torch.testing.assert_close(alone[0], from_strings[i], atol=2e-4, rtol=1e-4)  # batch-size kernels


def test_dalle2_is_the_prior_then_the_decoder():
    _, prior, decoder = make_parts(text_conditioned_decoder=True)
    dalle2 = DALLE2(prior=prior, decoder=decoder).eval()
    ids = tokenizer.tokenize([CAPTION, "a red square"], context_length=16)
    images, image_embed = dalle2(
        ids, cond_scale=3.0, prior_sample_steps=4, decoder_sample_steps=3, return_image_embed=True,
        generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    generator = torch.Generator().manual_seed(5)
    expected_embed = prior.sample(ids, sample_steps=4, generator=generator)
    expected = decoder.sample(expected_embed, text=ids, cond_scale=3.0, sample_steps=3, generator=generator)
    torch.testing.assert_close(image_embed, expected_embed)
    torch.testing.assert_close(images, expected)


def test_bad_inputs():
    _, prior, decoder = make_parts()
    dalle2 = DALLE2(prior=prior, decoder=decoder)
    for kwargs in (dict(cond_scale=0.5), dict(prior_cond_scale=0.0)):
        with pytest.raises(ValueError, match="cond_scale"):
            dalle2([CAPTION], **kwargs)
    with pytest.raises(ValueError, match="context_length=16"):
        dalle2(["many words " * 20])
    with pytest.raises(ValueError, match="more than the CLIP reads"):
        dalle2(torch.ones(1, 17, dtype=torch.long))
    small = Unet(dim=8, image_embed_dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8)
    with pytest.raises(ValueError, match="the decoder reads 8"):
        DALLE2(prior=prior, decoder=Decoder(unet=small, image_sizes=(16,), timesteps=20))
    with pytest.raises(ValueError, match="another CLIP"):
        DALLE2(prior=prior, decoder=make_parts(share_clip=True)[2], decoder_uses_prior_clip=True)
    with pytest.raises(TypeError, match="prior must be a DiffusionPrior"):
        DALLE2(prior=decoder, decoder=decoder)


@pytest.mark.parametrize("share_clip", [True, False])
def test_save_and_load_store_the_clip_once(tmp_path, share_clip):
    clip, prior, decoder = make_parts(text_conditioned_decoder=True, share_clip=share_clip)
    dalle2 = DALLE2(prior=prior, decoder=decoder).eval()
    dalle2.save_pretrained(tmp_path / "dalle2")
    assert decoder.clip is clip  # saving leaves the model as it was
    assert (tmp_path / "dalle2" / "prior" / "clip" / CONFIG_NAME).is_file()
    assert not (tmp_path / "dalle2" / "decoder" / "clip").exists()
    loaded = DALLE2.from_pretrained(tmp_path / "dalle2")
    assert loaded.decoder.clip is loaded.prior.clip and loaded.decoder.clip_adapter is loaded.prior.clip_adapter
    kwargs = dict(cond_scale=2.0, prior_sample_steps=3, decoder_sample_steps=2)
    expected = dalle2([CAPTION], generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(loaded([CAPTION], generator=torch.Generator().manual_seed(0), **kwargs), expected)


def test_a_decoder_with_its_own_clip_keeps_it(tmp_path):
    _, prior, _ = make_parts()
    other_clip = make_clip(dim_latent=16, text_seq_len=16, num_text_tokens=49408)
    _, _, decoder = make_parts()
    decoder = Decoder(unet=decoder.unets[0], image_sizes=(16,), timesteps=20, clip=other_clip)
    dalle2 = DALLE2(prior=prior, decoder=decoder)
    assert decoder.clip is other_clip and dalle2.config["decoder_uses_prior_clip"] is False
    dalle2.save_pretrained(tmp_path / "d")
    loaded = DALLE2.from_pretrained(tmp_path / "d")
    assert loaded.decoder.clip is not loaded.prior.clip
    torch.testing.assert_close(loaded.decoder.clip.text_emb.weight, other_clip.text_emb.weight)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 256 px U-Net training and sampling on a CPU: minutes, more on a shared machine
def test_seed_code_block_at_full_sizes():
    """The seed's code block with its sizes (CPU, no .cuda()): one training step of each part, short sampling."""
    clip = CLIP(
        dim_text=512, dim_image=512, dim_latent=512, num_text_tokens=49408, text_enc_depth=6, text_seq_len=256,
        text_heads=8, visual_enc_depth=6, visual_image_size=256, visual_patch_size=32, visual_heads=8,
    )  # fmt: skip
    prior_network = DiffusionPriorNetwork(dim=512, depth=6, dim_head=64, heads=8)
    diffusion_prior = DiffusionPrior(net=prior_network, clip=clip, timesteps=100, cond_drop_prob=0.2)
    unet1 = Unet(dim=128, image_embed_dim=512, cond_dim=128, channels=3, dim_mults=(1, 2, 4, 8))
    decoder = Decoder(unet=unet1, image_sizes=(256,), timesteps=100, image_cond_drop_prob=0.1, text_cond_drop_prob=0.5)
    dalle2 = DALLE2(prior=diffusion_prior, decoder=decoder)

    text = tokenizer.tokenize([CAPTION, "a red square"], context_length=256)
    images = torch.rand(2, 3, 256, 256)
    for model, loss_fn in ((diffusion_prior, lambda: diffusion_prior(text, images)),
                           (decoder, lambda: decoder(images, unet_number=1))):  # fmt: skip
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)

    out = dalle2([CAPTION], cond_scale=2.0, prior_sample_steps=5, decoder_sample_steps=3)
    assert out.shape == (1, 3, 256, 256) and out.min() >= 0 and out.max() <= 1
