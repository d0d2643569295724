"""DALL-E 2 (unCLIP; Ramesh et al. 2022, https://arxiv.org/abs/2204.06125): noise schedules and samplers,
the diffusion prior (text -> CLIP image embedding), the decoder U-Nets (image embedding -> image), CLIP
adapters and DALLE2, which chains the prior and the decoder.
"""

from dalle_pytorch.diffusion.clip_adapter import BaseClipAdapter, ClipAdapter, OpenClipAdapter
from dalle_pytorch.diffusion.dalle2 import DALLE2
from dalle_pytorch.diffusion.decoder import Decoder
from dalle_pytorch.diffusion.prior import DiffusionPrior, DiffusionPriorNetwork
from dalle_pytorch.diffusion.samplers import ddim_step, ddim_timesteps, ddpm_step, guided_forward, sample_loop
from dalle_pytorch.diffusion.schedule import NoiseSchedule
from dalle_pytorch.diffusion.unet import Unet

__all__ = [
    "DALLE2",
    "BaseClipAdapter",
    "ClipAdapter",
    "Decoder",
    "DiffusionPrior",
    "DiffusionPriorNetwork",
    "NoiseSchedule",
    "OpenClipAdapter",
    "Unet",
    "ddim_step",
    "ddim_timesteps",
    "ddpm_step",
    "guided_forward",
    "sample_loop",
]
