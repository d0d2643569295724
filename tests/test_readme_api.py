"""The code users already have (the original project's README) runs unchanged; small sizes by default."""

import pytest
import torch

from dalle_pytorch import CLIP, DALLE, DiscreteVAE


def run_readme_code(image_size, num_tokens, codebook_dim, dim, text_seq_len, depth, heads, batch, clip_depth, patch):
    vae = DiscreteVAE(image_size=image_size, num_layers=3, num_tokens=num_tokens, codebook_dim=codebook_dim,
                      hidden_dim=64, num_resnet_blocks=1, temperature=0.9, straight_through=False)  # fmt: skip
    images = torch.randn(batch, 3, image_size, image_size)
    loss = vae(images, return_loss=True)
    loss.backward()

    dalle = DALLE(dim=dim, vae=vae, num_text_tokens=10000, text_seq_len=text_seq_len, depth=depth,
                  heads=heads, dim_head=64, attn_dropout=0.1, ff_dropout=0.1)  # fmt: skip
    text = torch.randint(0, 10000, (batch, text_seq_len))
    mask = torch.ones_like(text).bool()
    loss = dalle(text, images, mask=mask, return_loss=True)
    loss.backward()
    generated = dalle.generate_images(text, mask=mask)
    assert generated.shape == (batch, 3, image_size, image_size)

    clip = CLIP(dim_text=512, dim_image=512, dim_latent=512, num_text_tokens=10000, text_enc_depth=clip_depth,
                text_seq_len=text_seq_len, text_heads=8, num_visual_tokens=512, visual_enc_depth=clip_depth,
                visual_image_size=image_size, visual_patch_size=patch, visual_heads=8)  # fmt: skip
    loss = clip(text, generated, text_mask=mask, return_loss=True)
    loss.backward()
    generated, scores = dalle.generate_images(text, mask=mask, clip=clip)
    assert generated.shape == (batch, 3, image_size, image_size) and scores.shape == (batch,)
    assert torch.isfinite(scores).all()


def test_readme_code_small():
    run_readme_code(image_size=32, num_tokens=64, codebook_dim=32, dim=64, text_seq_len=16, depth=2, heads=2,
                    batch=2, clip_depth=1, patch=8)  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two generations of 1024 tokens with the dim 1024 / depth 12 model: ~8 min on 2 cores
def test_readme_code_full_size():
    run_readme_code(image_size=256, num_tokens=8192, codebook_dim=512, dim=1024, text_seq_len=256, depth=12,
                    heads=16, batch=4, clip_depth=6, patch=32)  # fmt: skip


def test_original_import_paths_still_work():
    from dalle_pytorch import OpenAIDiscreteVAE, VQGanVAE
    from dalle_pytorch.data.text_image import TextImageDataset
    from dalle_pytorch.loader import TextImageDataset as LoaderDataset
    from dalle_pytorch.tokenizer import tokenizer
    from dalle_pytorch.vae import OpenAIDiscreteVAE as FromVae
    from dalle_pytorch.vae import VQGanVAE as VqganFromVae

    assert LoaderDataset is TextImageDataset
    assert FromVae is OpenAIDiscreteVAE and VqganFromVae is VQGanVAE
    assert tokenizer.vocab_size > 49000
