"""Decoder: the unCLIP image decoder (Ramesh et al. 2022, https://arxiv.org/abs/2204.06125, section 2.2), a
cascade of diffusion U-Nets that turns a CLIP image embedding (and optionally text) into an image.

- Each U-Net is a Gaussian diffusion (Ho et al. 2020, https://arxiv.org/abs/2006.11239) over its own
  image size; U-Net 1 makes the base image, each later one is conditioned on the image of the one before,
  up-sampled to its size (cascaded diffusion, Ho et al. 2021, https://arxiv.org/abs/2106.15282). In
  training that condition is the ground truth down-sampled then up-sampled again, and in both training and
  sampling it is noised ("noise conditioning augmentation", same paper), so a stage learns to correct the
  previous stage's mistakes; the level of that noise is an input of the U-Net.
- The U-Nets are trained one at a time (``decoder(images, unet_number=i)``); the CLIP and the image
  tokenizers are frozen.
- Classifier-free guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598): the image embedding and
  the text are dropped independently in training (``image_cond_drop_prob``, ``text_cond_drop_prob``); in
  sampling the unconditioned rows drop both.
- Latent diffusion (``vae=``): a U-Net may diffuse in the latent space of a frozen image tokenizer instead
  of pixels (see ``latents.py``).
- Inpainting by resampling (RePaint, https://arxiv.org/abs/2201.09865, see ``inpainting.py``).

Images are (b, 3, S, S) floats in [0, 1], in and out. Shape letters: b batch, c channels, s side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_pytorch.diffusion.clip_adapter import BaseClipAdapter, as_clip_adapter
from dalle_pytorch.diffusion.inpainting import repaint_loop
from dalle_pytorch.diffusion.latents import LatentSpace, PixelSpace, latent_space
from dalle_pytorch.diffusion.samplers import check_cond_scale, guided_forward, randn, sample_loop
from dalle_pytorch.diffusion.schedule import SCHEDULE_KINDS, NoiseSchedule
from dalle_pytorch.diffusion.unet import Unet
from dalle_pytorch.io.checkpoint import PretrainedMixin
from dalle_pytorch.models.sampling import Generators

# distinct image tokenizers are saved as sub-models under these names
VAE_SLOTS = ("vae_1", "vae_2", "vae_3", "vae_4")


def resize(images: Tensor, size: int) -> Tensor:
    """(b, c, s, s) -> (b, c, size, size): area averaging down (no aliasing), bilinear up."""
    if images.shape[-1] == size:
        return images
    if images.shape[-1] > size:
        return F.interpolate(images, size=(size, size), mode="area")
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def _as_tuple(value: Any) -> tuple:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (value,)


class Decoder(PretrainedMixin, nn.Module):
    """A cascade of U-Nets from CLIP image embeddings to (b, 3, image_sizes[-1], image_sizes[-1]) images in [0, 1].

    unet: one Unet or a tuple (the cascade, lowest resolution first; every U-Net after the first must have
    ``lowres_cond=True``). image_sizes: the pixel side of each U-Net's output. clip: a CLIP used to embed
    training images (and to encode text for U-Nets with ``cond_on_text_encodings``); frozen. vae: None or a
    tuple with one entry per U-Net (shorter tuples are padded with None = pixel space): a DiscreteVAE or
    VQGanVAE whose latent space that U-Net diffuses in; frozen. sample_timesteps: default DDIM steps for
    sampling (None = every timestep, DDPM). lowres_noise_level: the fraction of the schedule by which a
    later U-Net's low-resolution condition is noised (in training, a uniformly drawn level up to it).
    """

    pretrained_children = ("clip", *VAE_SLOTS)

    def __init__(
        self,
        unet: Unet | Sequence[Unet],
        *,
        clip: nn.Module | BaseClipAdapter | None = None,
        vae: nn.Module | Sequence[nn.Module | None] | None = None,
        image_sizes: Sequence[int] | None = None,
        timesteps: int = 1000,
        image_cond_drop_prob: float = 0.1,
        text_cond_drop_prob: float = 0.5,
        beta_schedule: str = "cosine",
        sample_timesteps: int | None = None,
        lowres_noise_level: float = 0.2,
        inpaint_resample_times: int = 5,
    ):
        super().__init__()
        unets = _as_tuple(unet)
        if not unets or not all(isinstance(u, Unet) for u in unets):
            raise TypeError(f"unet must be a Unet or a tuple of Unets, got {unet!r:.80}")
        embed_dims = [u.image_embed_dim for u in unets]
        if len(set(embed_dims)) > 1:
            raise ValueError(f"every U-Net must read the same image embedding width, got image_embed_dim {embed_dims}")
        image_sizes = _as_tuple(image_sizes)
        if len(image_sizes) != len(unets):
            raise ValueError(f"image_sizes needs one size per U-Net ({len(unets)}), got {image_sizes!r}")
        positive = all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in image_sizes)
        if not positive or list(image_sizes) != sorted(image_sizes):
            raise ValueError(f"image_sizes must be non-decreasing positive ints, got {image_sizes!r}")
        vaes = _as_tuple(vae)
        if len(vaes) > len(unets):
            raise ValueError(f"vae has {len(vaes)} entries for {len(unets)} U-Nets")
        vaes = vaes + (None,) * (len(unets) - len(vaes))
        for name, p in (("image_cond_drop_prob", image_cond_drop_prob), ("text_cond_drop_prob", text_cond_drop_prob)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p!r}")
        if beta_schedule not in SCHEDULE_KINDS:
            raise ValueError(f"beta_schedule must be one of {SCHEDULE_KINDS}, got {beta_schedule!r}")
        if not 0.0 <= lowres_noise_level < 1.0:
            raise ValueError(f"lowres_noise_level must be in [0, 1), got {lowres_noise_level!r}")

        # distinct tokenizers, each stored once (a tokenizer shared by two U-Nets takes one slot)
        distinct = list({id(v): v for v in vaes if v is not None}.values())
        if len(distinct) > len(VAE_SLOTS):
            raise ValueError(f"at most {len(VAE_SLOTS)} distinct image tokenizers, got {len(distinct)}")
        slots = [None if v is None else VAE_SLOTS[[id(d) for d in distinct].index(id(v))] for v in vaes]
        for slot, tokenizer in zip(VAE_SLOTS, distinct):
            setattr(self, slot, tokenizer.requires_grad_(False).eval())
        adapter = as_clip_adapter(clip) if clip is not None else None
        # the adapter is a plain object: the CLIP module is registered (and saved) once, as `clip`
        self.clip = adapter.clip.requires_grad_(False).eval() if adapter is not None else None
        self.clip_adapter = adapter
        self.config = dict(
            unet=[dict(u.config) for u in unets], image_sizes=image_sizes, timesteps=timesteps,
            image_cond_drop_prob=image_cond_drop_prob, text_cond_drop_prob=text_cond_drop_prob,
            beta_schedule=beta_schedule, sample_timesteps=sample_timesteps, lowres_noise_level=lowres_noise_level,
            inpaint_resample_times=inpaint_resample_times, vae=slots,
        )  # fmt: skip
        self.unets = nn.ModuleList(unets)
        self.image_sizes = image_sizes
        self.latents = nn.ModuleList(latent_space(v) for v in vaes)
        self.schedule = NoiseSchedule(timesteps, beta_schedule)
        self.image_cond_drop_prob, self.text_cond_drop_prob = image_cond_drop_prob, text_cond_drop_prob
        self.sample_timesteps, self.lowres_noise_level = sample_timesteps, lowres_noise_level
        self.inpaint_resample_times = inpaint_resample_times
        for number, (u, size, space) in enumerate(zip(unets, image_sizes, self.latents), start=1):
            self._check_stage(number, u, size, space)
            if adapter is not None and u.image_embed_dim != adapter.dim_latent:
                raise ValueError(
                    f"U-Net {number} has image_embed_dim={u.image_embed_dim}; the CLIP's is {adapter.dim_latent}"
                )
            if adapter is not None and u.cond_on_text_encodings and u.text_embed_dim != adapter.text_encoding_dim:
                raise ValueError(
                    f"U-Net {number} has text_embed_dim={u.text_embed_dim}; the CLIP's text encodings have "
                    f"{adapter.text_encoding_dim}"
                )

    @classmethod
    def _from_config(cls, config: dict[str, Any], **children: Any) -> Decoder:
        config = dict(config)
        unets = tuple(Unet(**unet_config) for unet_config in config.pop("unet"))
        vaes = tuple(None if slot is None else children[slot] for slot in config.pop("vae"))
        return cls(unet=unets, vae=vaes, clip=children.get("clip"), **config)

    @staticmethod
    def _check_stage(number: int, unet: Unet, size: int, space: LatentSpace) -> None:
        if unet.lowres_cond != (number > 1):
            raise ValueError(
                f"U-Net {number} has lowres_cond={unet.lowres_cond}; the first U-Net of a cascade needs "
                "lowres_cond=False and every later one lowres_cond=True"
            )
        if space.image_size is not None and space.image_size != size:
            raise ValueError(f"U-Net {number}'s vae encodes {space.image_size}px images, but its image size is {size}")
        if unet.channels != space.channels:
            raise ValueError(
                f"U-Net {number} has channels={unet.channels}, but its {'latent' if space.image_size else 'pixel'} "
                f"space has {space.channels} channels"
            )
        side = size // space.downsample_factor
        if size % space.downsample_factor or side % unet.downsample_factor:
            raise ValueError(
                f"U-Net {number}: image size {size} gives a {side}x{side} grid, which its {len(unet.downs)} levels "
                f"cannot halve {len(unet.downs) - 1} times; use an image size divisible by "
                f"{space.downsample_factor * unet.downsample_factor}"
            )

    def train(self, mode: bool = True) -> Decoder:
        super().train(mode)
        for frozen in (self.clip, *(getattr(self, slot, None) for slot in VAE_SLOTS)):
            if frozen is not None:
                frozen.eval()  # frozen models never switch to training behaviour
        return self

    @property
    def num_unets(self) -> int:
        return len(self.unets)

    # ------------------------------------------------------------------------------------------ conditions

    def _check_unet_number(self, unet_number: int) -> int:
        if isinstance(unet_number, bool) or not isinstance(unet_number, int) or not 1 <= unet_number <= self.num_unets:
            raise ValueError(f"unet_number must be an int in [1, {self.num_unets}], got {unet_number!r}")
        return unet_number - 1

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        """CLIP image embeddings (b, d) of images (b, 3, s, s) in [0, 1], resized to the CLIP's input size."""
        adapter = self._require_clip("image_embed")
        return adapter.embed_image(resize(images, adapter.image_size).to(adapter.device))

    @torch.no_grad()
    def encode_text(self, text: str | Sequence[str] | Tensor) -> tuple[Tensor, Tensor]:
        """Strings or token ids (b, n) -> the CLIP's per-token text encodings (b, n, e) and their mask (b, n)."""
        adapter = self._require_clip("text_encodings")
        embeds = adapter.embed_text(adapter.prepare_text(text))
        return embeds.text_encodings, embeds.mask

    def _require_clip(self, what: str) -> BaseClipAdapter:
        if self.clip_adapter is None:
            raise ValueError(f"this Decoder has no clip: pass {what}, or build the Decoder with clip=...")
        return self.clip_adapter

    def _text_conditions(
        self, unet: Unet, batch: int, text: Tensor | None, text_encodings: Tensor | None, text_mask: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        if not unet.cond_on_text_encodings:
            return None, None
        if text is not None and text_encodings is not None:
            raise ValueError("give text (token ids) or text_encodings, not both")
        if text is not None:
            text_encodings, text_mask = self.encode_text(text)
        if text_encodings is None:
            raise ValueError("this U-Net reads text (cond_on_text_encodings=True): pass text or text_encodings")
        if text_encodings.shape[0] != batch:
            raise ValueError(f"text_encodings has batch {text_encodings.shape[0]}, the images {batch}")
        return text_encodings, text_mask

    def _check_image_embed(self, image_embed: Tensor, batch: int | None = None) -> Tensor:
        dim = self.unets[0].image_embed_dim
        if not torch.is_tensor(image_embed) or image_embed.ndim != 2 or image_embed.shape[1] != dim:
            raise ValueError(f"image_embed must have shape (batch, {dim}), got {getattr(image_embed, 'shape', None)}")
        if batch is not None and image_embed.shape[0] != batch:
            raise ValueError(f"image_embed has batch {image_embed.shape[0]}, the images {batch}")
        return image_embed

    def _lowres_condition(
        self, index: int, previous: Tensor, noise_level: Tensor, generator: Generators = None
    ) -> Tensor:
        """The previous stage's images (b, 3, s', s') in [0, 1] -> U-Net ``index``'s noised condition."""
        cond = self.latents[index].encode(resize(previous, self.image_sizes[index]))
        noise = randn(cond.shape, generator, cond.device, cond.dtype)
        return self.schedule.q_sample(cond, noise_level, noise)

    # -------------------------------------------------------------------------------------------- training

    def forward(
        self,
        images: Tensor,
        unet_number: int = 1,
        *,
        image_embed: Tensor | None = None,
        text: Tensor | None = None,
        text_encodings: Tensor | None = None,
        text_mask: Tensor | None = None,
    ) -> Tensor:
        """The diffusion loss (a scalar) of U-Net ``unet_number`` on images (b, 3, s, s) in [0, 1].

        s is that U-Net's image size or the last (full) size, which is resized down. image_embed (b, d): the
        CLIP image embeddings, computed by the decoder's CLIP when not given. text (b, n) token ids or
        text_encodings (b, n, d) with text_mask (b, n): read by U-Nets with cond_on_text_encodings.
        """
        index = self._check_unet_number(unet_number)
        size, unet = self.image_sizes[index], self.unets[index]
        if not torch.is_tensor(images) or not images.is_floating_point() or images.ndim != 4:
            raise ValueError(f"images must be a float tensor (batch, 3, s, s), got {getattr(images, 'shape', images)}")
        accepted = sorted({size, self.image_sizes[-1]})
        if images.shape[1] != 3 or images.shape[-2] != images.shape[-1] or images.shape[-1] not in accepted:
            raise ValueError(
                f"U-Net {unet_number} trains on (batch, 3, s, s) images with s in {accepted} (its size, or the "
                f"decoder's last size, resized down), got {tuple(images.shape)}"
            )
        b, device = images.shape[0], images.device
        image_embed = self._check_image_embed(image_embed if image_embed is not None else self.embed_images(images), b)
        text_encodings, text_mask = self._text_conditions(unet, b, text, text_encodings, text_mask)

        target_images = resize(images, size)
        with torch.no_grad():
            x0 = self.latents[index].encode(target_images)
            lowres_cond_img, lowres_level = None, None
            if index > 0:
                # what the previous stage could have made: the truth at its size, up-sampled and noised
                max_level = int(self.lowres_noise_level * self.schedule.timesteps)
                lowres_level = torch.randint(0, max_level + 1, (b,), device=device)
                previous = resize(target_images, self.image_sizes[index - 1])
                lowres_cond_img = self._lowres_condition(index, previous, lowres_level)
        t = self.schedule.random_timesteps(b, device=device)
        noise = torch.randn_like(x0)
        x_t = self.schedule.q_sample(x0, t, noise)
        pred = unet(
            x_t, t, image_embed=image_embed, text_encodings=text_encodings, text_mask=text_mask,
            lowres_cond_img=lowres_cond_img, lowres_noise_level=lowres_level,
            image_cond_mask=torch.rand(b, device=device) >= self.image_cond_drop_prob,
            text_cond_mask=torch.rand(b, device=device) >= self.text_cond_drop_prob,
        )  # fmt: skip
        return self.loss(pred, x0 if unet.predict_x0 else noise)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Mean squared error between the U-Net's prediction and its target (override for another loss)."""
        return F.mse_loss(pred, target)

    # -------------------------------------------------------------------------------------------- sampling

    def _x0_fn(self, index: int, cond_scale: float, **conditions: Tensor | None):
        """model_fn(x_t, t) -> guided x0 prediction of U-Net ``index``."""
        unet = self.unets[index]

        def forward(x: Tensor, t: Tensor, cond_drop: Tensor, **c: Tensor | None) -> Tensor:
            return unet(x, t, image_cond_mask=~cond_drop, text_cond_mask=~cond_drop, **c)

        def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
            pred = guided_forward(forward, x_t, t, cond_scale, **conditions)
            return pred if unet.predict_x0 else self.schedule.predict_x0_from_noise(x_t, t, pred)

        return model_fn

    def _inpaint_inputs(self, image: Tensor | None, mask: Tensor | None, batch: int) -> tuple[Tensor, Tensor] | None:
        if image is None and mask is None:
            return None
        size = self.image_sizes[-1]
        if image is None or mask is None:
            raise ValueError("inpainting needs both inpaint_image and inpaint_mask")
        if not torch.is_tensor(image) or tuple(image.shape) != (batch, 3, size, size):
            raise ValueError(f"inpaint_image must have shape ({batch}, 3, {size}, {size}), got {tuple(image.shape)}")
        if mask.ndim == 4 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if tuple(mask.shape) != (batch, size, size):
            raise ValueError(f"inpaint_mask must have shape ({batch}, {size}, {size}), got {tuple(mask.shape)}")
        return image, mask.bool()[:, None]  # (b, 1, s, s), True = known

    @torch.no_grad()
    def sample(
        self,
        image_embed: Tensor,
        *,
        text: Tensor | None = None,
        text_encodings: Tensor | None = None,
        text_mask: Tensor | None = None,
        cond_scale: float = 1.0,
        generator: Generators = None,
        sample_steps: int | None = None,
        eta: float = 0.0,
        inpaint_image: Tensor | None = None,
        inpaint_mask: Tensor | None = None,
        inpaint_resample_times: int | None = None,
        stop_at_unet_number: int | None = None,
    ) -> Tensor:
        """Images (b, 3, s, s) in [0, 1] at the last U-Net's size (or ``stop_at_unet_number``'s) for image_embed (b, d).

        sample_steps: DDIM with that many steps (default ``sample_timesteps``; None = DDPM over every step).
        cond_scale >= 1: classifier-free guidance (1 = none). generator: one torch.Generator or one per row.
        inpaint_image (b, 3, s, s) in [0, 1] with inpaint_mask (b, s, s) bool, True where the pixel is known:
        the known pixels are returned exactly as given, the rest is generated to agree with them.
        """
        check_cond_scale(cond_scale)
        image_embed = self._check_image_embed(image_embed)
        b = image_embed.shape[0]
        last = self.num_unets if stop_at_unet_number is None else self._check_unet_number(stop_at_unet_number) + 1
        inpaint = self._inpaint_inputs(inpaint_image, inpaint_mask, b)
        steps = sample_steps if sample_steps is not None else self.sample_timesteps
        resample_times = inpaint_resample_times if inpaint_resample_times is not None else self.inpaint_resample_times
        images = None
        for index in range(last):
            unet, size, space = self.unets[index], self.image_sizes[index], self.latents[index]
            text_enc, mask = self._text_conditions(unet, b, text, text_encodings, text_mask)
            conditions = dict(image_embed=image_embed, text_encodings=text_enc, text_mask=mask)
            if index > 0:
                level = int(self.lowres_noise_level * self.schedule.timesteps)
                noise_level = torch.full((b,), level, dtype=torch.long, device=image_embed.device)
                lowres = self._lowres_condition(index, images, noise_level, generator)
                conditions.update(lowres_cond_img=lowres, lowres_noise_level=noise_level)
            model_fn = self._x0_fn(index, cond_scale, **conditions)
            clip_x0 = (-1.0, 1.0) if isinstance(space, PixelSpace) else None  # latents have no fixed range
            side = size // space.downsample_factor
            if inpaint is None:
                shape = (b, unet.channels, side, side)
                x = sample_loop(model_fn, shape, self.schedule, sample_steps=steps, eta=eta, generator=generator,
                                clip_x0=clip_x0, device=image_embed.device)  # fmt: skip
            else:
                known = space.encode(resize(inpaint[0], size))
                known_mask = F.interpolate(inpaint[1].float(), size=(side, side), mode="area") > 0.999
                x = repaint_loop(model_fn, self.schedule, known, known_mask, resample_times=resample_times,
                                 sample_steps=steps, eta=eta, generator=generator, clip_x0=clip_x0)  # fmt: skip
            images = space.decode(x)
        if inpaint is not None and last == self.num_unets:
            images = torch.where(inpaint[1], inpaint[0], images)  # the known pixels exactly as given
        return images

    @torch.no_grad()
    def variations(self, images: Tensor, **sample_kwargs: Any) -> Tensor:
        """New images sharing the CLIP image embedding of images (b, 3, s, s) in [0, 1]; arguments as ``sample``.

        U-Nets that read text get the null text condition (as for captions dropped in training) unless
        ``text`` or ``text_encodings`` is given."""
        readers = [u for u in self.unets if u.cond_on_text_encodings]
        if readers and sample_kwargs.get("text") is None and sample_kwargs.get("text_encodings") is None:
            b, device = images.shape[0], images.device
            sample_kwargs["text_encodings"] = torch.zeros(b, 1, readers[0].text_embed_dim, device=device)
            sample_kwargs["text_mask"] = torch.zeros(b, 1, dtype=torch.bool, device=device)
        return self.sample(self.embed_images(images), **sample_kwargs)
