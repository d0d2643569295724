"""Unet: the denoising network of the unCLIP decoder (Ramesh et al. 2022, https://arxiv.org/abs/2204.06125,
section 2.2), a diffusion U-Net (Ho et al. 2020, https://arxiv.org/abs/2006.11239; Nichol & Dhariwal 2021,
https://arxiv.org/abs/2102.09672) conditioned on a CLIP image embedding.

The image embedding conditions the network twice, as in the paper: projected and added to the timestep
embedding (which scales and shifts every ResNet block), and projected to ``num_image_tokens`` context tokens
that the attention layers attend to beside the pixels. Optional text encodings become more context tokens
(and their masked mean another bias). A cascade's later stages also take a low-resolution image
(``lowres_cond``), concatenated to the input channels, with the level of the noise that augmented it.

For classifier-free guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598) the image and the text
condition of each row can be replaced by learned null embeddings (``image_cond_mask``, ``text_cond_mask``).

Shape letters: b batch, c channels, x y spatial, n context tokens, k image-embedding tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from dalle_pytorch.diffusion.unet_blocks import (
    ContextAttention,
    Downsample,
    ResnetBlock,
    TimestepEmbedding,
    Upsample,
    group_count,
)
from dalle_pytorch.io.checkpoint import PretrainedMixin


def _keep_mask(mask: Tensor | None, batch: int, device: torch.device, name: str) -> Tensor:
    if mask is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    if not torch.is_tensor(mask) or mask.shape != (batch,):
        raise ValueError(f"{name} must be a ({batch},) bool tensor, got {getattr(mask, 'shape', type(mask))}")
    return mask.bool().to(device)


def _mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))


class _Level(nn.Module):
    """ResNet blocks, then attention when asked: one resolution of the U-Net's down or up path."""

    def __init__(self, in_dim: int, out_dim: int, blocks: int, cond_dim: int, context_dim: int, attn: bool, **kw):
        super().__init__()
        groups, dropout = kw["groups"], kw["dropout"]
        self.blocks = nn.ModuleList(
            ResnetBlock(in_dim if i == 0 else out_dim, out_dim, cond_dim, groups, dropout) for i in range(blocks)
        )
        self.attn = (
            ContextAttention(out_dim, context_dim, kw["heads"], kw["dim_head"], groups) if attn else None
        )  # fmt: skip

    def forward(self, x: Tensor, cond: Tensor, context: Tensor, context_mask: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x, cond)
        if self.attn is not None:
            x = self.attn(x, context, context_mask)
        return x


class Unet(PretrainedMixin, nn.Module):
    """Predicts the noise (or, with ``predict_x0``, the clean image) of x_t (b, channels, s, s).

    dim: channels of the first level; level i has ``dim * dim_mults[i]`` channels and resolution s / 2 ** i,
    so s must be divisible by 2 ** (len(dim_mults) - 1). image_embed_dim: width of the CLIP image embedding.
    cond_dim: width of the context tokens (default dim). layer_attns: which levels attend (default: the
    lowest-resolution one; the middle of the U-Net always does). text_embed_dim: width of the text encodings
    when ``cond_on_text_encodings`` (default image_embed_dim).
    """

    def __init__(
        self,
        dim: int,
        image_embed_dim: int,
        cond_dim: int | None = None,
        channels: int = 3,
        dim_mults: Sequence[int] = (1, 2, 4, 8),
        *,
        num_resnet_blocks: int = 1,
        layer_attns: Sequence[bool] | None = None,
        attn_heads: int = 4,
        attn_dim_head: int = 32,
        resnet_groups: int = 8,
        num_image_tokens: int = 4,
        cond_on_text_encodings: bool = False,
        text_embed_dim: int | None = None,
        lowres_cond: bool = False,
        predict_x0: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        sizes = dict(dim=dim, image_embed_dim=image_embed_dim, channels=channels,
                     num_resnet_blocks=num_resnet_blocks, num_image_tokens=num_image_tokens)  # fmt: skip
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        dim_mults = tuple(dim_mults)
        if not dim_mults or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in dim_mults):
            raise ValueError(f"dim_mults must be a non-empty sequence of positive ints, got {dim_mults!r}")
        levels = len(dim_mults)
        layer_attns = tuple(layer_attns) if layer_attns is not None else (False,) * (levels - 1) + (True,)
        if len(layer_attns) != levels:
            raise ValueError(f"layer_attns needs one bool per level ({levels}), got {layer_attns!r}")
        cond_dim = cond_dim or dim
        text_embed_dim = text_embed_dim or image_embed_dim
        self.config = dict(
            dim=dim, image_embed_dim=image_embed_dim, cond_dim=cond_dim, channels=channels, dim_mults=dim_mults,
            num_resnet_blocks=num_resnet_blocks, layer_attns=tuple(bool(a) for a in layer_attns),
            attn_heads=attn_heads, attn_dim_head=attn_dim_head, resnet_groups=resnet_groups,
            num_image_tokens=num_image_tokens, cond_on_text_encodings=cond_on_text_encodings,
            text_embed_dim=text_embed_dim, lowres_cond=lowres_cond, predict_x0=predict_x0, dropout=dropout,
        )  # fmt: skip
        self.channels, self.image_embed_dim, self.text_embed_dim = channels, image_embed_dim, text_embed_dim
        self.cond_on_text_encodings, self.lowres_cond, self.predict_x0 = cond_on_text_encodings, lowres_cond, predict_x0
        self.num_image_tokens, self.downsample_factor = num_image_tokens, 2 ** (levels - 1)

        time_dim = dim * 4
        self.time_embed = TimestepEmbedding(dim, time_dim)
        # the image embedding: a bias on the timestep embedding and k context tokens, each with a null twin
        self.image_to_cond = _mlp(image_embed_dim, time_dim)
        self.image_to_tokens = nn.Linear(image_embed_dim, cond_dim * num_image_tokens)
        self.null_image_cond = nn.Parameter(torch.randn(time_dim) * 0.02)
        self.null_image_tokens = nn.Parameter(torch.randn(num_image_tokens, cond_dim) * 0.02)
        if cond_on_text_encodings:
            self.text_to_tokens = nn.Linear(text_embed_dim, cond_dim)
            self.text_to_cond = _mlp(text_embed_dim, time_dim)
            self.null_text_cond = nn.Parameter(torch.randn(time_dim) * 0.02)
        if lowres_cond:
            self.lowres_noise_embed = TimestepEmbedding(dim, time_dim)

        dims = [dim, *(dim * m for m in dim_mults)]
        kw = dict(groups=resnet_groups, dropout=dropout, heads=attn_heads, dim_head=attn_dim_head)
        in_channels = channels * 2 if lowres_cond else channels
        self.init_conv = nn.Conv2d(in_channels, dim, 7, padding=3)
        self.downs, self.downsamples = nn.ModuleList(), nn.ModuleList()
        for i in range(levels):
            self.downs.append(_Level(dims[i], dims[i + 1], num_resnet_blocks, time_dim, cond_dim, layer_attns[i], **kw))
            last = i == levels - 1
            self.downsamples.append(nn.Identity() if last else Downsample(dims[i + 1], dims[i + 1]))
        mid = dims[-1]
        self.mid_block1 = ResnetBlock(mid, mid, time_dim, resnet_groups, dropout)
        self.mid_attn = ContextAttention(mid, cond_dim, attn_heads, attn_dim_head, resnet_groups)
        self.mid_block2 = ResnetBlock(mid, mid, time_dim, resnet_groups, dropout)
        self.ups, self.upsamples = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(levels)):
            # input: the path from below (dims[i + 1]) and the skip of the same level (dims[i + 1])
            up = _Level(dims[i + 1] * 2, dims[i], num_resnet_blocks, time_dim, cond_dim, layer_attns[i], **kw)
            self.ups.append(up)
            self.upsamples.append(Upsample(dims[i], dims[i]) if i > 0 else nn.Identity())
        self.final_block = ResnetBlock(dim * 2, dim, time_dim, resnet_groups, dropout)
        self.final_norm = nn.GroupNorm(group_count(dim, resnet_groups), dim)
        self.final_conv = nn.Conv2d(dim, channels, 3, padding=1)

    # ------------------------------------------------------------------------------------------- conditions

    def _check_inputs(self, x: Tensor, image_embed: Tensor, lowres_cond_img: Tensor | None) -> None:
        if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"x must be a float tensor (batch, {self.channels}, size, size), got {getattr(x, 'shape', type(x))}"
            )
        size = x.shape[-1]
        if x.shape[-2] != size or size % self.downsample_factor:
            raise ValueError(
                f"x must be square with a side divisible by {self.downsample_factor} (2 ** (levels - 1)), "
                f"got {tuple(x.shape[-2:])}"
            )
        if not torch.is_tensor(image_embed) or image_embed.shape != (x.shape[0], self.image_embed_dim):
            raise ValueError(
                f"image_embed must have shape ({x.shape[0]}, {self.image_embed_dim}), "
                f"got {getattr(image_embed, 'shape', type(image_embed))}"
            )
        if self.lowres_cond and (lowres_cond_img is None or lowres_cond_img.shape != x.shape):
            raise ValueError(
                f"this Unet has lowres_cond=True: lowres_cond_img must have the shape of x {tuple(x.shape)}, "
                f"got {getattr(lowres_cond_img, 'shape', None)}"
            )
        if not self.lowres_cond and lowres_cond_img is not None:
            raise ValueError("lowres_cond_img given to a Unet built with lowres_cond=False")

    def _conditions(
        self,
        t: Tensor,
        image_embed: Tensor,
        text_encodings: Tensor | None,
        text_mask: Tensor | None,
        image_keep: Tensor,
        text_keep: Tensor,
        lowres_noise_level: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The conditioning vector (b, time_dim) and the context tokens (b, n, cond_dim) with their mask (b, n)."""
        b = image_embed.shape[0]
        image_cond = torch.where(image_keep[:, None], self.image_to_cond(image_embed), self.null_image_cond)
        cond = self.time_embed(t) + image_cond
        tokens = rearrange(self.image_to_tokens(image_embed), "b (k c) -> b k c", k=self.num_image_tokens)
        context = torch.where(image_keep[:, None, None], tokens, self.null_image_tokens)  # (b, k, c)
        context_mask = torch.ones(b, self.num_image_tokens, dtype=torch.bool, device=image_embed.device)
        if self.cond_on_text_encodings:
            if text_encodings is None:  # no text at all: every row takes the null text condition
                text_keep = torch.zeros_like(text_keep)
                text_encodings = image_embed.new_zeros(b, 1, self.text_embed_dim)
            shape = tuple(text_encodings.shape)
            if len(shape) != 3 or (shape[0], shape[2]) != (b, self.text_embed_dim):
                raise ValueError(
                    f"text_encodings must have shape ({b}, n, {self.text_embed_dim}), got {shape}"
                )
            n = text_encodings.shape[1]
            if text_mask is None:
                text_mask = torch.ones(b, n, dtype=torch.bool, device=text_encodings.device)
            elif text_mask.shape != (b, n):
                raise ValueError(f"text_mask must have shape ({b}, {n}), got {tuple(text_mask.shape)}")
            text_mask = text_mask.bool() & text_keep[:, None]
            weights = text_mask[..., None].to(text_encodings.dtype)
            pooled = (text_encodings * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # (b, text_embed_dim)
            text_cond = torch.where(text_mask.any(dim=1, keepdim=True), self.text_to_cond(pooled), self.null_text_cond)
            cond = cond + text_cond
            context = torch.cat((context, self.text_to_tokens(text_encodings)), dim=1)
            context_mask = torch.cat((context_mask, text_mask), dim=1)
        if self.lowres_cond:
            level = lowres_noise_level if lowres_noise_level is not None else torch.zeros_like(t)
            cond = cond + self.lowres_noise_embed(level.to(t.device))
        return cond, context, context_mask

    # ---------------------------------------------------------------------------------------------- forward

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        *,
        image_embed: Tensor,
        text_encodings: Tensor | None = None,
        text_mask: Tensor | None = None,
        lowres_cond_img: Tensor | None = None,
        lowres_noise_level: Tensor | None = None,
        image_cond_mask: Tensor | None = None,
        text_cond_mask: Tensor | None = None,
    ) -> Tensor:
        """x (b, channels, s, s) at timesteps t (b,) -> prediction (b, channels, s, s): noise, or x0 with predict_x0.

        image_embed (b, image_embed_dim). text_encodings (b, n, text_embed_dim) with text_mask (b, n) bool, only
        read with cond_on_text_encodings. lowres_cond_img (b, channels, s, s), the upsampled earlier stage, and
        lowres_noise_level (b,) long, its augmentation timestep (lowres_cond only). image_cond_mask /
        text_cond_mask (b,) bool: False replaces that row's condition by the learned null one.
        """
        self._check_inputs(x, image_embed, lowres_cond_img)
        b, device = x.shape[0], x.device
        if not torch.is_tensor(t) or t.shape != (b,):
            raise ValueError(f"t must be a ({b},) tensor of timesteps, got {getattr(t, 'shape', type(t))}")
        image_keep = _keep_mask(image_cond_mask, b, device, "image_cond_mask")
        text_keep = _keep_mask(text_cond_mask, b, device, "text_cond_mask")
        cond, context, context_mask = self._conditions(
            t, image_embed, text_encodings, text_mask, image_keep, text_keep, lowres_noise_level
        )
        if self.lowres_cond:
            x = torch.cat((x, lowres_cond_img), dim=1)  # (b, 2 c, s, s)

        h = self.init_conv(x)
        first = h
        skips = []
        for level, downsample in zip(self.downs, self.downsamples):
            h = level(h, cond, context, context_mask)
            skips.append(h)
            h = downsample(h)
        h = self.mid_block1(h, cond)
        h = self.mid_attn(h, context, context_mask)
        h = self.mid_block2(h, cond)
        for level, upsample in zip(self.ups, self.upsamples):
            h = level(torch.cat((h, skips.pop()), dim=1), cond, context, context_mask)
            h = upsample(h)
        h = self.final_block(torch.cat((h, first), dim=1), cond)
        return self.final_conv(F.silu(self.final_norm(h)))
