import math

import pytest
import torch
from conftest import make_vae, random_images

from dalle_pytorch import DiscreteVAE
from dalle_pytorch.models.vae import kl_to_uniform, reinmax_one_hot


def test_shapes_and_codes(vae):
    images = random_images(3)
    codes = vae.get_codebook_indices(images)
    assert codes.shape == (3, vae.fmap_size**2) and codes.dtype == torch.long
    assert vae.fmap_size == 4
    assert codes.min() >= 0 and codes.max() < vae.num_tokens
    recon = vae.decode(codes)
    assert recon.shape == images.shape and recon.dtype == torch.float32
    assert vae(images).shape == images.shape


def test_decode_is_in_the_input_range(vae):
    # normalization (mean 0.5, std 0.5) maps [0, 1] images to [-1, 1] inside; decode must map back
    codes = vae.get_codebook_indices(random_images(2))
    raw = vae.decoder(vae.codebook(codes).transpose(1, 2).reshape(2, -1, 4, 4))
    torch.testing.assert_close(vae.decode(codes), raw * 0.5 + 0.5)
    plain = make_vae(normalization=None)
    raw = plain.decoder(plain.codebook(codes).transpose(1, 2).reshape(2, -1, 4, 4))
    torch.testing.assert_close(plain.decode(codes), raw)


def test_loss_backward_reaches_every_parameter(vae):
    vae.kl_div_loss_weight = 0.1
    loss, recons = vae(random_images(2), return_loss=True, return_recons=True)
    assert loss.ndim == 0 and recons.shape == (2, 3, 16, 16)
    loss.backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("options", [dict(straight_through=True), dict(reinmax=True), dict(smooth_l1_loss=True)])
def test_estimators_give_gradients(options):
    vae = make_vae(**options)
    loss = vae(random_images(2), return_loss=True)
    loss.backward()
    assert vae.encoder[0].weight.grad.abs().sum() > 0


def test_reinmax_is_one_hot_forward_with_gradient():
    logits = torch.randn(2, 5, 3, 3, requires_grad=True)
    torch.manual_seed(0)
    sample = reinmax_one_hot(logits, 0.9)
    torch.testing.assert_close(sample.sum(dim=1), torch.ones(2, 3, 3))
    assert set(sample.detach().unique().tolist()) <= {0.0, 1.0}
    (sample * torch.randn_like(sample)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_kl_is_a_per_sample_mean():
    logits = torch.randn(1, 8, 2, 2)
    one = kl_to_uniform(logits)
    torch.testing.assert_close(kl_to_uniform(logits.repeat(5, 1, 1, 1)), one)
    torch.testing.assert_close(kl_to_uniform(torch.zeros(4, 8, 2, 2)), torch.tensor(0.0))
    peaked = torch.full((1, 8, 1, 1), -1e4)
    peaked[0, 3] = 0
    torch.testing.assert_close(kl_to_uniform(peaked), torch.tensor(math.log(8)))


def test_deterministic_with_seed(vae):
    images = random_images(2)
    torch.manual_seed(5)
    a = vae(images, return_loss=True)
    torch.manual_seed(5)
    b = vae(images, return_loss=True)
    assert torch.equal(a, b)


def test_overfits_one_batch():
    vae = make_vae(temperature=0.5)
    # four flat-coloured images: learnable in a few dozen steps, unlike noise
    images = torch.rand(4, 3, 1, 1, generator=torch.Generator().manual_seed(0)).expand(4, 3, 16, 16)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        loss = vae(images, return_loss=True)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.2


def test_bad_inputs(vae):
    with pytest.raises(ValueError, match="images must have shape"):
        vae(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="images must have shape"):
        vae(torch.rand(2, 1, 16, 16))
    with pytest.raises(TypeError, match="float tensor"):
        vae(torch.zeros(2, 3, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        DiscreteVAE(image_size=30, num_layers=2)
    with pytest.raises(ValueError, match="normalization"):
        DiscreteVAE(image_size=16, num_layers=2, normalization=((0.5,), (0.5,)))
    with pytest.raises(ValueError, match="square"):
        vae.decode(torch.zeros(1, 15, dtype=torch.long))


def test_input_not_modified(vae):
    images = random_images(2)
    before = images.clone()
    vae(images, return_loss=True).backward()
    assert torch.equal(images, before)
