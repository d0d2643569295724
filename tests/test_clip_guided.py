"""CLIP-guided generation: relaxed decoding, the optimisation, determinism, batching, untouched models."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_TEXT_TOKENS, make_clip, make_vae, random_text
from PIL import Image

from dalle_pytorch.cli import generate
from dalle_pytorch.generation import clip_guided_generate
from dalle_pytorch.generation.clip_guided import augment_views, image_similarity
from dalle_pytorch.image_tokenizers.pretrained_vae import OpenAIDiscreteVAE, VQGanVAE
from dalle_pytorch.text.tokenizer import tokenizer

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TINY_VQGAN = {
    "ddconfig": dict(ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], in_channels=3,
                     resolution=16, z_channels=32),
    "n_embed": 24, "embed_dim": 8, "quantizer": "vector",
}  # fmt: skip
TINY_OPENAI = {
    "image_size": 16, "vocab_size": 8,
    "encoder": {"n_hid": 4, "n_blk_per_group": 1}, "decoder": {"n_init": 4, "n_hid": 4, "n_blk_per_group": 1},
}  # fmt: skip


def blocky_vae():
    """A tiny VAE trained a little on images of random 4x4-pixel colour blocks: its codes become colours, so
    what it decodes depends on the codes (an untrained decoder barely does, and there is nothing to find)."""
    vae = make_vae()
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        images = F.interpolate(torch.rand(16, 3, 4, 4, generator=generator), scale_factor=4, mode="nearest")
        loss = vae(images, return_loss=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.zero_grad(set_to_none=True)
    return vae.eval()


@pytest.fixture(scope="module")
def models():
    return blocky_vae(), make_clip()


def generators(*seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


@pytest.mark.parametrize("kind", ["discrete", "openai", "vqgan"])
def test_decode_relaxed_of_one_hot_codes_equals_decode(kind):
    torch.manual_seed(0)
    vae = {
        "discrete": lambda: make_vae(),
        "openai": lambda: OpenAIDiscreteVAE._from_config(TINY_OPENAI),
        "vqgan": lambda: VQGanVAE._from_config(TINY_VQGAN),
    }[kind]().eval()
    codes = torch.randint(0, vae.num_tokens, (2, vae.fmap_size**2), generator=torch.Generator().manual_seed(1))
    probs = F.one_hot(codes, vae.num_tokens).float().requires_grad_()
    images = vae.decode_relaxed(probs)
    torch.testing.assert_close(images, vae.decode(codes))
    images.sum().backward()
    assert probs.grad is not None and probs.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="probs"):
        vae.decode_relaxed(probs.detach()[:, 1:])
    with pytest.raises(TypeError, match="probs"):
        vae.decode_relaxed(codes)


def test_augment_views_are_crops_flips_and_noise():
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    views = augment_views(image, 6, 8, generator=torch.Generator().manual_seed(1))
    assert views.shape == (12, 3, 8, 8)
    # with the whole image as the crop and no noise every view is the image or its mirror image
    views = augment_views(image, 6, 16, min_crop=1.0, noise_std=0.0, generator=torch.Generator().manual_seed(1))
    views = views.view(2, 6, 3, 16, 16)
    flipped = 0
    for i in range(2):
        for view in views[i]:
            mirrored = not torch.allclose(view, image[i], atol=1e-5)
            torch.testing.assert_close(view, image[i].flip(-1) if mirrored else image[i], atol=1e-5, rtol=0)
            flipped += mirrored
    assert 0 < flipped < 12
    # differentiable in the image, and per-image generators make an image's views its own
    grad_image = image.clone().requires_grad_()
    augment_views(grad_image, 3, 8, generator=generators(1, 2)).sum().backward()
    assert grad_image.grad.abs().sum() > 0
    alone = augment_views(image[1:], 3, 8, generator=generators(2))
    torch.testing.assert_close(augment_views(image, 3, 8, generator=generators(1, 2))[3:], alone)


def test_optimisation_raises_clip_similarity_above_random_codes(models):
    vae, clip = models
    text = random_text(2)
    result = clip_guided_generate(vae, clip, text, steps=40, lr=0.3, num_augments=4,
                                  generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert result.images.shape == (2, 3, 16, 16) and result.codes.shape == (2, 16)
    assert result.codes.dtype == torch.long and len(result.history) == 40
    with torch.no_grad():
        torch.testing.assert_close(result.images, vae.decode(result.codes))
        text_embed = clip.embed_text(text)
        torch.testing.assert_close(result.similarity, image_similarity(clip, result.images, text_embed))
        codes = torch.randint(0, vae.num_tokens, (64, 16), generator=torch.Generator().manual_seed(1))
        random_images = vae.decode(codes)
        for i in range(2):
            baseline = image_similarity(clip, random_images, text_embed[i].expand(64, -1))
            # better than every one of 64 random code grids, by several of their standard deviations
            assert result.similarity[i] > baseline.max()
            assert result.similarity[i] > baseline.mean() + 3 * baseline.std()
    assert result.history[-1] > result.history[0]


def test_same_generator_same_images_and_batch_equals_one_by_one(models):
    vae, clip = models
    text = random_text(3, seed=4)
    options = dict(steps=3, num_augments=2)
    batch = clip_guided_generate(vae, clip, text, generator=generators(5, 6, 7), **options)
    again = clip_guided_generate(vae, clip, text, generator=generators(5, 6, 7), **options)
    assert torch.equal(batch.codes, again.codes) and torch.equal(batch.images, again.images)
    for i, seed in enumerate((5, 6, 7)):
        generator = torch.Generator().manual_seed(seed)
        alone = clip_guided_generate(vae, clip, text[i : i + 1], generator=generator, **options)
        assert torch.equal(alone.codes[0], batch.codes[i])
        torch.testing.assert_close(alone.images[0], batch.images[i])
        torch.testing.assert_close(alone.similarity[0], batch.similarity[i])
    other = clip_guided_generate(vae, clip, text, generator=generators(8, 9, 10), **options)
    assert not torch.equal(other.codes, batch.codes)


def test_models_are_left_exactly_as_they_were(models):
    vae, clip = models
    vae.train()
    clip.eval()
    clip.text_emb.weight.requires_grad_(False)  # a user's own freezing stays as it is too
    before = {name: p.detach().clone() for module in (vae, clip) for name, p in module.named_parameters()}
    flags = {name: p.requires_grad for module in (vae, clip) for name, p in module.named_parameters()}
    text = random_text(1)
    original_text = text.clone()
    try:
        clip_guided_generate(vae, clip, text, steps=2, num_augments=2)
        after = {name: p for module in (vae, clip) for name, p in module.named_parameters()}
        for name, p in after.items():
            assert torch.equal(p, before[name]), name
            assert p.grad is None, name
            assert p.requires_grad == flags[name], name
        assert vae.training and not clip.training
        assert torch.equal(text, original_text)
    finally:
        clip.text_emb.weight.requires_grad_(True)
        vae.eval()


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(text=torch.zeros(2, 3)), TypeError, "text"),
        (dict(text=[1, 2]), TypeError, "text"),
        (dict(text=torch.full((1, 3), NUM_TEXT_TOKENS)), ValueError, "token ids"),
        (dict(steps=0), ValueError, "steps"),
        (dict(steps=2.0), ValueError, "steps"),
        (dict(num_augments=0), ValueError, "num_augments"),
        (dict(lr=0.0), ValueError, "lr"),
        (dict(end_temperature=-1.0), ValueError, "end_temperature"),
        (dict(min_crop=0.0), ValueError, "min_crop"),
        (dict(noise_std=-0.1), ValueError, "noise_std"),
        (dict(generator=generators(1)), ValueError, "generator"),
        (dict(vae=torch.nn.Linear(2, 2)), TypeError, "vae"),
        (dict(clip=torch.nn.Linear(2, 2)), TypeError, "clip"),
        (dict(vae=make_vae(channels=1, normalization=None)), ValueError, "channels"),
    ],
)
def test_bad_input_is_a_clear_error(models, change, error, match):
    vae, clip = models
    arguments = {**dict(vae=vae, clip=clip, text=random_text(2), steps=1, num_augments=1), **change}
    with pytest.raises(error, match=match):
        clip_guided_generate(**arguments)


def test_generate_cli_clip_guided_writes_images_independent_of_batch_size(models, tmp_path, capsys):
    vae, _ = models
    clip = make_clip(num_text_tokens=tokenizer.vocab_size, text_seq_len=12)  # the default BPE tokenizer's ids
    vae_dir, clip_dir = vae.save_pretrained(tmp_path / "vae"), clip.save_pretrained(tmp_path / "clip")
    common = ["--method", "clip-guided", "--vae-path", str(vae_dir), "--clip-path", str(clip_dir), "--text",
              "a red square|a blue circle", "--num-images", "3", "--steps", "2", "--num-augments", "2",
              "--device", "cpu"]  # fmt: skip
    folders = generate.run([*common, "--batch-size", "2", "--outputs-dir", str(tmp_path / "a")])
    again = generate.run([*common, "--batch-size", "1", "--outputs-dir", str(tmp_path / "b"), "--keep-top", "2"])
    assert [folder.name for folder in folders] == ["a_red_square", "a_blue_circle"]
    for folder, other in zip(folders, again):
        metadata = json.loads((folder / "metadata.json").read_text())
        assert metadata["method"] == "clip-guided" and metadata["vae_path"] == str(vae_dir)
        assert metadata["dalle_path"] is None and len(metadata["images"]) == 3
        scores = [entry["clip_score"] for entry in metadata["images"]]
        assert scores == sorted(scores, reverse=True)
        for entry in metadata["images"]:
            image = np.asarray(Image.open(folder / entry["file"]))
            assert image.shape == (16, 16, 3)
        assert (folder / "grid.png").is_file()
        # the best two of the same three images, whatever the batch size
        kept = json.loads((other / "metadata.json").read_text())["images"]
        assert [entry["index"] for entry in kept] == [entry["index"] for entry in metadata["images"][:2]]
        for entry in kept:
            assert np.array_equal(np.asarray(Image.open(other / entry["file"])),
                                  np.asarray(Image.open(folder / entry["file"])))  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        generate.main(["--method", "clip-guided", "--clip-path", str(clip_dir), "--text", "x", "--device", "cpu"])
    assert stop.value.code == 2 and "--method clip-guided needs --vae_path" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        generate.main(["--text", "x", "--device", "cpu"])
    assert stop.value.code == 2 and "--method dalle needs --dalle_path" in capsys.readouterr().err
