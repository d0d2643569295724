"""Tiny seeded configurations shared by the tests."""

import pytest
import torch

from dalle_pytorch import CLIP, DALLE, DiscreteVAE

VAE_CONFIG = dict(image_size=16, num_layers=2, num_tokens=32, codebook_dim=16, hidden_dim=8, num_resnet_blocks=1)
TEXT_SEQ_LEN = 6
NUM_TEXT_TOKENS = 20


def make_vae(**overrides) -> DiscreteVAE:
    torch.manual_seed(0)
    return DiscreteVAE(**{**VAE_CONFIG, **overrides})


def make_dalle(vae=None, **overrides) -> DALLE:
    vae = vae if vae is not None else make_vae()
    torch.manual_seed(0)
    config = dict(
        dim=32, vae=vae, num_text_tokens=NUM_TEXT_TOKENS, text_seq_len=TEXT_SEQ_LEN, depth=2, heads=2, dim_head=16
    )
    return DALLE(**{**config, **overrides})


def make_clip(**overrides) -> CLIP:
    torch.manual_seed(0)
    config = dict(
        dim_text=32, dim_image=32, dim_latent=16, num_text_tokens=NUM_TEXT_TOKENS, text_enc_depth=1,
        text_seq_len=TEXT_SEQ_LEN, text_heads=2, num_visual_tokens=32, visual_enc_depth=1,
        visual_image_size=16, visual_patch_size=4, visual_heads=2,
    )  # fmt: skip
    return CLIP(**{**config, **overrides})


def random_text(batch: int, seed: int = 1, length: int = TEXT_SEQ_LEN) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, NUM_TEXT_TOKENS, (batch, length), generator=g)


def random_images(batch: int, seed: int = 2, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g)


@pytest.fixture
def vae():
    return make_vae()


@pytest.fixture
def dalle():
    return make_dalle()


@pytest.fixture
def clip():
    return make_clip()


@pytest.fixture(scope="module")
def one_thread_per_module():
    """torch on one thread for a test module: the test machine's 2 cores are shared, and OpenMP spin-waiting
    with 2 threads makes tiny models many times slower. Module-scoped, so module fixtures run under it too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches emptied before and after the test: the compiled decoding step is one function,
    and a process may compile it for at most ``torch._dynamo.config.recompile_limit`` models, so tests that
    compile it for models of their own must not use up the budget of the tests after them."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
