import pytest
import torch
from conftest import TEXT_SEQ_LEN, make_clip, random_images, random_text

from dalle_pytorch import CLIP


def test_similarity_and_loss(clip):
    text, images = random_text(3), random_images(3)
    sims = clip(text, images)
    assert sims.shape == (3,) and torch.isfinite(sims).all()
    scale = clip.log_temperature.exp()
    assert (sims.abs() <= scale + 1e-4).all()  # cosine similarities times the temperature
    loss = clip(text, images, return_loss=True)
    assert loss.ndim == 0
    loss.backward()
    for name, p in clip.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_loss_is_symmetric_contrastive(clip):
    text, images = random_text(3), random_images(3)
    t, i = clip.embed_text(text), clip.embed_image(images)
    logits = t @ i.t() * clip.log_temperature.exp()
    labels = torch.arange(3)
    expected = (
        torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.t(), labels)
    ) / 2
    torch.testing.assert_close(clip(text, images, return_loss=True), expected)


def test_text_mask_and_padding(clip):
    clip.eval()
    text, images = random_text(2), random_images(2)
    mask = torch.ones_like(text).bool()
    mask[:, 4:] = False
    padded = text.clone()
    padded[:, 4:] = 0
    torch.testing.assert_close(clip(text, images, text_mask=mask), clip(padded, images))
    # shorter text is fine; all-padding text gives finite values
    torch.testing.assert_close(clip(padded[:, :4], images), clip(padded, images))
    assert torch.isfinite(clip(torch.zeros_like(text), images)).all()


def test_batch_invariance(clip):
    clip.eval()
    text, images = random_text(3), random_images(3)
    together = clip(text, images)
    alone = torch.cat([clip(text[i : i + 1], images[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_learns_to_match_pairs():
    clip = make_clip()
    text, images = random_text(4), random_images(4)
    opt = torch.optim.Adam(clip.parameters(), lr=2e-3)
    for _ in range(30):
        loss = clip(text, images, return_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2
    t, i = clip.embed_text(text), clip.embed_image(images)
    assert torch.equal((t @ i.t()).argmax(dim=1), torch.arange(4))


def test_bad_inputs(clip):
    with pytest.raises(ValueError, match="more than text_seq_len"):
        clip(random_text(2, length=TEXT_SEQ_LEN + 1), random_images(2))
    with pytest.raises(ValueError, match="batch sizes differ"):
        clip(random_text(2), random_images(3))
    with pytest.raises(ValueError, match="image must have shape"):
        clip(random_text(2), random_images(2, size=32))
    with pytest.raises(TypeError, match="integer token ids"):
        clip(random_text(2).float(), random_images(2))
    with pytest.raises(ValueError, match="divisible"):
        CLIP(visual_image_size=30, visual_patch_size=8)


def test_save_and_load_round_trip(clip, tmp_path):
    clip.eval()
    text, images = random_text(2), random_images(2)
    clip.save_pretrained(tmp_path / "clip")
    loaded = CLIP.from_pretrained(tmp_path / "clip")
    torch.testing.assert_close(loaded(text, images), clip(text, images))
