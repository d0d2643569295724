"""The demo's DALL-E 2 side: a diffusion prior and a latent decoder on the demo's CLIP, and what they draw.

unCLIP (Ramesh et al. 2022, https://arxiv.org/abs/2204.06125) in its smallest form, on the shapes dataset:

    CLIP (trained by the demo) -> CLIP embeddings of every training image and every phrasing (computed once)
    -> DiffusionPrior: text embedding -> image embedding;  Decoder (one U-Net): image embedding and the
       caption's text encodings (as in unCLIP and GLIDE; ``dalle2_decoder_reads_text``) -> 32x32 image
    -> generate for every colour x shape prompt, image variations, inpainting

The decoder's U-Net diffuses in the latent grid of the demo's DiscreteVAE (latent diffusion, Rombach et al.
2021, https://arxiv.org/abs/2112.10752): 8x8 cells of codebook vectors instead of 32x32x3 pixels, so a
training step costs about a quarter of a pixel U-Net's and four times as many fit the budget
(``dalle2_latent_decoder=False``: the pixel decoder). Both diffusion models train through the library's
Trainer (``dalle_pytorch.demo.training``), on embeddings computed once, so CLIP never runs during their
training. Sampling uses DDIM (Song et al. 2020, https://arxiv.org/abs/2010.02502) with classifier-free
guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from dalle_pytorch.data.shapes import ShapePrompt
from dalle_pytorch.demo.judge import ShapeClassifier, judge_samples
from dalle_pytorch.demo.report import Stopwatch, grid_prompt_indices
from dalle_pytorch.demo.training import fit_model
from dalle_pytorch.diffusion.dalle2 import DALLE2
from dalle_pytorch.diffusion.decoder import Decoder
from dalle_pytorch.diffusion.prior import DiffusionPrior, DiffusionPriorNetwork
from dalle_pytorch.diffusion.unet import Unet
from dalle_pytorch.models.clip import CLIP
from dalle_pytorch.models.vae import DiscreteVAE

if TYPE_CHECKING:
    from dalle_pytorch.demo.config import DemoConfig

__all__ = [
    "ClipEmbeddings",
    "build_dalle2",
    "centre_mask",
    "dalle2_grid_rows",
    "embed_training_set",
    "generate_dalle2",
    "run_dalle2",
    "train_dalle2",
    "variations_and_inpainting",
]


@dataclass
class ClipEmbeddings:
    """CLIP's view of a training set: per sample and phrasing the text embedding (n, p, d), encodings
    (n, p, l, e) and mask (n, p, l); per sample the image embedding (n, d). Embeddings are unit norm."""

    text_embed: Tensor
    text_encodings: Tensor
    text_mask: Tensor
    image_embed: Tensor


@torch.no_grad()
def embed_training_set(clip: CLIP, images: Tensor, text: Tensor, batch_size: int = 256) -> ClipEmbeddings:
    """Embed images (n, 3, s, s) in [0, 1] and caption ids (n, p, l) with ``clip`` on its device; results on CPU."""
    device = next(clip.parameters()).device
    p = text.shape[1]
    flat = rearrange(text, "n p l -> (n p) l")
    parts = [clip.embed_text(chunk.to(device), return_encodings=True) for chunk in flat.split(batch_size)]
    text_embed, encodings, mask = (torch.cat([part[i] for part in parts]).cpu() for i in range(3))
    image_embed = torch.cat([clip.embed_image(chunk.to(device)) for chunk in images.split(batch_size)]).cpu()
    return ClipEmbeddings(
        rearrange(text_embed, "(n p) d -> n p d", p=p), rearrange(encodings, "(n p) l e -> n p l e", p=p),
        rearrange(mask, "(n p) l -> n p l", p=p), image_embed,
    )  # fmt: skip


class _PriorSamples(Dataset):
    """Sample i: (text embedding, encodings, mask) of one random phrasing of its caption, and its image embedding."""

    def __init__(self, embeds: ClipEmbeddings):
        self.embeds = embeds

    def __len__(self) -> int:
        return len(self.embeds.image_embed)

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        e = self.embeds
        phrasing = int(torch.randint(0, e.text_embed.shape[1], ()))  # drawn from the RNG the data order seeds
        return e.text_embed[index, phrasing], e.text_encodings[index, phrasing], e.text_mask[index, phrasing], (
            e.image_embed[index]
        )


class _DecoderSamples(Dataset):
    """Sample i: its image (3, s, s), the image's CLIP embedding (d,), and the text encodings (l, e) and mask
    (l,) of one random phrasing of its caption."""

    def __init__(self, images: Tensor, embeds: ClipEmbeddings):
        self.images, self.embeds = images, embeds

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        e = self.embeds
        phrasing = int(torch.randint(0, e.text_encodings.shape[1], ()))  # drawn from the RNG the data order seeds
        return self.images[index], e.image_embed[index], e.text_encodings[index, phrasing], e.text_mask[index, phrasing]


def build_dalle2(clip: CLIP, config: DemoConfig, vae: DiscreteVAE | None = None) -> tuple[DiffusionPrior, Decoder]:
    """A prior reading ``clip`` (frozen) and a one-U-Net decoder at ``config.image_size``, on CLIP's device: in
    ``vae``'s latent grid with ``config.dalle2_latent_decoder`` (``vae`` then required), else in pixels."""
    if config.dalle2_latent_decoder and vae is None:
        raise ValueError("dalle2_latent_decoder=True needs the DiscreteVAE whose latents the decoder diffuses in")
    if not config.dalle2_latent_decoder:
        vae = None
    clip_dim, text_dim = clip.to_text_latent.out_features, clip.to_text_latent.in_features
    net = DiffusionPriorNetwork(
        dim=config.dalle2_prior_dim, depth=config.dalle2_prior_depth, heads=4,
        dim_head=config.dalle2_prior_dim // 4, image_embed_dim=clip_dim, text_encoding_dim=text_dim,
    )  # fmt: skip
    prior = DiffusionPrior(
        net=net, clip=clip, timesteps=config.dalle2_timesteps, sample_timesteps=config.dalle2_sample_steps,
        cond_drop_prob=0.2,
    )  # fmt: skip
    unet = Unet(
        dim=config.dalle2_unet_dim, image_embed_dim=clip_dim,
        channels=3 if vae is None else vae.codebook.embedding_dim, dim_mults=config.dalle2_unet_mults,
        predict_x0=config.dalle2_predict_x0, cond_on_text_encodings=config.dalle2_decoder_reads_text,
        text_embed_dim=text_dim,
    )  # fmt: skip
    decoder = Decoder(
        unet=unet, vae=vae, image_sizes=(config.image_size,), timesteps=config.dalle2_timesteps,
        sample_timesteps=config.dalle2_sample_steps, image_cond_drop_prob=0.1,
        text_cond_drop_prob=config.dalle2_decoder_text_drop_prob,
    )  # fmt: skip
    return prior.to(next(clip.parameters()).device), decoder.to(next(clip.parameters()).device)


def train_dalle2(
    clip: CLIP,
    images: Tensor,
    embeds: ClipEmbeddings,
    config: DemoConfig,
    progress: bool = True,
    log_dir: str | Path | None = None,
    stopwatch: Stopwatch | None = None,
    vae: DiscreteVAE | None = None,
) -> tuple[DALLE2, dict[str, float]]:
    """Train the prior on ``embeds`` and the decoder on images (n, 3, s, s) in [0, 1] with their image embeddings.

    Returns a DALLE2 (prior with ``clip``; the decoder shares it) in eval mode and the final losses
    ``{"prior": ..., "decoder": ...}``. ``stopwatch``: a ``Stopwatch`` timing the stages "prior" and "decoder".
    ``vae``: the trained DiscreteVAE, needed with ``config.dalle2_latent_decoder`` (the decoder diffuses in its
    latent grid; it stays frozen).
    """
    prior, decoder = build_dalle2(clip, config, vae)
    log_dir = Path(log_dir) if log_dir is not None else None
    timer = stopwatch if stopwatch is not None else (lambda name: contextlib.nullcontext())

    def prior_loss(model: nn.Module, batch: list[Tensor], step: int) -> Tensor:
        text_embed, encodings, mask, image_embed = (item.to(model.device) for item in batch)
        return model(text_embed=text_embed, text_encodings=encodings, text_mask=mask, image_embed=image_embed)

    def decoder_loss(model: nn.Module, batch: list[Tensor], step: int) -> Tensor:
        batch_images, image_embed, encodings, mask = (item.to(images.device) for item in batch)
        return model(batch_images, image_embed=image_embed, text_encodings=encodings, text_mask=mask)

    losses = {}
    with timer("prior"):
        losses["prior"] = fit_model(
            prior, _PriorSamples(embeds), prior_loss, steps=config.dalle2_prior_steps,
            batch_size=config.dalle2_batch_size, learning_rate=config.dalle2_prior_learning_rate,
            seed=config.seed + 5, label="prior", progress=progress,
            log_dir=None if log_dir is None else log_dir / "prior", precision=config.precision,
        )  # fmt: skip
    with timer("decoder"):
        losses["decoder"] = fit_model(
            decoder, _DecoderSamples(images.cpu(), embeds), decoder_loss,
            steps=config.dalle2_decoder_steps, batch_size=config.dalle2_decoder_batch_size,
            learning_rate=config.dalle2_decoder_learning_rate, seed=config.seed + 6, label="decoder",
            progress=progress, log_dir=None if log_dir is None else log_dir / "decoder", precision=config.precision,
        )  # fmt: skip
    dalle2 = DALLE2(prior=prior, decoder=decoder).eval()
    return dalle2, losses


def _generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 1_000_000 + i) for i in indices]


@torch.no_grad()
def generate_dalle2(
    dalle2: DALLE2,
    text: Tensor,
    config: DemoConfig,
    samples_per_text: int,
    batch_size: int = 64,
    progress: bool = True,
) -> Tensor:
    """``samples_per_text`` images per caption ids (p, l): (p, samples, 3, s, s) in [0, 1]. Sample j of
    caption i draws from its own generator, so results do not depend on ``batch_size``."""
    rows = text.repeat_interleave(samples_per_text, dim=0)  # (p * k, l)
    images = []
    chunks = range(0, len(rows), batch_size)
    for start in tqdm(chunks, desc="generating (DALLE2)", disable=not progress, dynamic_ncols=True):
        indices = range(start, min(start + batch_size, len(rows)))
        images.append(
            dalle2(
                rows[start : start + batch_size], cond_scale=config.dalle2_cond_scale,
                prior_cond_scale=config.dalle2_prior_cond_scale, num_samples_per_batch=2,
                generator=_generators(config.seed, indices),
            ).clamp(0.0, 1.0).cpu()
        )  # fmt: skip
    return rearrange(torch.cat(images), "(p k) c h w -> p k c h w", k=samples_per_text)


def centre_mask(image_size: int) -> Tensor:
    """(s, s) bool, True where the pixel is known: everything but the central half of the image."""
    mask = torch.ones(image_size, image_size, dtype=torch.bool)
    quarter = image_size // 4
    mask[quarter : image_size - quarter, quarter : image_size - quarter] = False
    return mask


@torch.no_grad()
def variations_and_inpainting(
    dalle2: DALLE2, real: Tensor, text: Tensor, config: DemoConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """Variations of real images (k, 3, s, s) (one each, from their CLIP image embeddings), and inpainting: the
    centre of ``real[0]`` masked and redrawn for each caption of ``text`` (m, l).
    Returns (variations (k, 3, s, s), masked original (3, s, s), inpainted (m, 3, s, s)), all in [0, 1]."""
    device, decoder = dalle2.device, dalle2.decoder
    k, m = len(real), len(text)
    variations = decoder.variations(  # no caption: a decoder that reads text gets its null text condition
        real.to(device), cond_scale=config.dalle2_cond_scale, generator=_generators(config.seed + 7, range(k))
    ).clamp(0, 1).cpu()  # fmt: skip
    image_embed = dalle2.prior.sample(
        text.to(device), cond_scale=config.dalle2_prior_cond_scale, generator=_generators(config.seed + 8, range(m))
    )  # fmt: skip
    mask = centre_mask(real.shape[-1])
    inpainted = decoder.sample(
        image_embed, text=text.to(device), cond_scale=config.dalle2_cond_scale,
        inpaint_image=real[:1].expand(m, -1, -1, -1).to(device), inpaint_mask=mask.expand(m, -1, -1).to(device),
        generator=_generators(config.seed + 9, range(m)),
    ).clamp(0, 1).cpu()  # fmt: skip
    return variations, real[0] * mask, inpainted


def dalle2_grid_rows(
    prompts: Sequence[ShapePrompt],
    samples: Tensor,
    fidelity: dict,
    shown: Sequence[int],
    real: Tensor,
    variations: Tensor,
    masked: Tensor,
    inpainted: Tensor,
    inpaint_captions: Sequence[str],
    per_row: int = 8,
) -> list[tuple[str, Tensor | None]]:
    """Grid rows (for ``make_grid``): DALLE2 samples of the prompts at ``shown``, real images and their
    variations, and the inpainting example (the masked original, then one result per caption)."""
    seen, heldout = fidelity["seen"]["both_match"], fidelity["heldout"]["both_match"]
    rows: list[tuple[str, Tensor | None]] = [
        (f"DALLE2 samples; colour and shape right: {seen:.0%} seen pairs, {heldout:.0%} held out", None)
    ]
    for index in shown:
        label = prompts[index].caption + ("  (held out)" if prompts[index].heldout else "")
        rows.append((label, samples[index, :per_row]))
    rows += [("DALLE2: variations (decoder on the CLIP embedding of a real image)", None)]
    rows += [("real image", real[:per_row]), ("its variation", variations[:per_row])]
    rows += [(f"DALLE2: inpainting the centre; masked original, then: {', '.join(inpaint_captions)}", None)]
    rows += [("inpainted", torch.cat([masked[None], inpainted])[:per_row])]
    return rows


def run_dalle2(
    clip: CLIP,
    images: Tensor,
    text: Tensor,
    prompt_ids: Tensor,
    prompts: Sequence[ShapePrompt],
    classifier: ShapeClassifier,
    config: DemoConfig,
    stopwatch: Stopwatch,
    progress: bool = True,
    log_dir: str | Path | None = None,
    vae: DiscreteVAE | None = None,
) -> tuple[DALLE2, dict, dict[str, float], list[tuple[str, Tensor | None]]]:
    """The demo's DALLE2 part: embed the training set (images (n, 3, s, s), caption ids (n, p, l)) with the
    trained ``clip``, train the prior and the decoder, generate ``config.samples_per_prompt`` images for each
    prompt (ids (len(prompts), l)), judge them, and draw variations and an inpainting example. ``vae``: the
    DiscreteVAE a latent decoder (``config.dalle2_latent_decoder``) diffuses in.

    Stages timed: "dalle2_embed", "prior", "decoder", "dalle2_generation", "dalle2_extras".
    Returns the DALLE2, the judge's verdict, the final losses and the grid rows."""
    with stopwatch("dalle2_embed"):
        embeds = embed_training_set(clip, images, text)
    dalle2, losses = train_dalle2(clip, images, embeds, config, progress, log_dir, stopwatch, vae)
    with stopwatch("dalle2_generation"):
        samples = generate_dalle2(dalle2, prompt_ids, config, config.samples_per_prompt, progress=progress)
    fidelity = judge_samples(samples, prompts, classifier)
    with stopwatch("dalle2_extras"):
        held = [i for i, p in enumerate(prompts) if p.heldout]
        seen = [i for i, p in enumerate(prompts) if not p.heldout]
        real = images[:: max(1, len(images) // 8)][:8].cpu()
        inpaint_at = [seen[0], held[0], seen[-1]] if held else seen[:3]
        variations, masked, inpainted = variations_and_inpainting(dalle2, real, prompt_ids[inpaint_at], config)
    rows = dalle2_grid_rows(
        prompts, samples, fidelity, grid_prompt_indices(prompts), real, variations, masked, inpainted,
        [prompts[i].caption for i in inpaint_at],
    )  # fmt: skip
    return dalle2, fidelity, losses, rows
