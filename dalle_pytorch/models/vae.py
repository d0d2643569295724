"""DiscreteVAE: the image tokenizer trained from scratch.

A convolutional encoder maps an image to logits over ``num_tokens`` codes on an ``fmap x fmap`` grid
(fmap = image_size / 2 ** num_layers); a relaxed one-hot sample (Gumbel-softmax, Jang et al. 2016,
https://arxiv.org/abs/1611.01144; or ReinMax, Liu et al. 2023, https://arxiv.org/abs/2304.08612) picks
codebook vectors that a mirrored decoder turns back into an image. As in the DALL-E paper
(https://arxiv.org/abs/2102.12092) a KL term pulls the code distribution toward uniform.

Value range: images go in as given (e.g. [0, 1]) and are normalised inside with ``normalization``
(mean, std per channel); everything that returns images (``decode``, reconstructions) undoes that, so
outputs are in the same range as inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from dalle_pytorch.io.checkpoint import PretrainedMixin


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) + x


def reinmax_one_hot(logits: Tensor, temperature: float, dim: int = 1) -> Tensor:
    """A hard one-hot sample with ReinMax's second-order gradient estimate (arXiv 2304.08612, Alg. 2)."""
    probs = logits.softmax(dim=dim)
    gumbels = -torch.empty_like(logits).exponential_().log()
    index = (logits + gumbels).argmax(dim=dim, keepdim=True)
    hard = torch.zeros_like(logits).scatter_(dim, index, 1.0)
    pi1 = (hard + (logits / temperature).softmax(dim=dim)) / 2
    pi1 = ((pi1.log() - logits).detach() + logits).softmax(dim=dim)
    pi2 = 2 * pi1 - probs / 2
    return pi2 - pi2.detach() + hard


def kl_to_uniform(logits: Tensor) -> Tensor:
    """KL(q || uniform) of code logits (b, num_tokens, h, w), averaged over samples and grid cells."""
    log_q = rearrange(logits, "b n h w -> b h w n").log_softmax(dim=-1)
    # per cell: sum_n q log q + log(num_tokens)
    return (log_q.exp() * log_q).sum(dim=-1).mean() + math.log(logits.shape[1])


class DiscreteVAE(PretrainedMixin, nn.Module):
    """Discrete VAE over (b, channels, image_size, image_size) images; see the module docstring for ranges."""

    def __init__(
        self,
        image_size: int = 256,
        num_tokens: int = 512,
        codebook_dim: int = 512,
        num_layers: int = 3,
        num_resnet_blocks: int = 0,
        hidden_dim: int = 64,
        channels: int = 3,
        smooth_l1_loss: bool = False,
        temperature: float = 0.9,
        straight_through: bool = False,
        reinmax: bool = False,
        kl_div_loss_weight: float = 0.0,
        normalization: Sequence[Sequence[float]] | None = ((0.5,) * 3, (0.5,) * 3),
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if image_size % (2**num_layers) != 0:
            raise ValueError(f"image_size ({image_size}) must be divisible by 2 ** num_layers ({2**num_layers})")
        if num_tokens < 2:
            raise ValueError(f"num_tokens must be >= 2, got {num_tokens}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if normalization is not None:
            mean, std = (list(map(float, v)) for v in normalization)
            if len(mean) != channels or len(std) != channels or min(std) <= 0:
                raise ValueError(
                    f"normalization must be (mean, std) with {channels} values each and std > 0, got {normalization}"
                )
            normalization = (mean, std)
        self.config = dict(
            image_size=image_size, num_tokens=num_tokens, codebook_dim=codebook_dim, num_layers=num_layers,
            num_resnet_blocks=num_resnet_blocks, hidden_dim=hidden_dim, channels=channels,
            smooth_l1_loss=smooth_l1_loss, temperature=temperature, straight_through=straight_through,
            reinmax=reinmax, kl_div_loss_weight=kl_div_loss_weight, normalization=normalization,
        )  # fmt: skip
        self.image_size, self.num_tokens, self.num_layers, self.channels = image_size, num_tokens, num_layers, channels
        self.temperature, self.straight_through, self.reinmax = temperature, straight_through, reinmax
        self.kl_div_loss_weight = kl_div_loss_weight
        self.recon_loss = F.smooth_l1_loss if smooth_l1_loss else F.mse_loss

        self.codebook = nn.Embedding(num_tokens, codebook_dim)
        encoder, decoder = [], []
        in_ch = channels
        for _ in range(num_layers):
            encoder += [nn.Conv2d(in_ch, hidden_dim, 4, stride=2, padding=1), nn.ReLU()]
            in_ch = hidden_dim
        encoder += [ResBlock(hidden_dim) for _ in range(num_resnet_blocks)]
        encoder.append(nn.Conv2d(hidden_dim, num_tokens, 1))
        decoder.append(nn.Conv2d(codebook_dim, hidden_dim, 1))
        decoder += [ResBlock(hidden_dim) for _ in range(num_resnet_blocks)]
        for _ in range(num_layers):
            decoder += [nn.ConvTranspose2d(hidden_dim, hidden_dim, 4, stride=2, padding=1), nn.ReLU()]
        decoder.append(nn.Conv2d(hidden_dim, channels, 1))
        self.encoder, self.decoder = nn.Sequential(*encoder), nn.Sequential(*decoder)

        if normalization is not None:
            self.register_buffer("norm_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("norm_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.normalized = normalization is not None

    @property
    def fmap_size(self) -> int:
        """Side of the token grid: image_size / 2 ** num_layers."""
        return self.image_size // 2**self.num_layers

    def _check_images(self, img: Tensor) -> Tensor:
        """Checked images, cast to the dtype of the weights (float64 or float16 images are accepted)."""
        if not torch.is_tensor(img) or not img.is_floating_point():
            raise TypeError(f"images must be a float tensor, got {type(img).__name__} {getattr(img, 'dtype', '')}")
        expected = (self.channels, self.image_size, self.image_size)
        if img.ndim != 4 or tuple(img.shape[1:]) != expected:
            raise ValueError(f"images must have shape (batch, {', '.join(map(str, expected))}), got {tuple(img.shape)}")
        if not bool(torch.isfinite(img).all()):
            raise ValueError("images contain NaN or infinite values")
        return img.to(self.codebook.weight.dtype)  # a new tensor when the dtype differs; the input is untouched

    def normalize(self, img: Tensor) -> Tensor:
        return (img - self.norm_mean) / self.norm_std if self.normalized else img

    def denormalize(self, img: Tensor) -> Tensor:
        return img * self.norm_std + self.norm_mean if self.normalized else img

    @torch.no_grad()
    def get_codebook_indices(self, images: Tensor) -> Tensor:
        """images (b, c, H, W) -> the most likely code of each grid cell, (b, fmap * fmap) long."""
        logits = self(images, return_logits=True)
        return rearrange(logits.argmax(dim=1), "b h w -> b (h w)")

    def decode(self, img_seq: Tensor) -> Tensor:
        """Codes (b, fmap * fmap) long -> images (b, c, H, W) in the range of the images given to forward."""
        if not torch.is_tensor(img_seq) or img_seq.dtype not in (torch.int32, torch.int64) or img_seq.ndim != 2:
            shape = tuple(img_seq.shape) if torch.is_tensor(img_seq) else type(img_seq).__name__
            raise TypeError(f"img_seq must be a (batch, n) integer tensor, got {getattr(img_seq, 'dtype', '')} {shape}")
        side = self.fmap_size
        if img_seq.shape[1] != side * side:
            raise ValueError(
                f"img_seq must hold {side * side} codes per image (a square {side}x{side} grid), got {img_seq.shape[1]}"
            )
        if img_seq.numel() and (img_seq.min() < 0 or img_seq.max() >= self.num_tokens):
            raise ValueError(
                f"img_seq codes must be in [0, {self.num_tokens}), got [{int(img_seq.min())}, {int(img_seq.max())}]"
            )
        codes = rearrange(self.codebook(img_seq), "b (h w) d -> b d h w", h=side)
        return self.denormalize(self.decoder(codes))

    def decode_relaxed(self, probs: Tensor) -> Tensor:
        """Relaxed codes (b, fmap * fmap, num_tokens), rows of weights over the codebook (e.g. a softmax) ->
        images (b, c, H, W) like `decode`, differentiable in `probs`; a one-hot row decodes as its code."""
        if not torch.is_tensor(probs) or not probs.is_floating_point() or probs.ndim != 3:
            raise TypeError(f"probs must be a (batch, n, num_tokens) float tensor, got {type(probs).__name__}")
        if probs.shape[1:] != (self.fmap_size**2, self.num_tokens):
            raise ValueError(
                f"probs must have shape (batch, {self.fmap_size**2}, {self.num_tokens}), got {tuple(probs.shape)}"
            )
        codes = rearrange(probs @ self.codebook.weight, "b (h w) d -> b d h w", h=self.fmap_size)
        return self.denormalize(self.decoder(codes))

    def forward(
        self,
        img: Tensor,
        return_loss: bool = False,
        return_recons: bool = False,
        return_logits: bool = False,
        temp: float | None = None,
    ):
        """img (b, c, H, W) -> reconstruction, or the loss (and reconstruction), or the code logits.

        Images of another float dtype (e.g. float64) are cast to the dtype of the weights; NaN or infinite
        pixels are a ValueError. ``temp`` overrides the Gumbel-softmax temperature and must be > 0.

        Loss = reconstruction loss (in normalised space) + kl_div_loss_weight * KL(q || uniform), the KL
        averaged over samples and grid cells so it does not grow with batch or image size.
        """
        img = self._check_images(img)
        if temp is not None and (isinstance(temp, bool) or not isinstance(temp, int | float) or not temp > 0):
            raise ValueError(f"temp must be a number > 0 (the Gumbel-softmax temperature), got {temp!r}")
        img_norm = self.normalize(img)
        logits = self.encoder(img_norm)  # (b, num_tokens, fmap, fmap)
        if return_logits:
            return logits

        temp = self.temperature if temp is None else temp
        if self.reinmax:
            one_hot = reinmax_one_hot(logits, temp, dim=1)
        else:
            one_hot = F.gumbel_softmax(logits, tau=temp, dim=1, hard=self.straight_through)
        sampled = torch.einsum("b n h w, n d -> b d h w", one_hot, self.codebook.weight)
        out = self.decoder(sampled)
        if not return_loss:
            return self.denormalize(out)

        recon_loss = self.recon_loss(out, img_norm)
        loss = recon_loss + self.kl_div_loss_weight * kl_to_uniform(logits)
        return (loss, self.denormalize(out)) if return_recons else loss
