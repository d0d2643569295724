"""Noise schedules and samplers against float64 formulas written out here, and the sampler equivalences."""

import math

import pytest
import torch

from dalle_pytorch.diffusion.samplers import (
    ddim_step,
    ddim_timesteps,
    ddpm_step,
    guided_forward,
    randn,
    sample_loop,
)
from dalle_pytorch.diffusion.schedule import NoiseSchedule

F64 = torch.float64


def reference_alphas_cumprod(timesteps, kind):
    """abar_t for t = 0 .. T-1 in float64, straight from the papers."""
    T = timesteps
    if kind == "cosine":
        f = [math.cos(((t / T) + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
        betas = [min(1 - f[t + 1] / f[t], 0.999) for t in range(T)]
    else:
        lo, hi = 1000 / T * 1e-4, 1000 / T * 0.02
        betas = [lo + (hi - lo) * t / (T - 1) for t in range(T)]
    abar, out = 1.0, []
    for beta in betas:
        abar *= 1 - beta
        out.append(abar)
    return torch.tensor(betas, dtype=F64), torch.tensor(out, dtype=F64)


def _inputs(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 3, 5, generator=g)
    noise = torch.randn(batch, 3, 5, generator=g)
    return x0, noise


@pytest.mark.parametrize("kind,timesteps", [("cosine", 50), ("linear", 50), ("cosine", 1000), ("linear", 1000)])
def test_tables_match_the_papers(kind, timesteps):
    schedule = NoiseSchedule(timesteps, kind)
    betas, abar = reference_alphas_cumprod(timesteps, kind)
    torch.testing.assert_close(schedule.betas, betas.float())
    torch.testing.assert_close(schedule.alphas_cumprod, abar.float())
    assert schedule.betas.dtype == torch.float32
    assert (schedule.alphas_cumprod[1:] < schedule.alphas_cumprod[:-1]).all()  # noise only grows
    assert schedule.state_dict() == {}  # derived tables are not saved


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_q_sample_is_the_closed_form(kind):
    schedule = NoiseSchedule(40, kind)
    _, abar = reference_alphas_cumprod(40, kind)
    x0, noise = _inputs()
    t = torch.tensor([0, 7, 21, 39])
    expected = abar[t].sqrt()[:, None, None] * x0.double() + (1 - abar[t]).sqrt()[:, None, None] * noise.double()
    torch.testing.assert_close(schedule.q_sample(x0, t, noise), expected.float())


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_posterior_is_the_gaussian_product(kind):
    """q(x_{t-1} | x_t, x_0) from Bayes' rule: N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) times
    N(x_t; sqrt(alpha_t) x_{t-1}, beta_t), combined by adding precisions."""
    schedule = NoiseSchedule(40, kind)
    betas, abar = reference_alphas_cumprod(40, kind)
    x0, x_t = _inputs()
    t = torch.tensor([1, 5, 20, 39])
    abar_prev, alpha, beta = abar[t - 1], 1 - betas[t], betas[t]
    precision = 1 / (1 - abar_prev) + alpha / beta
    variance = 1 / precision
    mean = variance[:, None, None] * (
        abar_prev.sqrt()[:, None, None] * x0.double() / (1 - abar_prev)[:, None, None]
        + alpha.sqrt()[:, None, None] * x_t.double() / beta[:, None, None]
    )
    got_mean, got_var, got_log_var = schedule.q_posterior(x0, x_t, t)
    torch.testing.assert_close(got_mean, mean.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_var.flatten(), variance.float(), atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(got_log_var.flatten(), variance.log().float(), atol=1e-5, rtol=1e-4)

    # at t = 0 the previous step is x0 itself: mean x0, variance 0 (its log clipped to the t = 1 value)
    zero = torch.zeros(4, dtype=torch.long)
    mean0, var0, log_var0 = schedule.q_posterior(x0, x_t, zero)
    torch.testing.assert_close(mean0, x0)
    assert (var0 == 0).all() and torch.isfinite(log_var0).all()


def test_x0_and_noise_round_trip():
    schedule = NoiseSchedule(100)
    x0, noise = _inputs()
    for t, atol in ((torch.tensor([0, 3, 50, 90]), 2e-4), (torch.tensor([10, 60, 95, 99]), 2e-3)):
        x_t = schedule.q_sample(x0, t, noise)
        # recovering x0 divides by sqrt(abar_t), tiny at the last steps: float32 rounding grows there
        torch.testing.assert_close(schedule.predict_x0_from_noise(x_t, t, noise), x0, atol=atol, rtol=1e-4)
        torch.testing.assert_close(schedule.predict_noise_from_x0(x_t, t, x0), noise, atol=2e-4, rtol=1e-4)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="kind"):
        NoiseSchedule(10, "quadratic")
    with pytest.raises(ValueError, match="timesteps"):
        NoiseSchedule(0)
    with pytest.raises(ValueError, match="timesteps > 20"):
        NoiseSchedule(10, "linear")
    x0, noise = _inputs()
    with pytest.raises(ValueError, match="batch"):
        NoiseSchedule(10).q_sample(x0, torch.tensor([1, 2]), noise)
    with pytest.raises(TypeError, match="integer"):
        NoiseSchedule(10).q_sample(x0, torch.ones(4), noise)


# ------------------------------------------------------------------------------------------------ samplers


def test_ddim_timesteps():
    assert ddim_timesteps(10, 10) == list(range(9, -1, -1))
    steps = ddim_timesteps(1000, 50)
    assert len(steps) == len(set(steps)) == 50 and steps[0] == 999 and steps[-1] == 0
    assert all(a > b for a, b in zip(steps, steps[1:]))
    assert ddim_timesteps(7, 1) == [6]
    with pytest.raises(ValueError, match="sample_steps"):
        ddim_timesteps(10, 11)


def test_ddpm_step_at_zero_adds_no_noise():
    schedule = NoiseSchedule(30)
    x0, x_t = _inputs()
    out = ddpm_step(schedule, x_t, 0, x0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x0)
    clipped = ddpm_step(schedule, x_t, 0, x0, clip_x0=(-0.5, 0.5))
    torch.testing.assert_close(clipped, x0.clamp(-0.5, 0.5))


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_ddim_eta_one_over_every_step_is_the_ddpm_step(kind):
    """With t_prev = t - 1, sigma^2 (eta = 1) is the DDPM posterior variance and the DDIM mean is the posterior
    mean, so with the same noise the two steps agree exactly."""
    schedule = NoiseSchedule(60, kind)
    x0, x_t = _inputs()
    for t in (59, 30, 1, 0):
        ddim = ddim_step(schedule, x_t, t, t - 1, x0, eta=1.0, generator=torch.Generator().manual_seed(t))
        ddpm = ddpm_step(schedule, x_t, t, x0, generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(ddim, ddpm, atol=1e-5, rtol=1e-5)


def test_ddim_eta_zero_is_the_float64_formula_and_deterministic():
    schedule = NoiseSchedule(60)
    _, abar = reference_alphas_cumprod(60, "cosine")
    x0, x_t = _inputs()
    t, t_prev = 40, 25
    eps = (x_t.double() - abar[t].sqrt() * x0.double()) / (1 - abar[t]).sqrt()
    expected = abar[t_prev].sqrt() * x0.double() + (1 - abar[t_prev]).sqrt() * eps
    first = ddim_step(schedule, x_t, t, t_prev, x0, generator=torch.Generator().manual_seed(1))
    second = ddim_step(schedule, x_t, t, t_prev, x0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(first, expected.float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(first, second)
    torch.testing.assert_close(ddim_step(schedule, x_t, 5, -1, x0), x0)  # the last step lands on x0


@pytest.mark.parametrize("sample_steps", [60, 13, 1])
def test_ddim_eta_zero_follows_the_forward_trajectory(sample_steps):
    """A model that always predicts the true x0 keeps eps fixed: every DDIM (eta=0) iterate is q_sample(x0, s, eps)."""
    schedule = NoiseSchedule(60)
    x0, eps = _inputs()
    visited = []

    def record(x, t_prev):
        visited.append((t_prev, x))
        return x

    start = schedule.q_sample(x0, torch.full((4,), 59), eps)
    out = sample_loop(lambda x, t: x0, x0.shape, schedule, sample_steps=sample_steps, x_start=start, on_step=record)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)
    assert len(visited) == sample_steps
    for t_prev, x in visited[:-1]:
        torch.testing.assert_close(x, schedule.q_sample(x0, torch.full((4,), t_prev), eps), atol=1e-4, rtol=1e-4)


def _row_model(x, t):
    """A model whose output row depends only on its input row."""
    return torch.tanh(x * 0.7 + t[:, None, None].float() / 50)


@pytest.mark.parametrize("sample_steps,eta", [(None, 0.0), (7, 0.5)])
def test_batch_equals_rows_one_by_one_with_per_sample_generators(sample_steps, eta):
    schedule = NoiseSchedule(25)
    seeds = [3, 4, 5]

    def run(rows):
        generators = [torch.Generator().manual_seed(seeds[i]) for i in rows]
        return sample_loop(
            _row_model, (len(rows), 2, 3), schedule, sample_steps=sample_steps, eta=eta, generator=generators
        )

    batched = run([0, 1, 2])
    for i in range(3):
        torch.testing.assert_close(run([i])[0], batched[i], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(batched[0], batched[1])
    with pytest.raises(ValueError, match="generator list"):
        sample_loop(_row_model, (2, 2, 3), schedule, generator=[torch.Generator()])


def test_same_generator_same_samples():
    schedule = NoiseSchedule(25)
    a = sample_loop(_row_model, (2, 2, 3), schedule, generator=torch.Generator().manual_seed(0))
    b = sample_loop(_row_model, (2, 2, 3), schedule, generator=torch.Generator().manual_seed(0))
    c = sample_loop(_row_model, (2, 2, 3), schedule, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_randn_rows_come_from_their_own_generator():
    rows = randn((2, 3), [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    torch.testing.assert_close(rows[1], torch.randn(3, generator=torch.Generator().manual_seed(2)))


class _Conditioned(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(4, 4)
        self.null = torch.nn.Parameter(torch.randn(4))
        self.calls = []

    def forward(self, x, t, cond_drop, cond, extra=None):
        self.calls.append(x.shape[0])
        cond = torch.where(cond_drop[:, None], self.null.expand_as(cond), cond)
        return torch.tanh(self.proj(x + cond) + t[:, None].float())


def test_guidance_batched_equals_two_forwards():
    model = _Conditioned()
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    t = torch.tensor([1, 2, 3])
    guided = guided_forward(model, x, t, 3.0, cond=cond, extra=None)
    assert model.calls == [6]  # one batched forward of conditioned and null rows
    with_cond = model(x, t, torch.zeros(3, dtype=torch.bool), cond)
    without = model(x, t, torch.ones(3, dtype=torch.bool), cond)
    torch.testing.assert_close(guided, without + 3.0 * (with_cond - without))


def test_guidance_scale_one_is_no_guidance_and_below_one_is_refused():
    model = _Conditioned()
    x, cond, t = torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0, 1])
    plain = model(x, t, torch.zeros(2, dtype=torch.bool), cond)
    model.calls.clear()
    assert torch.equal(guided_forward(model, x, t, 1.0, cond=cond), plain)
    assert model.calls == [2]
    for bad in (0.5, 0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="cond_scale"):
            guided_forward(model, x, t, bad, cond=cond)
    with pytest.raises(ValueError, match="cond has batch"):
        guided_forward(model, x, t, 2.0, cond=cond[:1])
