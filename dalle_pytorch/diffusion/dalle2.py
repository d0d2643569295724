"""DALLE2: text -> images with unCLIP's two stages (Ramesh et al. 2022, https://arxiv.org/abs/2204.06125):
the diffusion prior samples a CLIP image embedding for the caption, the decoder turns it into an image.

The prior and the decoder are trained separately (``diffusion_prior(text, images)``, ``decoder(images,
unet_number=...)``); this class only samples and saves them together. When the decoder uses the prior's CLIP
(the same module), a saved DALLE2 stores that CLIP once, in ``prior/clip``, and gives it back to the decoder
on loading.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dalle_pytorch.diffusion.decoder import Decoder
from dalle_pytorch.diffusion.prior import DiffusionPrior
from dalle_pytorch.diffusion.samplers import check_cond_scale
from dalle_pytorch.io.checkpoint import PretrainedMixin
from dalle_pytorch.models.sampling import Generators


class DALLE2(PretrainedMixin, nn.Module):
    """A ``DiffusionPrior`` (with a CLIP) and a ``Decoder`` whose U-Nets read the prior's embedding width.

    ``decoder_uses_prior_clip``: the decoder shares the prior's CLIP module. None decides from the models: True
    when they hold the same CLIP or the decoder has none (it is then given the prior's, so that
    ``decoder(images, unet_number=...)`` can embed its training images).
    """

    pretrained_children = ("prior", "decoder")

    def __init__(self, *, prior: DiffusionPrior, decoder: Decoder, decoder_uses_prior_clip: bool | None = None):
        super().__init__()
        if not isinstance(prior, DiffusionPrior):
            raise TypeError(f"prior must be a DiffusionPrior, got {type(prior).__name__}")
        if not isinstance(decoder, Decoder):
            raise TypeError(f"decoder must be a Decoder, got {type(decoder).__name__}")
        if prior.clip_adapter is None:
            raise ValueError("the prior needs a clip to read text: build the DiffusionPrior with clip=...")
        decoder_dim = decoder.unets[0].image_embed_dim
        if decoder_dim != prior.image_embed_dim:
            raise ValueError(
                f"the prior samples embeddings of width {prior.image_embed_dim}, the decoder reads {decoder_dim}"
            )
        if decoder_uses_prior_clip is None:
            decoder_uses_prior_clip = decoder.clip is None or decoder.clip is prior.clip
        if decoder_uses_prior_clip:
            if decoder.clip is not None and decoder.clip is not prior.clip:
                raise ValueError("decoder_uses_prior_clip=True, but the decoder holds another CLIP")
            width = prior.clip_adapter.text_encoding_dim
            for number, unet in enumerate(decoder.unets, start=1):
                if unet.cond_on_text_encodings and unet.text_embed_dim != width:
                    raise ValueError(
                        f"U-Net {number} reads text encodings of width {unet.text_embed_dim}, the CLIP's are {width}"
                    )
            decoder.clip, decoder.clip_adapter = prior.clip, prior.clip_adapter
        self.config = dict(decoder_uses_prior_clip=decoder_uses_prior_clip)
        self.prior, self.decoder = prior, decoder

    @classmethod
    def _from_config(cls, config: dict[str, Any], **children: Any) -> DALLE2:
        return cls(prior=children["prior"], decoder=children["decoder"], **config)

    def save_pretrained(self, directory):
        """Writes ``prior/`` and ``decoder/``; a CLIP the two share is stored once, in ``prior/clip``."""
        if not self.config["decoder_uses_prior_clip"]:
            return super().save_pretrained(directory)
        # hide the decoder's reference while writing, so its folder holds no second copy of the CLIP
        clip, self.decoder.clip = self.decoder.clip, None
        try:
            return super().save_pretrained(directory)
        finally:
            self.decoder.clip = clip

    @property
    def device(self) -> torch.device:
        return self.prior.device

    @torch.no_grad()
    def forward(
        self,
        text: str | Sequence[str] | Tensor,
        *,
        cond_scale: float = 1.0,
        prior_cond_scale: float = 1.0,
        num_samples_per_batch: int = 2,
        generator: Generators = None,
        prior_sample_steps: int | None = None,
        decoder_sample_steps: int | None = None,
        return_image_embed: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Images (b, c, s, s) in [0, 1] for captions (strings, tokenized with the CLIP's tokenizer, or token ids
        (b, n) long).

        ``cond_scale``: the decoder's guidance, ``prior_cond_scale`` the prior's (both >= 1, 1 = none);
        ``num_samples_per_batch``: prior candidates per caption, the one closest to the caption kept;
        ``*_sample_steps``: DDIM steps (default: each model's ``sample_timesteps``); ``generator``: one
        torch.Generator or one per caption. With ``return_image_embed``, also the image embeddings (b, d).
        """
        check_cond_scale(cond_scale)
        check_cond_scale(prior_cond_scale)
        adapter = self.prior.clip_adapter
        ids = adapter.prepare_text(text)
        text_embed, text_encodings, text_mask = adapter.embed_text(ids)
        image_embed = self.prior.sample(
            text_embed=text_embed, text_encodings=text_encodings, text_mask=text_mask,
            num_samples_per_batch=num_samples_per_batch, cond_scale=prior_cond_scale, generator=generator,
            sample_steps=prior_sample_steps,
        )  # fmt: skip
        if self.decoder.clip_adapter is adapter or self.decoder.clip_adapter is None:
            # the text encodings are already at hand (a decoder without CLIP can only take them from us)
            text_kwargs = dict(text_encodings=text_encodings, text_mask=text_mask)
        else:
            text_kwargs = dict(text=text)  # another CLIP: the decoder tokenizes and encodes for itself
        images = self.decoder.sample(
            image_embed, cond_scale=cond_scale, generator=generator, sample_steps=decoder_sample_steps, **text_kwargs
        )
        return (images, image_embed) if return_image_embed else images
