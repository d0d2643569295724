"""CLIP-guided generation: no generator at all, but the discrete VAE's codes optimised against CLIP.

Before text-to-image transformers were released, images were drawn from text by searching the code space
of a trained image decoder for the image a trained CLIP finds most similar to the text (the "big sleep"
family of notebooks, e.g. DALL-E's discrete VAE with CLIP). Here the search variable is a grid of logits
over the VAE's codebook, (b, fmap * fmap, num_tokens). Each step draws a relaxed one-hot sample of the
codes with the Gumbel-softmax (Jang et al. 2016, https://arxiv.org/abs/1611.01144; Maddison et al. 2016,
https://arxiv.org/abs/1611.00712), decodes it (`decode_relaxed`), shows CLIP (Radford et al. 2021,
https://arxiv.org/abs/2103.00020) several random crops, flips and noisy copies of the image, and takes an
Adam step up the mean cosine similarity to the text. The temperature falls geometrically, so the relaxed
samples approach hard codes; the result is the arg-max code of every grid cell, decoded with `decode`.

The augmentations matter: one fixed view of the pixels lets the optimiser find adversarial patterns CLIP
scores highly but no one would call the text's picture; the similarity has to hold for every crop.

Only the logits are optimised: gradients are taken with `torch.autograd.grad` with respect to them alone,
so the VAE's and CLIP's parameters never receive a `.grad` and their `requires_grad` flags stay as they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from dalle_pytorch.models.sampling import Generators, per_sample_draw

__all__ = ["ClipGuidedResult", "augment_views", "clip_guided_generate", "image_similarity"]


@dataclass
class ClipGuidedResult:
    images: Tensor  # (b, c, H, W): the hard codes decoded by the VAE, in its output range
    codes: Tensor  # (b, fmap * fmap) long: the arg-max code of every grid cell
    similarity: Tensor  # (b,) CLIP cosine similarity of each image (resized to CLIP's size) to its text
    history: list[float]  # the mean augmented similarity of the relaxed images at every step


def augment_views(
    images: Tensor,
    num_views: int,
    size: int,
    *,
    min_crop: float = 0.6,
    noise_std: float = 0.02,
    generator: Generators = None,
) -> Tensor:
    """Random square crops (side a fraction in [min_crop, 1] of the image), horizontal flips and Gaussian
    noise of `images` (b, c, H, W), each resized to `size`: (b * num_views, c, size, size), differentiable
    in `images`. With one generator per image, an image's views depend on its generator alone."""
    if not torch.is_tensor(images) or not images.is_floating_point() or images.ndim != 4:
        raise TypeError(f"images must be a (b, c, H, W) float tensor, got {getattr(images, 'shape', images)}")
    if num_views < 1 or size < 1:
        raise ValueError(f"num_views and size must be >= 1, got {num_views} and {size}")
    b, c = images.shape[:2]
    draws = per_sample_draw(torch.rand, b, (num_views, 4), generator, images.device)  # (b, v, 4)
    noise = per_sample_draw(torch.randn, b, (num_views, c, size, size), generator, images.device)
    draws = rearrange(draws, "b v k -> (b v) k").to(images.dtype)
    scale = min_crop + (1 - min_crop) * draws[:, 0]
    # the crop's centre keeps the whole crop inside the image: |shift| <= 1 - scale in [-1, 1] coordinates
    shift_x, shift_y = ((2 * draws[:, i] - 1) * (1 - scale) for i in (1, 2))
    flip = torch.where(draws[:, 3] < 0.5, -1.0, 1.0).to(images.dtype)
    zero = torch.zeros_like(scale)
    theta = torch.stack([torch.stack([scale * flip, zero, shift_x], -1), torch.stack([zero, scale, shift_y], -1)], 1)
    grid = F.affine_grid(theta, [b * num_views, c, size, size], align_corners=False)  # (b v, size, size, 2)
    views = repeat(images, "b c h w -> (b v) c h w", v=num_views)
    views = F.grid_sample(views, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return views + noise_std * rearrange(noise, "b v c h w -> (b v) c h w").to(images.dtype)


def _check(vae: nn.Module, clip: nn.Module, text: Tensor, generator: Generators, options: dict[str, float]) -> None:
    if not callable(getattr(vae, "decode_relaxed", None)) or not callable(getattr(vae, "decode", None)):
        raise TypeError(
            f"vae must be an image tokenizer with decode(codes) and decode_relaxed(probs) (e.g. DiscreteVAE), "
            f"got {type(vae).__name__}"
        )
    if not all(callable(getattr(clip, name, None)) for name in ("embed_text", "embed_image")):
        raise TypeError(f"clip must have embed_text and embed_image (e.g. a CLIP), got {type(clip).__name__}")
    vae_channels, clip_channels = getattr(vae, "channels", None), getattr(clip, "channels", None)
    if vae_channels != clip_channels:
        raise ValueError(f"vae has {vae_channels} image channels but clip reads {clip_channels}")
    if not torch.is_tensor(text) or text.dtype not in (torch.int32, torch.int64) or text.ndim != 2 or not len(text):
        raise TypeError(f"text must be a non-empty (batch, n) tensor of token ids, got {getattr(text, 'shape', text)}")
    if isinstance(generator, Sequence) and len(generator) != len(text):
        raise ValueError(f"generator list has {len(generator)} generators for {len(text)} texts")
    for name in ("steps", "num_augments"):
        if type(options[name]) is not int or options[name] < 1:
            raise ValueError(f"{name} must be an int >= 1, got {options[name]!r}")
    for name in ("lr", "start_temperature", "end_temperature", "init_std"):
        if not options[name] > 0:
            raise ValueError(f"{name} must be > 0, got {options[name]!r}")
    if not 0 < options["min_crop"] <= 1:
        raise ValueError(f"min_crop must be in (0, 1], got {options['min_crop']!r}")
    if not options["noise_std"] >= 0:
        raise ValueError(f"noise_std must be >= 0, got {options['noise_std']!r}")


def clip_guided_generate(
    vae: nn.Module,
    clip: nn.Module,
    text: Tensor,
    *,
    steps: int = 200,
    lr: float = 0.1,
    num_augments: int = 8,
    start_temperature: float = 1.0,
    end_temperature: float = 0.1,
    init_std: float = 1.0,
    min_crop: float = 0.6,
    noise_std: float = 0.02,
    generator: Generators = None,
) -> ClipGuidedResult:
    """Images for `text` (b, n) token ids (CLIP's tokenizer, n <= clip.text_seq_len) found by optimising
    code logits against `clip` through `vae` (see the module docstring). Both models are left unchanged.

    steps: Adam steps with learning rate `lr`; num_augments: views of each image CLIP scores per step;
    start_temperature -> end_temperature: the Gumbel-softmax temperature, decayed geometrically; init_std:
    standard deviation of the initial logits; min_crop, noise_std: see `augment_views`. `generator`: one
    torch.Generator for the whole batch, or one per text, so that a batch equals its texts run one by one.
    """
    options = dict(
        steps=steps, lr=lr, num_augments=num_augments, start_temperature=start_temperature,
        end_temperature=end_temperature, init_std=init_std, min_crop=min_crop, noise_std=noise_std,
    )  # fmt: skip
    _check(vae, clip, text, generator, options)
    device = next(clip.parameters()).device
    modes = [(module, module.training) for module in (vae, clip)]
    vae.eval()
    clip.eval()
    try:
        with torch.no_grad():
            text_embed = clip.embed_text(text.to(device))  # (b, d)
        b, n, k = len(text), vae.fmap_size**2, vae.num_tokens
        logits = (init_std * per_sample_draw(torch.randn, b, (n, k), generator, device)).requires_grad_()
        optimizer = torch.optim.Adam([logits], lr=lr)
        history = []
        for step in range(steps):
            temperature = start_temperature * (end_temperature / start_temperature) ** (step / max(steps - 1, 1))
            uniforms = per_sample_draw(torch.rand, b, (n, k), generator, device)
            gumbels = -torch.log(-torch.log(uniforms.clamp(1e-10, 1 - 1e-7)))
            probs = ((logits + gumbels) / temperature).softmax(dim=-1)  # (b, n, k)
            views = augment_views(
                vae.decode_relaxed(probs), num_augments, clip.image_size,
                min_crop=min_crop, noise_std=noise_std, generator=generator,
            )  # fmt: skip
            image_embed = rearrange(clip.embed_image(views), "(b v) d -> b v d", v=num_augments)
            similarity = (image_embed * text_embed[:, None]).sum(dim=-1).mean(dim=1)  # (b,)
            # a sum, not a mean, over the batch: each text's logits get the gradient they would get alone
            (grad,) = torch.autograd.grad(-similarity.sum(), [logits])
            logits.grad = grad
            optimizer.step()
            history.append(float(similarity.detach().mean()))
        with torch.no_grad():
            codes = logits.argmax(dim=-1)  # (b, n)
            images = vae.decode(codes)
            similarity = image_similarity(clip, images, text_embed)
    finally:
        for module, training in modes:
            module.train(training)
    return ClipGuidedResult(images=images, codes=codes, similarity=similarity, history=history)


def image_similarity(clip: nn.Module, images: Tensor, text_embed: Tensor) -> Tensor:
    """Cosine similarity (b,) of images (b, c, H, W), resized to CLIP's input size, to unit text_embed (b, d)."""
    if images.shape[-1] != clip.image_size or images.shape[-2] != clip.image_size:
        images = F.interpolate(images, size=(clip.image_size, clip.image_size), mode="bilinear", antialias=True)
    return (clip.embed_image(images) * text_embed).sum(dim=-1)
