"""Compatibility: the original project's `dalle_pytorch.vae` module held the image tokenizers."""

from dalle_pytorch.image_tokenizers.pretrained_vae import OpenAIDiscreteVAE, VQGanVAE
from dalle_pytorch.models.vae import DiscreteVAE

__all__ = ["DiscreteVAE", "OpenAIDiscreteVAE", "VQGanVAE"]
