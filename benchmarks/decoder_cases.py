"""Measurements of the DALL-E 2 decoder: U-Net training throughput and sampling time, DDPM against DDIM.

Each function is ``(device, quick, **params) -> dict`` and runs in its own process (see ``run.py``), like
the cases in ``cases.py``. Training FLOPs are counted by ``torch.utils.flop_counter`` on one forward +
backward (convolutions and matmuls), the rule ``vae_train`` uses; the parent turns them into MFU against
the run's matmul throughput.

Sampling times the same model with 1000-step DDPM and 50-step DDIM in the same process (quick: 100 and 5),
so their ratio comes from one run on one machine state.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.cases import BUDGET_S, TRAIN_STEP, _seeded, _train_step
from benchmarks.harness import time_ddpm_vs_ddim, time_repeats

# a two-stage cascade at the demo's 32 px: a 16 px base U-Net and a 16 -> 32 px super-resolution U-Net
DECODER_SIZES = {
    False: dict(image_sizes=(16, 32), dims=(64, 32), dim_mults=(1, 2, 4), embed_dim=64),
    True: dict(image_sizes=(8, 16), dims=(16, 8), dim_mults=(1, 2), embed_dim=16),
}
DECODER_TRAIN_BATCH = {False: 8, True: 2}
SAMPLE_BATCH = 1  # time per image without batching; keeps the 1000-step run to minutes on a CPU
SAMPLE_STEPS = {False: (1000, 50), True: (100, 5)}  # (DDPM timesteps, DDIM steps)
FLOPS_RULE = "counted by torch.utils.flop_counter on one forward + backward of the U-Net's loss"


def _decoder(quick: bool, device: torch.device, timesteps: int = 1000):
    from dalle_pytorch.diffusion.decoder import Decoder
    from dalle_pytorch.diffusion.unet import Unet

    sizes = DECODER_SIZES[quick]
    unets = tuple(
        Unet(dim=dim, image_embed_dim=sizes["embed_dim"], dim_mults=sizes["dim_mults"], lowres_cond=i > 0)
        for i, dim in enumerate(sizes["dims"])
    )
    decoder = Decoder(unet=unets, image_sizes=sizes["image_sizes"], timesteps=timesteps).to(device)
    return decoder, {**sizes, "timesteps": timesteps, "attention": "lowest level and middle", "predict": "noise"}


def decoder_train(device: torch.device, quick: bool, unet_number: int) -> dict:
    """One training step (forward, backward, AdamW) of U-Net ``unet_number`` on precomputed image embeddings."""
    generator = _seeded()
    decoder, config = _decoder(quick, device)
    batch, size = DECODER_TRAIN_BATCH[quick], config["image_sizes"][unet_number - 1]
    images = torch.rand(batch, 3, size, size, generator=generator).to(device)
    embed = torch.randn(batch, config["embed_dim"], generator=generator).to(device)
    unet = decoder.unets[unet_number - 1]
    loss_fn = lambda: decoder(images, unet_number=unet_number, image_embed=embed)  # noqa: E731
    step, _ = _train_step(unet, loss_fn)
    with FlopCounterMode(display=False) as counter:
        loss_fn().backward()
    unet.zero_grad(set_to_none=True)
    stats = time_repeats(step, device=device, budget_s=BUDGET_S[quick])
    return {**stats, "config": {**config, "unet_number": unet_number, "image_size": size, "batch": batch,
                                "inputs": "precomputed image embeddings", "step": TRAIN_STEP},
            "train_flops": counter.get_total_flops(), "flops_formula": FLOPS_RULE,
            "trainable_params": sum(p.numel() for p in unet.parameters()),
            "items": batch, "item_name": "images"}  # fmt: skip


def decoder_sampling(device: torch.device, quick: bool) -> dict:
    """Seconds per image of the base U-Net with DDPM over every timestep and with DDIM, same model and inputs."""
    timesteps, ddim_steps = SAMPLE_STEPS[quick]
    _seeded()
    decoder, config = _decoder(quick, device, timesteps=timesteps)
    decoder.eval()
    embed = torch.randn(SAMPLE_BATCH, config["embed_dim"], generator=torch.Generator().manual_seed(1)).to(device)

    def sample(steps: int | None) -> None:
        decoder.sample(embed, sample_steps=steps, generator=torch.Generator().manual_seed(0), stop_at_unet_number=1)

    timed = time_ddpm_vs_ddim(sample, ddim_steps, device, BUDGET_S[quick])
    return {**timed, "config": {**config, "batch": SAMPLE_BATCH, "unet": 1, "cond_scale": 1.0, "ddim_eta": 0.0},
            "ddpm_steps": timesteps, "ddim_steps": ddim_steps,
            "ddpm_s_per_image": timed["median_s"] / SAMPLE_BATCH,
            "ddim_s_per_image": timed["ddim_s"] / SAMPLE_BATCH}  # fmt: skip


def registry(quick: bool) -> dict[str, tuple]:
    """name -> (function, params) of the decoder measurements."""
    cases: dict[str, tuple] = {}
    for unet_number in (1, 2):
        cases[f"decoder_train_unet{unet_number}"] = (decoder_train, {"unet_number": unet_number})
    cases["decoder_sampling"] = (decoder_sampling, {})
    return cases
