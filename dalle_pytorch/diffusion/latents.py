"""The spaces a decoder U-Net diffuses in: pixels, or the continuous latents of one of our image tokenizers.

Latent diffusion (Rombach et al. 2021, https://arxiv.org/abs/2112.10752) runs the diffusion on a frozen
autoencoder's latent grid instead of pixels. A latent space here is a small interface:

- ``encode(images)``: images (b, 3, S, S) in [0, 1] -> latents (b, channels, S / f, S / f);
- ``decode(latents)``: latents -> images (b, 3, S, S), clamped to [0, 1];
- ``channels``, ``downsample_factor`` f and ``image_size`` (the pixel size it encodes, None for any).

Our tokenizers are discrete; their continuous latent is the **codebook embedding of each cell's code**
(the vector their decoder reads), so ``decode(encode(x))`` is exactly the tokenizer's reconstruction
``decode(get_codebook_indices(x))``, and any latent in between decodes too:

- ``DiscreteVAE``: ``codebook(argmax encoder logits)``, ``codebook_dim`` channels, f = 2 ** num_layers;
- ``VQGanVAE``: the quantizer's embedding of the nearest code, ``embed_dim`` channels, f = 2 ** (levels - 1).

OpenAI's released dVAE has no continuous latent of useful width (its decoder reads 8192-way one-hots) and is
not supported.
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn

from dalle_pytorch.image_tokenizers.pretrained_vae import VQGanVAE
from dalle_pytorch.models.vae import DiscreteVAE


class LatentSpace(nn.Module):
    """Base class: subclass it (``encode``, ``decode``, ``channels``, ``downsample_factor``) for another autoencoder."""

    channels: int = 3
    downsample_factor: int = 1
    image_size: int | None = None

    def encode(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError


class PixelSpace(LatentSpace):
    """Identity up to scaling: images in [0, 1] <-> [-1, 1], the range a Gaussian diffusion is built for."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.channels = channels

    def encode(self, images: Tensor) -> Tensor:
        return images * 2 - 1

    def decode(self, latents: Tensor) -> Tensor:
        return ((latents + 1) / 2).clamp(0, 1)


class DiscreteVAELatents(LatentSpace):
    """A frozen ``DiscreteVAE``: the codebook vector of each cell's most likely code."""

    def __init__(self, vae: DiscreteVAE):
        super().__init__()
        self.vae = vae
        self.channels = vae.codebook.embedding_dim
        self.downsample_factor = 2**vae.num_layers
        self.image_size = vae.image_size

    def encode(self, images: Tensor) -> Tensor:
        codes = self.vae(images, return_logits=True).argmax(dim=1)  # (b, h, w)
        return rearrange(self.vae.codebook(codes), "b h w d -> b d h w")

    def decode(self, latents: Tensor) -> Tensor:
        # the VAE undoes its own normalisation, so this is in the range of the images it was trained on
        return self.vae.denormalize(self.vae.decoder(latents)).clamp(0, 1)


class VQGanLatents(LatentSpace):
    """A frozen ``VQGanVAE``: the quantizer's embedding of each cell's code."""

    def __init__(self, vae: VQGanVAE):
        super().__init__()
        self.vae = vae
        self.channels = vae.config["embed_dim"]
        self.downsample_factor = 2**vae.num_layers
        self.image_size = vae.image_size

    def encode(self, images: Tensor) -> Tensor:
        codes = self.vae.model.encode(images * 2 - 1)  # (b, h, w)
        return rearrange(self.vae.model.quantize.lookup(codes), "b h w d -> b d h w")

    def decode(self, latents: Tensor) -> Tensor:
        model = self.vae.model
        return ((model.decoder(model.post_quant_conv(latents)) + 1) / 2).clamp(0, 1)


def latent_space(vae: nn.Module | None, channels: int = 3) -> LatentSpace:
    """The latent space of ``vae``: None -> pixels; DiscreteVAE, VQGanVAE or a LatentSpace subclass."""
    if vae is None:
        return PixelSpace(channels)
    if isinstance(vae, LatentSpace):
        return vae
    if isinstance(vae, DiscreteVAE):
        return DiscreteVAELatents(vae)
    if isinstance(vae, VQGanVAE):
        return VQGanLatents(vae)
    raise TypeError(
        f"vae must be None (pixel space), a DiscreteVAE, a VQGanVAE or a LatentSpace, got {type(vae).__name__}; "
        "OpenAIDiscreteVAE has no continuous latent space to diffuse in"
    )

