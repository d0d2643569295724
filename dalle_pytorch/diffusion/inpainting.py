"""Inpainting by resampling (RePaint, Lugmayr et al. 2022, https://arxiv.org/abs/2201.09865).

An unconditionally trained diffusion model fills a masked region: after every denoising step the known
region is replaced by the known image noised to the same level, and, so that the generated part can agree
with what was pasted in, each step is repeated ``resample_times`` times, going back to the noisier level by
the forward process in between (the paper's Algorithm 1 with jump length 1).

Works on the DDPM schedule and on a DDIM subsequence (re-noising then jumps from t_prev back to t).
Shape letters: b batch, c channels, x y spatial.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dalle_pytorch.diffusion.samplers import ddim_step, ddim_timesteps, ddpm_step, randn
from dalle_pytorch.diffusion.schedule import NoiseSchedule
from dalle_pytorch.models.sampling import Generators


def _noise_back(schedule: NoiseSchedule, x_prev: Tensor, t_prev: int, t: int, generator: Generators) -> Tensor:
    """A draw from q(x_t | x_t_prev) = N(sqrt(abar_t / abar_prev) x_prev, (1 - abar_t / abar_prev) I)."""
    ratio = schedule.alphas_cumprod[t] / schedule.alphas_cumprod[t_prev]
    noise = randn(x_prev.shape, generator, x_prev.device, x_prev.dtype)
    return ratio.sqrt().to(x_prev) * x_prev + (1 - ratio).sqrt().to(x_prev) * noise


def repaint_loop(
    model_fn: Callable[[Tensor, Tensor], Tensor],
    schedule: NoiseSchedule,
    known: Tensor,
    known_mask: Tensor,
    *,
    resample_times: int = 5,
    sample_steps: int | None = None,
    eta: float = 0.0,
    generator: Generators = None,
    clip_x0: tuple[float, float] | None = None,
) -> Tensor:
    """Sample (b, c, x, y) whose region ``known_mask`` (b, 1, x, y) bool equals ``known`` (b, c, x, y) exactly.

    ``model_fn(x_t, t) -> x0_pred``; ``sample_steps``: None for DDPM over all timesteps, else DDIM.
    """
    if isinstance(resample_times, bool) or not isinstance(resample_times, int) or resample_times < 1:
        raise ValueError(f"inpaint_resample_times must be a positive int, got {resample_times!r}")
    batch = known.shape[0]
    times = list(range(schedule.timesteps - 1, -1, -1)) if sample_steps is None else (
        ddim_timesteps(schedule.timesteps, sample_steps))  # fmt: skip
    x = randn(known.shape, generator, known.device, known.dtype)
    for i, t in enumerate(times):
        t_prev = times[i + 1] if i + 1 < len(times) else -1
        t_batch = torch.full((batch,), t, dtype=torch.long, device=known.device)
        for repeat in range(resample_times):
            x0_pred = model_fn(x, t_batch)
            if sample_steps is None:
                x_prev = ddpm_step(schedule, x, t, x0_pred, generator=generator, clip_x0=clip_x0)
            else:
                x_prev = ddim_step(schedule, x, t, t_prev, x0_pred, eta=eta, generator=generator, clip_x0=clip_x0)
            if t_prev >= 0:
                prev_batch = torch.full((batch,), t_prev, dtype=torch.long, device=known.device)
                known_prev = schedule.q_sample(known, prev_batch, randn(known.shape, generator, known.device))
            else:
                known_prev = known
            x_prev = torch.where(known_mask, known_prev, x_prev)
            if repeat == resample_times - 1 or t_prev < 0:
                break
            x = _noise_back(schedule, x_prev, t_prev, t, generator)
        x = x_prev
    return x
