"""CLIP: a small contrastive text-image model used to rank generated images (Radford et al. 2021,
https://arxiv.org/abs/2103.00020).

A text transformer and a ViT-style image transformer over raw pixel patches (Dosovitskiy et al. 2020,
https://arxiv.org/abs/2010.11929) are pooled and projected to a shared latent space; similarities are
cosines scaled by a learned temperature.

Shape letters: b batch, n positions, d model dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from dalle_pytorch.attention.layer import Attention
from dalle_pytorch.io.checkpoint import PretrainedMixin
from dalle_pytorch.models.transformer import FeedForward


class Encoder(nn.Module):
    """A bidirectional pre-norm transformer over (b, n, d) with an optional key padding mask (b, n)."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int = 64):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([nn.LayerNorm(dim), Attention(dim, heads, dim_head), nn.LayerNorm(dim), FeedForward(dim)])
            for _ in range(depth)
        )
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        mask = None
        if key_mask is not None:
            # a row with no real token would attend to nothing (NaN); let it attend to all, it is pooled away
            key_mask = key_mask | ~key_mask.any(dim=1, keepdim=True)
            mask = key_mask[:, None, None, :]  # (b, 1, 1, j)
        for norm_attn, attn, norm_ff, ff in self.layers:
            x = x + attn(norm_attn(x), mask)
            x = x + ff(norm_ff(x))
        return self.norm_out(x)


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of x (b, n, d) over positions where mask (b, n) is True."""
    if mask is None:
        return x.mean(dim=1)
    weights = mask[..., None].to(x.dtype)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class CLIP(PretrainedMixin, nn.Module):
    """Contrastive text-image model. Text: (b, <= text_seq_len) long, 0 = padding; images:
    (b, visual_image_channels, visual_image_size, visual_image_size) float, in the range it was trained on."""

    def __init__(
        self,
        *,
        dim_text: int = 512,
        dim_image: int = 512,
        dim_latent: int = 512,
        num_text_tokens: int = 10000,
        text_enc_depth: int = 6,
        text_seq_len: int = 256,
        text_heads: int = 8,
        num_visual_tokens: int = 512,
        visual_enc_depth: int = 6,
        visual_heads: int = 8,
        visual_image_size: int = 256,
        visual_patch_size: int = 32,
        channels: int = 3,
    ):
        super().__init__()
        if visual_image_size % visual_patch_size != 0:
            raise ValueError(
                f"visual_image_size ({visual_image_size}) must be divisible by visual_patch_size ({visual_patch_size})"
            )
        self.config = dict(
            dim_text=dim_text, dim_image=dim_image, dim_latent=dim_latent, num_text_tokens=num_text_tokens,
            text_enc_depth=text_enc_depth, text_seq_len=text_seq_len, text_heads=text_heads,
            num_visual_tokens=num_visual_tokens, visual_enc_depth=visual_enc_depth, visual_heads=visual_heads,
            visual_image_size=visual_image_size, visual_patch_size=visual_patch_size, channels=channels,
        )  # fmt: skip
        # num_visual_tokens is accepted for compatibility: this CLIP reads raw pixels, not VAE codes
        self.num_text_tokens, self.text_seq_len = num_text_tokens, text_seq_len
        self.image_size, self.patch_size, self.channels = visual_image_size, visual_patch_size, channels
        num_patches = (visual_image_size // visual_patch_size) ** 2

        self.text_emb = nn.Embedding(num_text_tokens, dim_text)
        self.text_pos_emb = nn.Embedding(text_seq_len, dim_text)
        self.text_transformer = Encoder(dim_text, text_enc_depth, text_heads, dim_head=dim_text // text_heads)
        self.to_text_latent = nn.Linear(dim_text, dim_latent, bias=False)

        self.to_patch_emb = nn.Linear(channels * visual_patch_size**2, dim_image)
        self.visual_pos_emb = nn.Embedding(num_patches, dim_image)
        self.visual_transformer = Encoder(dim_image, visual_enc_depth, visual_heads, dim_head=dim_image // visual_heads)
        self.to_visual_latent = nn.Linear(dim_image, dim_latent, bias=False)

        self.log_temperature = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, text: Tensor, text_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-token text features before pooling: text (b, n <= text_seq_len) long ->
        (encodings (b, n, dim_text), mask (b, n) bool, True at real tokens)."""
        if not torch.is_tensor(text) or text.dtype not in (torch.int64, torch.int32) or text.ndim != 2:
            raise TypeError(
                f"text must be a (batch, n) tensor of integer token ids, got {getattr(text, 'dtype', type(text))}"
            )
        if text.shape[1] > self.text_seq_len:
            raise ValueError(f"text has {text.shape[1]} tokens, more than text_seq_len={self.text_seq_len}")
        if text.numel() and (text.min() < 0 or text.max() >= self.num_text_tokens):
            raise ValueError(f"text token ids must be in [0, {self.num_text_tokens}), got [{text.min()}, {text.max()}]")
        mask = text != 0
        if text_mask is not None:
            if text_mask.shape != text.shape:
                raise ValueError(
                    f"text_mask must have the shape of text {tuple(text.shape)}, got {tuple(text_mask.shape)}"
                )
            mask = mask & text_mask.bool()
        x = self.text_emb(text) + self.text_pos_emb(torch.arange(text.shape[1], device=text.device))
        return self.text_transformer(x, mask), mask

    def embed_text(
        self, text: Tensor, text_mask: Tensor | None = None, return_encodings: bool = False
    ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """text (b, n <= text_seq_len) long -> unit-norm latents (b, dim_latent); with ``return_encodings``
        also the per-token features and their mask from :meth:`encode_text`."""
        encodings, mask = self.encode_text(text, text_mask)
        latents = F.normalize(self.to_text_latent(masked_mean(encodings, mask)), dim=-1)
        return (latents, encodings, mask) if return_encodings else latents

    def embed_image(self, image: Tensor) -> Tensor:
        """image (b, c, H, W) float -> unit-norm latents (b, dim_latent)."""
        expected = (self.channels, self.image_size, self.image_size)
        if not torch.is_tensor(image) or not image.is_floating_point():
            raise TypeError(f"image must be a float tensor, got {getattr(image, 'dtype', type(image))}")
        if image.ndim != 4 or tuple(image.shape[1:]) != expected:
            raise ValueError(
                f"image must have shape (batch, {', '.join(map(str, expected))}), got {tuple(image.shape)}"
            )
        patches = rearrange(image, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=self.patch_size, p2=self.patch_size)
        x = self.to_patch_emb(patches)
        x = x + self.visual_pos_emb(torch.arange(x.shape[1], device=x.device))
        x = self.visual_transformer(x)
        return F.normalize(self.to_visual_latent(x.mean(dim=1)), dim=-1)

    def forward(
        self, text: Tensor, image: Tensor, text_mask: Tensor | None = None, return_loss: bool = False
    ) -> Tensor:
        """Per-pair similarity (b,) of text i and image i, or the symmetric contrastive loss."""
        if text.shape[0] != image.shape[0]:
            raise ValueError(f"text and image batch sizes differ: {text.shape[0]} vs {image.shape[0]}")
        text_latents = self.embed_text(text, text_mask)
        image_latents = self.embed_image(image)
        scale = self.log_temperature.exp()
        if not return_loss:
            return (text_latents * image_latents).sum(dim=-1) * scale
        logits = text_latents @ image_latents.t() * scale  # (b text, b image)
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
