"""Training of the demo's three models: the discrete VAE, DALLE on precomputed image codes, and a small CLIP.

All three train through the library's :class:`~dalle_pytorch.training.trainer.Trainer` (the loop of the
command-line tools) with its warm-up + cosine learning-rate schedule; each ``train_*`` function only says
what a sample is and how a batch's loss is computed. The data order, and every random choice a step makes,
come from the seeds, so a run is reproducible for a given thread count. The VAE's temperature is annealed
exponentially towards ``vae_final_temperature``, as in DALL-E (Ramesh et al. 2021,
https://arxiv.org/abs/2102.12092); DALLE drops captions with probability ``null_cond_prob`` for
classifier-free guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from dalle_pytorch.models.clip import CLIP
from dalle_pytorch.models.dalle import DALLE
from dalle_pytorch.models.vae import DiscreteVAE
from dalle_pytorch.training.data_order import IndexedBatches
from dalle_pytorch.training.distributed import DistributedContext
from dalle_pytorch.training.run_logging import METRICS_NAME
from dalle_pytorch.training.trainer import Trainer, TrainingSettings

if TYPE_CHECKING:
    from dalle_pytorch.demo.config import DemoConfig

__all__ = ["encode_images", "fit_model", "train_clip", "train_dalle", "train_vae"]

WARMUP_FRACTION = 0.05
ADAM_BETAS = (0.9, 0.98)


class _RandomPhrasing(Dataset):
    """Sample i: (one phrasing of its caption (text_seq_len,), its i-th tensor of ``others``...). The phrasing
    is drawn from torch's RNG, which the data order seeds per sample."""

    def __init__(self, text: Tensor, *others: Tensor):
        self.text, self.others = text, others

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        phrasing = int(torch.randint(0, self.text.shape[1], ()))
        return (self.text[index, phrasing], *(other[index] for other in self.others))


def fit_model(
    model: nn.Module,
    dataset: Dataset,
    loss_fn: Callable[[nn.Module, Any, int], Tensor],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    label: str,
    progress: bool,
    log_dir: str | Path | None,
    weight_decay: float = 0.0,
    clip_grad_norm: float | None = 1.0,
    precision: str = "fp32",
) -> float:
    """``steps`` Trainer steps of AdamW with warm-up + cosine decay over ``dataset`` (reshuffled every epoch)
    in ``precision`` (the Trainer's: fp32, or bf16 / fp16 autocast); the model ends in eval mode. Returns the
    loss smoothed over the last steps. The Trainer's metrics go to ``log_dir`` (discarded when None); no
    checkpoints are written."""
    device = next(model.parameters()).device
    with contextlib.ExitStack() as stack:
        if log_dir is None:
            log_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="dalle-demo-"))
        (Path(log_dir) / METRICS_NAME).unlink(missing_ok=True)  # a new run, not a continuation
        ctx = DistributedContext(device=device)
        data = IndexedBatches(dataset, batch_size=batch_size, seed=seed, ctx=ctx)
        settings = TrainingSettings(
            output_dir=log_dir, batch_size=batch_size, max_steps=steps,
            epochs=math.ceil(steps / data.batches_per_epoch), learning_rate=learning_rate,
            weight_decay=weight_decay, adam_betas=ADAM_BETAS, clip_grad_norm=clip_grad_norm, lr_schedule="cosine",
            warmup_steps=max(1, round(WARMUP_FRACTION * steps)), seed=seed, progress=progress,
            save_checkpoints=False, sample_every_n_steps=steps, precision=precision,
        )  # fmt: skip
        result = Trainer(model, data, loss_fn, settings, ctx, description=label).fit()
    model.eval()
    smoothed = math.nan
    for record in result.history:
        if math.isfinite(record["loss"]):
            smoothed = record["loss"] if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * record["loss"]
    return smoothed


def train_vae(
    images: Tensor, config: DemoConfig, progress: bool = True, log_dir: str | Path | None = None
) -> tuple[DiscreteVAE, float]:
    """Train a DiscreteVAE on ``images`` (n, 3, s, s) in [0, 1] (on their device), temperature annealed
    exponentially from 1 to ``config.vae_final_temperature``. Returns it in eval mode and the smoothed final
    loss; the training metrics go to ``log_dir/metrics.jsonl`` when given."""
    vae = DiscreteVAE(
        image_size=config.image_size, num_layers=config.vae_num_layers, num_tokens=config.vae_num_tokens,
        codebook_dim=config.vae_codebook_dim, hidden_dim=config.vae_hidden_dim,
        kl_div_loss_weight=config.vae_kl_weight,
    ).to(images.device)  # fmt: skip
    steps = config.vae_steps

    def loss_fn(model: nn.Module, batch: list[Tensor], step: int) -> Tensor:
        temperature = config.vae_final_temperature ** (step / max(1, steps - 1))
        return model(batch[0], return_loss=True, temp=temperature)

    final_loss = fit_model(
        vae, TensorDataset(images.cpu()), loss_fn, steps=steps, batch_size=config.vae_batch_size,
        learning_rate=config.vae_learning_rate, seed=config.seed, label="VAE", progress=progress, log_dir=log_dir,
        clip_grad_norm=None, precision=config.precision,
    )  # fmt: skip
    return vae, final_loss


@torch.no_grad()
def encode_images(vae: DiscreteVAE, images: Tensor, batch_size: int = 256) -> Tensor:
    """Image codes (n, fmap * fmap) long, computed once so DALLE training never runs the VAE."""
    return torch.cat([vae.get_codebook_indices(chunk) for chunk in images.split(batch_size)])


def train_dalle(
    vae: DiscreteVAE,
    codes: Tensor,
    text: Tensor,
    num_text_tokens: int,
    config: DemoConfig,
    progress: bool = True,
    log_dir: str | Path | None = None,
) -> tuple[DALLE, float]:
    """Train DALLE on image codes (n, image_seq_len) and caption ids (n, phrasings, text_seq_len), ids below
    ``num_text_tokens``. Each sample is read with a random phrasing of its caption, which is dropped with
    probability ``config.null_cond_prob`` for classifier-free guidance. Returns it in eval mode and the final
    loss."""
    dalle = DALLE(
        dim=config.dalle_dim, vae=vae, num_text_tokens=num_text_tokens, text_seq_len=text.shape[-1],
        depth=config.dalle_depth, heads=config.dalle_heads, dim_head=config.dalle_dim // config.dalle_heads,
        ff_mult=config.dalle_ff_mult,
    ).to(codes.device)  # fmt: skip

    def loss_fn(model: nn.Module, batch: list[Tensor], step: int) -> Tensor:
        batch_text, batch_codes = batch
        return model(batch_text, batch_codes, return_loss=True, null_cond_prob=config.null_cond_prob)

    final_loss = fit_model(
        dalle, _RandomPhrasing(text.cpu(), codes.cpu()), loss_fn, steps=config.dalle_steps,
        batch_size=config.dalle_batch_size, learning_rate=config.dalle_learning_rate, seed=config.seed + 1,
        label="DALLE", progress=progress, log_dir=log_dir, weight_decay=0.01, precision=config.precision,
    )  # fmt: skip
    return dalle, final_loss


def train_clip(
    images: Tensor,
    text: Tensor,
    num_text_tokens: int,
    config: DemoConfig,
    progress: bool = True,
    log_dir: str | Path | None = None,
) -> tuple[CLIP, float]:
    """Train a small CLIP on images (n, 3, s, s) and caption ids (n, phrasings, text_seq_len), ids below
    ``num_text_tokens``. Returns it in eval mode and the final loss."""
    clip = CLIP(
        dim_text=config.clip_dim, dim_image=config.clip_dim, dim_latent=config.clip_dim,
        num_text_tokens=num_text_tokens, text_enc_depth=1, text_seq_len=text.shape[-1], text_heads=4,
        visual_enc_depth=2, visual_heads=4, visual_image_size=config.image_size, visual_patch_size=4,
    ).to(images.device)  # fmt: skip

    def loss_fn(model: nn.Module, batch: list[Tensor], step: int) -> Tensor:
        batch_text, batch_images = batch
        return model(batch_text, batch_images, return_loss=True)

    final_loss = fit_model(
        clip, _RandomPhrasing(text.cpu(), images.cpu()), loss_fn, steps=config.clip_steps,
        batch_size=config.clip_batch_size, learning_rate=config.clip_learning_rate, seed=config.seed + 3,
        label="CLIP", progress=progress, log_dir=log_dir, weight_decay=0.01, precision=config.precision,
    )  # fmt: skip
    return clip, final_loss
