"""Training of the demo's three models: the discrete VAE, DALLE on precomputed image codes, and a small CLIP.

One optimisation loop (:func:`_optimise`: AdamW, linear warm-up then cosine decay, gradient clipping, a
progress bar with a smoothed loss) serves all three; each ``train_*`` function only says how a batch's loss
is computed. Batches are drawn from seeded generators, so a run is reproducible for a given thread count.
The VAE's temperature is annealed exponentially towards ``vae_final_temperature``, as in DALL-E (Ramesh et
al. 2021, https://arxiv.org/abs/2102.12092); DALLE drops captions with probability ``null_cond_prob`` for
classifier-free guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from dalle_pytorch.models.clip import CLIP
from dalle_pytorch.models.dalle import DALLE
from dalle_pytorch.models.vae import DiscreteVAE

if TYPE_CHECKING:
    from dalle_pytorch.demo.config import DemoConfig

__all__ = ["encode_images", "train_clip", "train_dalle", "train_vae"]


def _warmup_cosine(steps: int, warmup_fraction: float = 0.05) -> Callable[[int], float]:
    """Learning-rate factor: linear warmup, then a cosine decay to 0 at ``steps``."""
    warmup = max(1, round(warmup_fraction * steps))
    return lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def _optimise(
    model: nn.Module,
    loss_at: Callable[[int], Tensor],
    steps: int,
    learning_rate: float,
    description: str,
    progress: bool,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
) -> float:
    """Run ``steps`` AdamW steps on ``loss_at(step)`` with warmup + cosine; returns a smoothed final loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.98), weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, _warmup_cosine(steps))
    model.train()
    smoothed = math.nan
    with tqdm(range(steps), desc=description, disable=not progress, leave=True, dynamic_ncols=True) as bar:
        for step in bar:
            loss = loss_at(step)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimiser.step()
            schedule.step()
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"{description}: the loss became {value} at step {step}")
            smoothed = value if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * value
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{smoothed:.4f}")
    model.eval()
    return smoothed


def _batches(num_samples: int, batch_size: int, seed: int) -> Callable[[], Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return lambda: torch.randint(0, num_samples, (batch_size,), generator=generator)


def train_vae(images: Tensor, config: DemoConfig, progress: bool = True) -> tuple[DiscreteVAE, float]:
    """Train a DiscreteVAE on ``images`` (n, 3, s, s) in [0, 1] (on their device), temperature annealed
    exponentially from 1 to ``config.vae_final_temperature``. Returns it in eval mode and the smoothed final loss."""
    vae = DiscreteVAE(
        image_size=config.image_size, num_layers=config.vae_num_layers, num_tokens=config.vae_num_tokens,
        codebook_dim=config.vae_codebook_dim, hidden_dim=config.vae_hidden_dim,
        kl_div_loss_weight=config.vae_kl_weight,
    ).to(images.device)  # fmt: skip
    next_batch = _batches(len(images), config.vae_batch_size, config.seed)
    steps = config.vae_steps

    def loss_at(step: int) -> Tensor:
        temperature = config.vae_final_temperature ** (step / max(1, steps - 1))
        return vae(images[next_batch().to(images.device)], return_loss=True, temp=temperature)

    final_loss = _optimise(vae, loss_at, steps, config.vae_learning_rate, "VAE", progress, max_grad_norm=None)
    return vae, final_loss


@torch.no_grad()
def encode_images(vae: DiscreteVAE, images: Tensor, batch_size: int = 256) -> Tensor:
    """Image codes (n, fmap * fmap) long, computed once so DALLE training never runs the VAE."""
    return torch.cat([vae.get_codebook_indices(chunk) for chunk in images.split(batch_size)])


def _pick_phrasings(text: Tensor, seed: int) -> Callable[[Tensor], Tensor]:
    """index (b,) -> caption ids (b, text_seq_len), one random phrasing of each sample's caption."""
    generator = torch.Generator().manual_seed(seed)
    return lambda index: text[index, torch.randint(0, text.shape[1], (len(index),), generator=generator)]


def train_dalle(
    vae: DiscreteVAE, codes: Tensor, text: Tensor, num_text_tokens: int, config: DemoConfig, progress: bool = True
) -> tuple[DALLE, float]:
    """Train DALLE on image codes (n, image_seq_len) and caption ids (n, phrasings, text_seq_len), ids below
    ``num_text_tokens``. Each step picks a random phrasing per sample and drops the caption with probability
    ``config.null_cond_prob``, for classifier-free guidance. Returns it in eval mode and the final loss."""
    dalle = DALLE(
        dim=config.dalle_dim, vae=vae, num_text_tokens=num_text_tokens, text_seq_len=text.shape[-1],
        depth=config.dalle_depth, heads=config.dalle_heads, dim_head=config.dalle_dim // config.dalle_heads,
        ff_mult=config.dalle_ff_mult,
    ).to(codes.device)  # fmt: skip
    next_batch, captions = (
        _batches(len(codes), config.dalle_batch_size, config.seed + 1),
        _pick_phrasings(text, config.seed + 2),
    )

    def loss_at(step: int) -> Tensor:
        index = next_batch()
        batch_text, batch_codes = captions(index).to(codes.device), codes[index.to(codes.device)]
        return dalle(batch_text, batch_codes, return_loss=True, null_cond_prob=config.null_cond_prob)

    steps, learning_rate = config.dalle_steps, config.dalle_learning_rate
    return dalle, _optimise(dalle, loss_at, steps, learning_rate, "DALLE", progress, weight_decay=0.01)


def train_clip(
    images: Tensor, text: Tensor, num_text_tokens: int, config: DemoConfig, progress: bool = True
) -> tuple[CLIP, float]:
    """Train a small CLIP on images (n, 3, s, s) and caption ids (n, phrasings, text_seq_len), ids below
    ``num_text_tokens``. Returns it in eval mode and the final loss."""
    clip = CLIP(
        dim_text=config.clip_dim, dim_image=config.clip_dim, dim_latent=config.clip_dim,
        num_text_tokens=num_text_tokens, text_enc_depth=1, text_seq_len=text.shape[-1], text_heads=4,
        visual_enc_depth=2, visual_heads=4, visual_image_size=config.image_size, visual_patch_size=4,
    ).to(images.device)  # fmt: skip
    next_batch, captions = (
        _batches(len(images), config.clip_batch_size, config.seed + 3),
        _pick_phrasings(text, config.seed + 4),
    )

    def loss_at(step: int) -> Tensor:
        index = next_batch()
        return clip(captions(index).to(images.device), images[index.to(images.device)], return_loss=True)

    steps, learning_rate = config.clip_steps, config.clip_learning_rate
    return clip, _optimise(clip, loss_at, steps, learning_rate, "CLIP", progress, weight_decay=0.01)
