"""dalle_pytorch: DALL-E style text-to-image models in PyTorch.

Public API: DiscreteVAE, OpenAIDiscreteVAE, VQGanVAE (image tokenizers), DALLE (the text-to-image
transformer) and CLIP (ranks generated images against their text); DALL-E 2 beside it: DiffusionPriorNetwork
and DiffusionPrior (text -> CLIP image embedding), Unet and Decoder (embedding -> image), DALLE2 (both).
"""

from dalle_pytorch._version import __version__
from dalle_pytorch.diffusion import DALLE2, Decoder, DiffusionPrior, DiffusionPriorNetwork, Unet
from dalle_pytorch.image_tokenizers.pretrained_vae import OpenAIDiscreteVAE, VQGanVAE
from dalle_pytorch.models.clip import CLIP
from dalle_pytorch.models.dalle import DALLE
from dalle_pytorch.models.vae import DiscreteVAE

__all__ = [
    "CLIP",
    "DALLE",
    "DALLE2",
    "Decoder",
    "DiffusionPrior",
    "DiffusionPriorNetwork",
    "DiscreteVAE",
    "OpenAIDiscreteVAE",
    "Unet",
    "VQGanVAE",
    "__version__",
]
