"""DALLE trains and decodes (with the cache) on top of each released-tokenizer architecture, random weights."""

import pytest
import torch
from conftest import make_dalle, random_text

from dalle_pytorch import DALLE, OpenAIDiscreteVAE, VQGanVAE

TINY_VQGAN = dict(
    ddconfig=dict(double_z=False, z_channels=32, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                  num_res_blocks=1, attn_resolutions=[], dropout=0.0),
    n_embed=32, embed_dim=32,
)  # fmt: skip


def _openai():
    torch.manual_seed(0)
    return OpenAIDiscreteVAE._from_config(
        {"image_size": 16, "vocab_size": 32, "encoder": {"n_hid": 4, "n_blk_per_group": 1},
         "decoder": {"n_init": 4, "n_hid": 4, "n_blk_per_group": 1}}
    )  # fmt: skip


def _vqgan(quantizer):
    torch.manual_seed(0)
    return VQGanVAE._from_config({**TINY_VQGAN, "quantizer": quantizer})


@pytest.mark.parametrize("make_vae", [_openai, lambda: _vqgan("vector"), lambda: _vqgan("gumbel")])
def test_dalle_on_pretrained_tokenizers(make_vae, tmp_path):
    vae = make_vae()
    dalle = make_dalle(vae=vae)
    assert dalle.image_seq_len == vae.fmap_size**2
    images = torch.rand(2, 3, 16, 16)
    loss = dalle(random_text(2), images, return_loss=True)
    loss.backward()
    assert all(p.grad is None for p in vae.parameters())

    text = random_text(2)
    cached = dalle.generate_image_codes(text, generator=torch.Generator().manual_seed(0))
    plain = dalle.generate_image_codes(text, use_cache=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cached, plain)
    generated = dalle.generate_images(text, generator=torch.Generator().manual_seed(0))
    assert generated.shape == (2, 3, 16, 16)
    assert generated.min() >= 0 and generated.max() <= 1

    dalle.save_pretrained(tmp_path / "dalle")
    loaded = DALLE.from_pretrained(tmp_path / "dalle")
    assert type(loaded.vae) is type(vae)
    torch.testing.assert_close(loaded.generate_images(text, generator=torch.Generator().manual_seed(0)), generated)
