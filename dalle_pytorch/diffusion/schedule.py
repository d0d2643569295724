"""Gaussian diffusion noise schedules and their closed forms.

The forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) and the posterior
q(x_{t-1} | x_t, x_0) of Ho et al. 2020 (https://arxiv.org/abs/2006.11239); the linear beta schedule of that
paper (scaled so any number of timesteps spans the same noise range) and the cosine schedule of Nichol &
Dhariwal 2021 (https://arxiv.org/abs/2102.09672).

Timesteps are indices 0 .. timesteps-1 (index 0 is the least noisy step). Every table is computed in float64
and stored as float32 buffers that are not saved: they are derived from (timesteps, kind).

Shape letters: b batch; ``t`` is always a LongTensor (b,) whose values broadcast over x's trailing dims.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

SCHEDULE_KINDS = ("cosine", "linear")


def cosine_betas(timesteps: int, s: float = 0.008) -> Tensor:
    """Betas (timesteps,) float64 with abar_t = f(t) / f(0), f(t) = cos((t / T + s) / (1 + s) * pi / 2)^2."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    # the paper clips betas at 0.999 to avoid a singularity at the very end of the schedule
    return betas.clamp(max=0.999)


def linear_betas(timesteps: int) -> Tensor:
    """Betas (timesteps,) float64 from 1e-4 to 0.02 at 1000 steps, scaled by 1000 / timesteps."""
    scale = 1000 / timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)


class NoiseSchedule(nn.Module):
    """The tables of one noise schedule (buffers of shape (timesteps,)) and the closed forms built on them."""

    def __init__(self, timesteps: int, kind: str = "cosine"):
        super().__init__()
        if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 1:
            raise ValueError(f"timesteps must be a positive int, got {timesteps!r}")
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"kind must be one of {SCHEDULE_KINDS}, got {kind!r}")
        if kind == "linear" and timesteps <= 20:
            # with few steps the scaled last beta reaches 1 (1000 / T * 0.02 >= 1): all signal destroyed
            raise ValueError(f"the linear schedule needs timesteps > 20, got {timesteps}; use kind='cosine'")
        self.timesteps, self.kind = timesteps, kind

        betas = cosine_betas(timesteps) if kind == "cosine" else linear_betas(timesteps)
        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat((torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]))
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        # the variance is 0 at t = 0; its log is clipped to the next value so it stays finite
        log_variance = torch.log(torch.cat((posterior_variance[1:2], posterior_variance[1:])))
        tables = dict(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1 - alphas_cumprod).sqrt(),
            sqrt_recip_alphas_cumprod=(1 / alphas_cumprod).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1 / alphas_cumprod - 1).sqrt(),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=log_variance,
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            posterior_mean_coef2=(1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
        )
        for name, table in tables.items():
            self.register_buffer(name, table.float(), persistent=False)

    def extra_repr(self) -> str:
        return f"timesteps={self.timesteps}, kind={self.kind!r}"

    def _at(self, table: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """table[t] (b,) reshaped to (b, 1, ..., 1) to broadcast against x (b, ...)."""
        if not torch.is_tensor(t) or t.dtype not in (torch.int64, torch.int32) or t.ndim != 1:
            raise TypeError(f"t must be a (batch,) integer tensor, got {getattr(t, 'dtype', type(t))}")
        if t.shape[0] != x.shape[0]:
            raise ValueError(f"t has {t.shape[0]} timesteps for a batch of {x.shape[0]}")
        values = table.to(x.device)[t.to(x.device)].to(x.dtype)
        return values.reshape(-1, *([1] * (x.ndim - 1)))

    def random_timesteps(self, batch: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """Uniform training timesteps (b,) long in [0, timesteps)."""
        g_device = generator.device if generator is not None else "cpu"
        t = torch.randint(0, self.timesteps, (batch,), generator=generator, device=g_device)
        return t.to(device if device is not None else self.betas.device)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, a draw from q(x_t | x_0)."""
        return (
            self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def predict_x0_from_noise(self, x_t: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Inverts q_sample: x0 = (x_t - sqrt(1 - abar_t) noise) / sqrt(abar_t)."""
        return (
            self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * noise
        )

    def predict_noise_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """The noise that q_sample would have used: (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
        return (self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / self._at(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0), each broadcastable to x_t."""
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        variance = self._at(self.posterior_variance, t, x_t)
        log_variance = self._at(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance
