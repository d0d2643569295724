"""CLIP adapters: OpenAI-space tokenization, the OpenCLIP adapter's logic on a small stand-in with OpenCLIP's
documented layout, and (where ``open_clip_torch`` imports) on randomly initialised OpenCLIP models."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dalle_pytorch.diffusion.clip_adapter import (
    OPENAI_IMAGE_MEAN,
    OPENAI_IMAGE_STD,
    OpenClipAdapter,
    as_clip_adapter,
    openai_clip_tokenize,
)
from dalle_pytorch.diffusion.prior import DiffusionPrior, DiffusionPriorNetwork
from dalle_pytorch.text.tokenizer import tokenizer


def test_openai_clip_tokenize():
    ids = openai_clip_tokenize(["a red square", "b"], context_length=8)
    words = [i - 1 for i in tokenizer.encode("a red square")]  # our ids are CLIP's shifted up by one
    assert ids[0].tolist() == [49406, *words, 49407] + [0] * (8 - len(words) - 2)
    cut = openai_clip_tokenize(["one two three four five six seven eight nine"], context_length=5)
    assert cut[0, 0] == 49406 and cut[0, -1] == 49407 and (cut != 0).all()


class _Visual(nn.Module):
    def __init__(self):
        super().__init__()
        self.image_size, self.output_dim = (8, 8), 6
        self.proj = nn.Linear(3 * 8 * 8, 6)


class StandIn(nn.Module):
    """Not OpenCLIP: a few layers with the attributes and the encode_text / encode_image flow that OpenCLIP
    documents (token + positional embedding over the full context, transformer, ln_final, pooled at the end
    token, projected), to test the adapter's own logic where open_clip cannot be imported."""

    def __init__(self, context_length=7, width=10):
        super().__init__()
        torch.manual_seed(0)
        self.context_length, self.visual = context_length, _Visual()
        self.token_embedding = nn.Embedding(49408, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width))
        self.transformer = nn.Linear(width, width)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, 6))

    def encode_text(self, text):
        x = self.token_embedding(text) + self.positional_embedding  # needs the full context length
        x = self.ln_final(self.transformer(x))
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def encode_image(self, image):
        return self.visual.proj(image.flatten(1))


def test_open_clip_adapter_logic_on_a_stand_in():
    model = StandIn()
    adapter = OpenClipAdapter(model)
    assert (adapter.dim_latent, adapter.text_encoding_dim, adapter.image_size, adapter.max_text_len) == (6, 10, 8, 7)
    ids = adapter.prepare_text(["a red b", "c"])
    assert ids.shape == (2, 7) and ids[0, 0] == 49406
    embeds = adapter.embed_text(ids[:, :5])  # shorter ids are padded to the model's context
    padded = F.pad(ids[:, :5], (0, 2))
    torch.testing.assert_close(embeds.text_embed, F.normalize(model.encode_text(padded), dim=-1))
    assert embeds.text_encodings.shape == (2, 7, 10) and torch.equal(embeds.mask, padded != 0)
    pooled = embeds.text_encodings[torch.arange(2), padded.argmax(-1)] @ model.text_projection
    torch.testing.assert_close(embeds.text_embed, F.normalize(pooled, dim=-1))  # the encodings are what is pooled

    images = torch.rand(2, 3, 16, 16)
    mean, std = torch.tensor(OPENAI_IMAGE_MEAN)[:, None, None], torch.tensor(OPENAI_IMAGE_STD)[:, None, None]
    small = F.interpolate(images, size=(8, 8), mode="bilinear", align_corners=False)
    expected = F.normalize(model.encode_image((small - mean) / std), dim=-1)
    torch.testing.assert_close(adapter.embed_image(images), expected)
    with pytest.raises(TypeError, match="OpenCLIP model"):
        OpenClipAdapter(nn.Linear(2, 2))


def test_prior_runs_on_an_open_clip_style_adapter_and_refuses_to_save_it(tmp_path):
    adapter = OpenClipAdapter(StandIn())
    net = DiffusionPriorNetwork(dim=16, depth=1, dim_head=8, heads=2, image_embed_dim=6, text_encoding_dim=10)
    prior = DiffusionPrior(net, adapter, timesteps=10)
    assert prior.clip is adapter.clip and as_clip_adapter(adapter) is adapter
    loss = prior(["a red square", "b"], torch.rand(2, 3, 8, 8))
    loss.backward()
    assert all(p.grad is None for p in adapter.clip.parameters())
    assert prior.sample(["a red square"], sample_steps=3).shape == (1, 6)
    with pytest.raises(TypeError, match="PretrainedMixin"):
        prior.save_pretrained(tmp_path / "prior")


def test_with_a_randomly_initialised_open_clip_model():
    open_clip = pytest.importorskip("open_clip")  # needs torchvision, which does not import beside every torch
    adapter = OpenClipAdapter.create("ViT-S-32", pretrained=None)
    model = adapter.clip.eval()
    captions = ["a butterfly trying to escape a tornado", "a red square"]
    ids = adapter.prepare_text(captions)
    assert torch.equal(ids, open_clip.tokenize(captions))  # our BPE in OpenAI's id space == OpenCLIP's tokenizer
    with torch.no_grad():
        embeds = adapter.embed_text(ids)
        torch.testing.assert_close(embeds.text_embed, model.encode_text(ids, normalize=True))
        pooled = embeds.text_encodings[torch.arange(2), ids.argmax(-1)] @ model.text_projection
        torch.testing.assert_close(embeds.text_embed, F.normalize(pooled, dim=-1), atol=1e-5, rtol=1e-4)
        images = torch.rand(2, 3, 224, 224)
        mean, std = torch.tensor(OPENAI_IMAGE_MEAN)[:, None, None], torch.tensor(OPENAI_IMAGE_STD)[:, None, None]
        torch.testing.assert_close(
            adapter.embed_image(images), model.encode_image((images - mean) / std, normalize=True)
        )
    net = DiffusionPriorNetwork(dim=64, depth=1, dim_head=16, heads=2, image_embed_dim=adapter.dim_latent,
                                text_encoding_dim=adapter.text_encoding_dim)  # fmt: skip
    prior = DiffusionPrior(net, adapter, timesteps=10)
    prior(captions, images).backward()
    assert prior.sample(captions, sample_steps=2).shape == (2, adapter.dim_latent)
