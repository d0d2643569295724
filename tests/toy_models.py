"""Tiny `PretrainedMixin` models and helpers shared by test_checkpoint.py and test_training_state.py (and the
subprocesses those tests start)."""

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from dalle_pytorch.io.checkpoint import WEIGHTS_NAME, PretrainedMixin


class ToyNet(PretrainedMixin, nn.Module):
    """An MLP whose constructor insists on a tuple, so config round trips must restore tuples."""

    def __init__(self, dim: int = 4, hidden: tuple = (8,), dropout: float = 0.0):
        super().__init__()
        if not isinstance(hidden, tuple):
            raise TypeError(f"hidden should be a tuple, got {type(hidden).__name__}")
        self.config = dict(dim=dim, hidden=hidden, dropout=dropout)
        sizes = (dim, *hidden, 1)
        layers = []
        for size_in, size_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(size_in, size_out), nn.Tanh(), nn.Dropout(dropout)]
        self.net = nn.Sequential(*layers[:-2])
        self.register_buffer("input_scale", torch.ones(dim))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)

    def forward(self, x):
        return self.net(x * self.input_scale)


class SubToyNet(ToyNet):
    pass


class TiedLM(PretrainedMixin, nn.Module):
    def __init__(self, vocab: int = 10, dim: int = 6):
        super().__init__()
        self.config = dict(vocab=vocab, dim=dim)
        self.embed = nn.Embedding(vocab, dim)
        self.to_logits = nn.Linear(dim, vocab, bias=False)
        self.to_logits.weight = self.embed.weight

    def forward(self, ids):
        return self.to_logits(self.embed(ids))


class ToyVAE(PretrainedMixin, nn.Module):
    def __init__(self, num_tokens: int = 7, dim: int = 5):
        super().__init__()
        self.config = dict(num_tokens=num_tokens, dim=dim)
        self.num_tokens = num_tokens
        self.codebook = nn.Embedding(num_tokens, dim)
        self.encoder = nn.Linear(dim, num_tokens)


class ToyDALLE(PretrainedMixin, nn.Module):
    pretrained_children = ("vae",)

    def __init__(self, *, vae: ToyVAE, dim: int = 5, share_codebook: bool = False):
        super().__init__()
        self.config = dict(dim=dim, share_codebook=share_codebook)
        self.vae = vae
        self.vae.requires_grad_(False)
        self.image_emb = nn.Embedding(vae.num_tokens, dim)
        if share_codebook:
            self.image_emb.weight = vae.codebook.weight
        self.to_logits = nn.Linear(dim, vae.num_tokens)

    def forward(self, ids):
        return self.to_logits(self.image_emb(ids))


class FetchingVAE(PretrainedMixin, nn.Module):
    """Stands in for a released VAE whose constructor downloads unless `_from_config` says not to."""

    def __init__(self, num_tokens: int = 4, download: bool = True):
        super().__init__()
        self.config = dict(num_tokens=num_tokens)
        self.downloaded = download
        self.codebook = nn.Embedding(num_tokens, 3)

    @classmethod
    def _from_config(cls, config, **children):
        return cls(**config, download=False)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def stored_keys(path: Path) -> set:
    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as file:
        return set(file.keys())


def perturbed(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator))
    return model
