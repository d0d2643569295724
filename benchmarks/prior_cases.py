"""Measurements of the DALL-E 2 diffusion prior: training throughput and sampling time, DDPM against DDIM.

Each function is ``(device, quick, **params) -> dict`` and runs in its own process (see ``run.py``). The
training FLOPs follow DALLE's rule (``model_flops``): ``6 * W * tokens`` for every matmul weight over the
tokens it sees, plus ``12 * inner * pairs`` per layer for causal attention; the parent turns them into MFU
against the run's matmul throughput.
"""

from __future__ import annotations

import torch

from benchmarks.cases import BUDGET_S, TRAIN_STEP, _seeded, _train_step
from benchmarks.harness import time_ddpm_vs_ddim, time_repeats
from benchmarks.model_flops import linear_weights

# the demo's CLIP latent width (64) with a text of 16 tokens
PRIOR_SIZES = {
    False: dict(dim=128, depth=4, heads=4, dim_head=32, embed_dim=64, text_len=16, batch=64),
    True: dict(dim=32, depth=1, heads=2, dim_head=16, embed_dim=16, text_len=4, batch=4),
}
SAMPLE_STEPS = {False: (1000, 50), True: (100, 5)}  # (DDPM timesteps, DDIM steps)
SAMPLE_BATCH = 2  # 8 rows with two candidates each and guidance: 1000 DDPM steps stay within minutes on a CPU
PRIOR_FORMULA = (
    "6 * b * (W_blocks * n + W_text_encodings * n_text + W_once) + 12 * b * depth * inner * n (n + 1) / 2;"
    " n = n_text + 5 tokens, W_once = the text/image/time projections and the output layer (one token each)"
)


def _prior(quick: bool, device: torch.device, timesteps: int = 1000):
    from dalle_pytorch.diffusion.prior import DiffusionPrior, DiffusionPriorNetwork

    s = PRIOR_SIZES[quick]
    net = DiffusionPriorNetwork(dim=s["dim"], depth=s["depth"], dim_head=s["dim_head"], heads=s["heads"],
                                image_embed_dim=s["embed_dim"], text_encoding_dim=s["embed_dim"])  # fmt: skip
    prior = DiffusionPrior(net, image_embed_dim=s["embed_dim"], timesteps=timesteps).to(device)
    return prior, {**s, "timesteps": timesteps, "predict": "x0"}


def _conditions(sizes: dict, batch: int, generator: torch.Generator, device: torch.device) -> dict:
    embed = lambda *shape: torch.randn(*shape, generator=generator).to(device)  # noqa: E731
    return dict(text_embed=embed(batch, sizes["embed_dim"]),
                text_encodings=embed(batch, sizes["text_len"], sizes["embed_dim"]))  # fmt: skip


def prior_train_flops(prior, batch: int, text_len: int) -> int:
    """Training FLOPs of one step, by the rule in PRIOR_FORMULA (padding-free text: every pair counted)."""
    net, config = prior.net, prior.net.config
    n = text_len + 5
    inner = config["heads"] * config["dim_head"]
    w_blocks = linear_weights(net.blocks)
    w_text = linear_weights([net.to_text_encodings])
    w_once = linear_weights([net.to_text_embed, net.to_image_embed, net.time_embed, net.to_out])
    pairs = n * (n + 1) // 2
    return 6 * batch * (w_blocks * n + w_text * text_len + w_once) + 12 * batch * config["depth"] * inner * pairs


def prior_train(device: torch.device, quick: bool) -> dict:
    """One training step (forward, backward, AdamW) of the prior on precomputed CLIP embeddings."""
    generator = _seeded()
    prior, config = _prior(quick, device)
    batch = config["batch"]
    conditions = _conditions(config, batch, generator, device)
    image_embed = torch.nn.functional.normalize(torch.randn(batch, config["embed_dim"], generator=generator), dim=-1)
    loss_fn = lambda: prior(image_embed=image_embed.to(device), **conditions)  # noqa: E731
    step, _ = _train_step(prior, loss_fn)
    stats = time_repeats(step, device=device, budget_s=BUDGET_S[quick])
    return {**stats, "config": {**config, "inputs": "precomputed CLIP embeddings", "step": TRAIN_STEP},
            "train_flops": prior_train_flops(prior, batch, config["text_len"]), "flops_formula": PRIOR_FORMULA,
            "trainable_params": sum(p.numel() for p in prior.parameters() if p.requires_grad),
            "items": batch, "item_name": "embeddings"}  # fmt: skip


def prior_sampling(device: torch.device, quick: bool) -> dict:
    """Seconds per embedding with DDPM over every timestep and with DDIM, same model and inputs."""
    timesteps, ddim_steps = SAMPLE_STEPS[quick]
    _seeded()
    prior, config = _prior(quick, device, timesteps=timesteps)
    prior.eval()
    conditions = _conditions(config, SAMPLE_BATCH, torch.Generator().manual_seed(1), device)

    def sample(steps: int | None) -> None:
        prior.sample(**conditions, num_samples_per_batch=2, cond_scale=2.0, sample_steps=steps,
                     generator=torch.Generator().manual_seed(0))  # fmt: skip

    timed = time_ddpm_vs_ddim(sample, ddim_steps, device, BUDGET_S[quick])
    return {**timed, "config": {**config, "batch": SAMPLE_BATCH, "candidates": 2, "cond_scale": 2.0, "ddim_eta": 0.0},
            "ddpm_steps": timesteps, "ddim_steps": ddim_steps,
            "ddpm_s_per_embedding": timed["median_s"] / SAMPLE_BATCH,
            "ddim_s_per_embedding": timed["ddim_s"] / SAMPLE_BATCH}  # fmt: skip


def registry(quick: bool) -> dict[str, tuple]:
    """name -> (function, params) of the prior measurements."""
    return {"prior_train": (prior_train, {}), "prior_sampling": (prior_sampling, {})}
