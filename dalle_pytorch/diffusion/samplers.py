"""Diffusion samplers: ancestral DDPM steps, DDIM steps, a sampling loop and classifier-free guidance.

- DDPM (Ho et al. 2020, https://arxiv.org/abs/2006.11239): x_{t-1} ~ q(x_{t-1} | x_t, x0_pred), no noise at
  t = 0.
- DDIM (Song et al. 2020, https://arxiv.org/abs/2010.02502): a subsequence of the timesteps; ``eta=0`` is
  deterministic, ``eta=1`` over every timestep is exactly the DDPM step.
- Classifier-free guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598): conditioned and
  unconditioned rows run as one batch, ``uncond + cond_scale * (cond - uncond)``.

Models hand the samplers a prediction of the clean sample x0 (a noise-predicting model converts with
``NoiseSchedule.predict_x0_from_noise``). Randomness follows DALLE's generation: ``generator`` is one
``torch.Generator`` or a list with one per sample, and with a list each row depends only on its own
generator, so a batch equals its rows sampled one by one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from dalle_pytorch.diffusion.schedule import NoiseSchedule
from dalle_pytorch.models.sampling import Generators, guide, per_sample_draw

ModelFn = Callable[[Tensor, Tensor], Tensor]


def randn(shape: Sequence[int], generator: Generators, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise of ``shape`` (b, ...); with a list of generators row i comes from generator i."""
    shape = tuple(shape)
    draw = functools.partial(torch.randn, dtype=dtype)
    return per_sample_draw(draw, shape[0], shape[1:], generator, device if device is not None else "cpu")


def _clip(x0: Tensor, clip_x0: tuple[float, float] | None) -> Tensor:
    return x0 if clip_x0 is None else x0.clamp(*clip_x0)


def _timestep_tensor(t: int | Tensor, batch: int, device) -> Tensor:
    if torch.is_tensor(t):
        return t.to(device=device, dtype=torch.long).expand(batch) if t.ndim == 0 else t.to(device)
    return torch.full((batch,), int(t), dtype=torch.long, device=device)


def ddpm_step(
    schedule: NoiseSchedule,
    x_t: Tensor,
    t: int | Tensor,
    x0_pred: Tensor,
    generator: Generators = None,
    clip_x0: tuple[float, float] | None = None,
) -> Tensor:
    """One ancestral step: a draw from q(x_{t-1} | x_t, x0_pred) (its mean where t == 0). x_t: (b, ...)."""
    t = _timestep_tensor(t, x_t.shape[0], x_t.device)
    mean, _, log_variance = schedule.q_posterior(_clip(x0_pred, clip_x0), x_t, t)
    noise = randn(x_t.shape, generator, x_t.device, x_t.dtype)
    nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))  # (b, 1, ..., 1)
    return mean + nonzero * (0.5 * log_variance).exp() * noise


def ddim_timesteps(timesteps: int, sample_steps: int) -> list[int]:
    """``sample_steps`` distinct timesteps, evenly spread, descending from timesteps - 1 to 0."""
    if isinstance(sample_steps, bool) or not isinstance(sample_steps, int) or not 1 <= sample_steps <= timesteps:
        raise ValueError(f"sample_steps must be an int in [1, {timesteps}], got {sample_steps!r}")
    if sample_steps == 1:
        return [timesteps - 1]
    # integer spacing >= 1 keeps the steps distinct and hits both ends exactly
    return [timesteps - 1 - (i * (timesteps - 1)) // (sample_steps - 1) for i in range(sample_steps)]


def ddim_step(
    schedule: NoiseSchedule,
    x_t: Tensor,
    t: int | Tensor,
    t_prev: int | Tensor,
    x0_pred: Tensor,
    eta: float = 0.0,
    generator: Generators = None,
    clip_x0: tuple[float, float] | None = None,
) -> Tensor:
    """One DDIM step from timestep t to t_prev < t (t_prev = -1: to the clean sample, abar = 1).

    x_{t_prev} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z with
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev); no noise is drawn at eta=0.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    batch = x_t.shape[0]
    t = _timestep_tensor(t, batch, x_t.device)
    t_prev = _timestep_tensor(t_prev, batch, x_t.device)
    if (t_prev >= t).any() or (t_prev < -1).any():
        raise ValueError("ddim_step needs -1 <= t_prev < t")
    x0_pred = _clip(x0_pred, clip_x0)
    eps = schedule.predict_noise_from_x0(x_t, t, x0_pred)
    abar_t = schedule._at(schedule.alphas_cumprod, t, x_t)
    abar_prev = schedule._at(schedule.alphas_cumprod, t_prev.clamp(min=0), x_t)
    abar_prev = torch.where(t_prev.reshape(abar_prev.shape) < 0, torch.ones_like(abar_prev), abar_prev)
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).clamp(min=0).sqrt()
    x_prev = abar_prev.sqrt() * x0_pred + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0:
        x_prev = x_prev + sigma * randn(x_t.shape, generator, x_t.device, x_t.dtype)
    return x_prev


def sample_loop(
    model_fn: ModelFn,
    shape: Sequence[int],
    schedule: NoiseSchedule,
    *,
    sample_steps: int | None = None,
    eta: float = 0.0,
    generator: Generators = None,
    clip_x0: tuple[float, float] | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
    x_start: Tensor | None = None,
    on_step: Callable[[Tensor, int], Tensor] | None = None,
) -> Tensor:
    """Sample (b, ...) from pure noise with ``model_fn(x_t, t (b,) long) -> x0_pred``.

    ``sample_steps=None``: DDPM over all timesteps; an int: DDIM over that many timesteps with ``eta``.
    ``x_start``: the starting noise instead of drawing it; ``on_step(x, t_prev)`` may replace x after each
    step (e.g. to paste known pixels in). The noise is drawn from ``generator`` (see the module docstring).
    """
    device = device if device is not None else schedule.betas.device
    x = randn(shape, generator, device, dtype) if x_start is None else x_start
    batch = x.shape[0]
    if sample_steps is None:
        times = list(range(schedule.timesteps - 1, -1, -1))
    else:
        times = ddim_timesteps(schedule.timesteps, sample_steps)
    for i, t in enumerate(times):
        t_prev = times[i + 1] if i + 1 < len(times) else -1
        x0_pred = model_fn(x, torch.full((batch,), t, dtype=torch.long, device=x.device))
        if sample_steps is None:
            x = ddpm_step(schedule, x, t, x0_pred, generator=generator, clip_x0=clip_x0)
        else:
            x = ddim_step(schedule, x, t, t_prev, x0_pred, eta=eta, generator=generator, clip_x0=clip_x0)
        if on_step is not None:
            x = on_step(x, t_prev)
    return x


def check_cond_scale(cond_scale: float) -> None:
    """Guidance scales below 1 would move away from the condition: a ValueError."""
    if isinstance(cond_scale, bool) or not isinstance(cond_scale, int | float) or not cond_scale >= 1:
        raise ValueError(f"cond_scale must be a number >= 1 (1 = no guidance), got {cond_scale!r}")


def guided_forward(
    forward: Callable[..., Tensor], x: Tensor, t: Tensor, cond_scale: float = 1.0, **conditions: Tensor | None
) -> Tensor:
    """Classifier-free guidance around ``forward(x, t, cond_drop=(b,) bool, **conditions)``.

    ``cond_drop`` marks rows whose condition the model replaces by its null condition. With
    ``cond_scale == 1`` this is one plain conditioned forward; otherwise conditioned and null rows run as one
    batch of 2b and are combined as ``null + cond_scale * (cond - null)``. Every condition tensor has batch b.
    """
    check_cond_scale(cond_scale)
    batch = x.shape[0]
    for name, value in conditions.items():
        if value is not None and value.shape[0] != batch:
            raise ValueError(f"{name} has batch {value.shape[0]}, expected {batch}")
    keep = torch.zeros(batch, dtype=torch.bool, device=x.device)
    if cond_scale == 1:
        return forward(x, t, cond_drop=keep, **conditions)
    doubled = {name: None if value is None else torch.cat((value, value)) for name, value in conditions.items()}
    out = forward(torch.cat((x, x)), torch.cat((t, t)), cond_drop=torch.cat((keep, ~keep)), **doubled)
    return guide(out[:batch], out[batch:], cond_scale)
