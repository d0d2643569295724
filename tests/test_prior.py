"""DiffusionPrior: conditioning, guidance, learning, gradients, errors, save/load, CLIP adapters."""

import pytest
import torch
from conftest import TEXT_SEQ_LEN, make_clip, random_images, random_text
from safetensors.torch import load_file

from dalle_pytorch import CLIP
from dalle_pytorch.diffusion.clip_adapter import ClipAdapter, as_clip_adapter
from dalle_pytorch.diffusion.prior import DiffusionPrior, DiffusionPriorNetwork, rank_candidates
from dalle_pytorch.io.checkpoint import WEIGHTS_NAME
from dalle_pytorch.text.tokenizer import tokenizer


def make_net(**overrides):
    torch.manual_seed(0)
    config = dict(dim=32, depth=2, dim_head=8, heads=2, image_embed_dim=16, text_encoding_dim=32)
    return DiffusionPriorNetwork(**{**config, **overrides})


def make_prior(clip=None, **overrides):
    clip = clip if clip is not None else make_clip()
    return DiffusionPrior(make_net(), clip, **{**dict(timesteps=40), **overrides})


def _conditions(batch=3, seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    return dict(
        text_embed=torch.randn(batch, 16, generator=g),
        text_encodings=torch.randn(batch, n, 32, generator=g),
        text_mask=torch.tensor([[True] * n, [True, True, False, False, False], [True] * (n - 1) + [False]])[:batch],
    )


def _net_inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, generator=g), torch.tensor([0, 17, 39])[:batch]


# ------------------------------------------------------------------------------------------------ network


def test_network_shapes_and_rows_are_independent():
    net = make_net().eval()
    x, t = _net_inputs()
    cond = _conditions()
    out = net(x, t, **cond)
    assert out.shape == (3, 16) and out.dtype == torch.float32
    for i in range(3):
        alone = net(x[i : i + 1], t[i : i + 1], **{k: v[i : i + 1] for k, v in cond.items()})
        torch.testing.assert_close(alone[0], out[i], atol=1e-5, rtol=1e-5)


def test_network_ignores_padding_and_dropped_text():
    net = make_net().eval()
    x, t = _net_inputs()
    cond = _conditions()
    changed = dict(cond, text_encodings=cond["text_encodings"] + 5 * (~cond["text_mask"])[..., None])
    torch.testing.assert_close(net(x, t, **changed), net(x, t, **cond))  # masked positions never seen

    drop = torch.tensor([True, False, True])
    other = _conditions(seed=7)
    other["text_mask"] = cond["text_mask"]
    a = net(x, t, cond_drop=drop, **cond)
    b = net(x, t, cond_drop=drop, **other)
    torch.testing.assert_close(a[drop], b[drop])  # dropped rows: the text does not matter
    assert not torch.allclose(a[~drop], b[~drop])  # kept rows: it does
    with pytest.raises(ValueError, match="text_encodings must have shape"):
        net(x, t, text_embed=cond["text_embed"], text_encodings=torch.randn(3, 5, 8))


def test_network_other_widths_and_sizes():
    with pytest.raises(ValueError, match="depth"):
        DiffusionPriorNetwork(dim=32, depth=0)
    net = DiffusionPriorNetwork(dim=16, depth=1, dim_head=8, heads=2)  # every width = dim: no projection
    assert isinstance(net.to_image_embed, torch.nn.Identity)
    assert net(torch.randn(2, 16), torch.tensor([1, 2]), text_embed=torch.randn(2, 16)).shape == (2, 16)


# ------------------------------------------------------------------------------------------------ CLIP


def test_clip_encode_text_is_what_embed_text_pools():
    clip = make_clip().eval()
    text = random_text(3)
    text[1, 3:] = 0
    encodings, mask = clip.encode_text(text)
    assert encodings.shape == (3, TEXT_SEQ_LEN, 32) and torch.equal(mask, text != 0)
    latents, encodings2, mask2 = clip.embed_text(text, return_encodings=True)
    torch.testing.assert_close(latents, clip.embed_text(text))
    torch.testing.assert_close(encodings2, encodings)
    pooled = (encodings * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(latents, torch.nn.functional.normalize(clip.to_text_latent(pooled), dim=-1))


def test_clip_adapter_of_our_clip():
    clip = make_clip().eval()
    adapter = as_clip_adapter(clip)
    assert isinstance(adapter, ClipAdapter) and as_clip_adapter(adapter) is adapter
    assert (adapter.dim_latent, adapter.text_encoding_dim, adapter.image_size, adapter.max_text_len) == (16, 32, 16, 6)
    text, images = random_text(2), random_images(2)
    embeds = adapter.embed_text(text)
    torch.testing.assert_close(embeds.text_embed, clip.embed_text(text))
    torch.testing.assert_close(adapter.embed_image(images), clip.embed_image(images))
    ids = adapter.prepare_text(["a red b"])
    assert torch.equal(ids, tokenizer.tokenize(["a red b"], TEXT_SEQ_LEN))
    with pytest.raises(ValueError, match="more than the CLIP reads"):
        adapter.prepare_text(torch.ones(1, TEXT_SEQ_LEN + 1, dtype=torch.long))
    with pytest.raises(TypeError, match="CLIP or a BaseClipAdapter"):
        as_clip_adapter(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------ prior


def test_precomputed_embeddings_equal_text_and_images():
    prior = make_prior()
    text, images = random_text(3), random_images(3)
    from_raw = prior(text, images, generator=torch.Generator().manual_seed(3))
    text_embed, text_encodings, text_mask = prior.embed_text(text)
    from_embeds = prior(
        text_embed=text_embed, text_encodings=text_encodings, text_mask=text_mask,
        image_embed=prior.embed_image(images), generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    torch.testing.assert_close(from_raw, from_embeds)


def test_gradients_reach_every_trainable_parameter_and_not_the_clip():
    prior = make_prior(cond_drop_prob=0.5)
    # a batch with both kept and dropped rows, so the null embedding is used too
    loss = prior(random_text(8), random_images(8), generator=torch.Generator().manual_seed(0))
    loss.backward()
    for name, param in prior.net.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    assert all(not p.requires_grad and p.grad is None for p in prior.clip.parameters())
    prior.train()
    assert prior.net.training and not prior.clip.training


def test_tiny_prior_learns_a_handful_of_pairs():
    """Distinct image embeddings per caption (a random CLIP maps all images nearly alike): the prior must learn
    which embedding goes with which text, so the loss on shuffled pairs stays high."""
    prior = make_prior(cond_drop_prob=0.0)
    text_embed, text_encodings, text_mask = prior.embed_text(random_text(4))
    image_embed = torch.nn.functional.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(9)), dim=-1)
    batch = dict(text_embed=text_embed, text_encodings=text_encodings, text_mask=text_mask, image_embed=image_embed)

    def eval_loss(image_embed):
        with torch.no_grad():
            losses = [
                prior(**dict(batch, image_embed=image_embed), generator=torch.Generator().manual_seed(s))
                for s in range(8)
            ]
        return sum(loss.item() for loss in losses) / len(losses)

    start = eval_loss(image_embed)
    optimizer = torch.optim.Adam(prior.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        optimizer.zero_grad()
        prior(**batch, generator=generator).backward()
        optimizer.step()
    end = eval_loss(image_embed)
    assert end < 0.1 * start
    assert eval_loss(image_embed.roll(1, dims=0)) > 10 * end


def test_sampling_shapes_guidance_and_determinism():
    prior = make_prior(sample_timesteps=6)
    text = random_text(2)
    a = prior.sample(text, cond_scale=3.0, generator=torch.Generator().manual_seed(1))
    b = prior.sample(text, cond_scale=3.0, generator=torch.Generator().manual_seed(1))
    c = prior.sample(text, cond_scale=1.0, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 16) and torch.equal(a, b) and not torch.allclose(a, c)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(2))
    assert prior.sample(text, sample_steps=None, num_samples_per_batch=1).shape == (2, 16)  # DDPM, 40 steps


def test_sampling_batch_equals_texts_one_by_one():
    prior = make_prior()
    text = random_text(3)
    seeds = [4, 5, 6]
    kwargs = dict(num_samples_per_batch=3, cond_scale=2.0, sample_steps=5, eta=1.0)
    batched = prior.sample(text, generator=[torch.Generator().manual_seed(s) for s in seeds], **kwargs)
    for i, seed in enumerate(seeds):
        alone = prior.sample(text[i : i + 1], generator=[torch.Generator().manual_seed(seed)], **kwargs)
        torch.testing.assert_close(alone[0], batched[i], atol=1e-5, rtol=1e-5)


def test_rank_candidates_keeps_the_most_similar():
    text_embed = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    candidates = torch.tensor([[[0.0, 1.0], [0.8, 0.6], [0.6, 0.8]], [[1.0, 0.0], [0.6, -0.8], [-0.6, 0.8]]])
    torch.testing.assert_close(rank_candidates(candidates, text_embed), torch.tensor([[0.8, 0.6], [-0.6, 0.8]]))


def test_bad_inputs():
    prior = make_prior()
    with pytest.raises(ValueError, match="more than the CLIP reads"):
        prior(random_text(2, length=TEXT_SEQ_LEN + 2), random_images(2))
    with pytest.raises(ValueError, match="context_length"):
        prior.sample(["a very long caption with far more than six tokens in it"])
    with pytest.raises(ValueError, match=r"image_embed must have shape \(batch, 16\)"):
        prior(random_text(2), image_embed=torch.randn(2, 15))
    with pytest.raises(ValueError, match=r"text_embed must have shape \(batch, 16\)"):
        prior.sample(text_embed=torch.randn(2, 12), text_encodings=torch.randn(2, 3, 32))
    with pytest.raises(ValueError, match="cond_scale"):
        prior.sample(random_text(2), cond_scale=0.5)
    with pytest.raises(ValueError, match="not both"):
        prior(random_text(2), random_images(2), image_embed=torch.randn(2, 16))
    with pytest.raises(ValueError, match="text encodings"):
        prior(text_embed=torch.randn(2, 16), image_embed=torch.randn(2, 16))
    with pytest.raises(ValueError, match="image_embed_dim=16"):
        DiffusionPrior(make_net(image_embed_dim=12), make_clip())
    with pytest.raises(ValueError, match="text_encoding_dim=32"):
        DiffusionPrior(make_net(text_encoding_dim=16), make_clip())
    with pytest.raises(ValueError, match="cond_drop_prob"):
        make_prior(cond_drop_prob=1.0)
    with pytest.raises(ValueError, match="no clip"):
        DiffusionPrior(make_net(), image_embed_dim=16).sample(random_text(1))


def test_prior_without_clip_trains_on_embeddings():
    prior = DiffusionPrior(make_net(), image_embed_dim=16, timesteps=40, condition_on_text_encodings=False)
    loss = prior(text_embed=torch.randn(2, 16), image_embed=torch.randn(2, 16))
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_save_and_load_give_the_same_outputs(tmp_path):
    prior = make_prior(sample_timesteps=4, cond_drop_prob=0.3)
    prior.save_pretrained(tmp_path / "prior")
    loaded = DiffusionPrior.from_pretrained(tmp_path / "prior")
    assert isinstance(loaded.clip, CLIP) and loaded.config == prior.config
    text, images = random_text(2), random_images(2)
    for model in (prior, loaded):
        model.eval()
    same = [m(text, images, generator=torch.Generator().manual_seed(2)) for m in (prior, loaded)] + [
        m.sample(text, cond_scale=2.0, generator=torch.Generator().manual_seed(3)) for m in (prior, loaded)
    ]
    torch.testing.assert_close(same[0], same[1])
    torch.testing.assert_close(same[2], same[3])
    # the CLIP and the network live in their own folders; the prior's own file holds neither
    own = load_file(str(tmp_path / "prior" / WEIGHTS_NAME))
    assert not any(key.startswith(("clip.", "net.")) for key in own)
    assert (tmp_path / "prior" / "clip" / WEIGHTS_NAME).is_file()
    assert (tmp_path / "prior" / "net" / WEIGHTS_NAME).is_file()
