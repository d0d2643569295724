"""DALL-E 2 (unCLIP; Ramesh et al. 2022, https://arxiv.org/abs/2204.06125): noise schedules and samplers,
the diffusion prior (text -> CLIP image embedding), the decoder (image embedding -> image) and DALLE2.
"""

from dalle_pytorch.diffusion.samplers import ddim_step, ddim_timesteps, ddpm_step, guided_forward, sample_loop
from dalle_pytorch.diffusion.schedule import NoiseSchedule

__all__ = ["NoiseSchedule", "ddim_step", "ddim_timesteps", "ddpm_step", "guided_forward", "sample_loop"]
