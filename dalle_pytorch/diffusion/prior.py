"""The diffusion prior of unCLIP (Ramesh et al. 2022, https://arxiv.org/abs/2204.06125, section 2.1): a
Gaussian diffusion model over CLIP image embeddings, conditioned on the caption's CLIP text embedding and
text encodings.

``DiffusionPriorNetwork`` is the paper's decoder-only transformer: a causal sequence of [a null token, the
text encodings, the text embedding, the timestep embedding, the noised image embedding, a learned query],
whose output at the query predicts the clean image embedding directly (x0, trained with a mean-squared
error, as the paper does). No positional embedding is added: the CLIP text encodings carry their own and
the last four tokens come from distinct projections in a fixed causal order.

``DiffusionPrior`` owns the noise schedule, the frozen CLIP (through an adapter, see ``clip_adapter``) and
classifier-free guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598): in training the text
condition of a row is dropped with probability ``cond_drop_prob`` (its text embedding replaced by a learned
null embedding and its text encodings hidden), so one network is both the conditional and the unconditional
model. Sampling draws several candidate embeddings per text and keeps the one closest to the text
embedding (section 2.1's trick of sampling two and ranking by the dot product with the text embedding).

Shape letters: b batch, n text positions, d model dim, h heads, i/j query/key positions.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from dalle_pytorch.diffusion.clip_adapter import BaseClipAdapter, as_clip_adapter
from dalle_pytorch.diffusion.samplers import check_cond_scale, guided_forward, randn, sample_loop
from dalle_pytorch.diffusion.schedule import SCHEDULE_KINDS, NoiseSchedule
from dalle_pytorch.diffusion.unet_blocks import TimestepEmbedding
from dalle_pytorch.io.checkpoint import PretrainedMixin
from dalle_pytorch.models.sampling import Generators


class CausalBlock(nn.Module):
    """A pre-norm transformer block: masked self-attention then a feed-forward, each added to x (b, n, d)."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int, attn_dropout: float, ff_dropout: float):
        super().__init__()
        self.heads, self.attn_dropout = heads, attn_dropout
        self.norm_attn = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, dim * ff_mult), nn.GELU(), nn.Dropout(ff_dropout), nn.Linear(dim * ff_mult, dim)
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """mask (b, 1, i, j) bool: True where query i may attend to key j."""
        qkv = rearrange(self.to_qkv(self.norm_attn(x)), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        dropout = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask, dropout_p=dropout)
        x = x + self.to_out(rearrange(out, "b h n d -> b n (h d)"))
        return x + self.ff(self.norm_ff(x))


class DiffusionPriorNetwork(PretrainedMixin, nn.Module):
    """The prior's denoiser: (noised image embedding, timestep, text condition) -> clean image embedding.

    ``image_embed_dim`` (the CLIP latent width) and ``text_encoding_dim`` (the width of the CLIP's per-token
    text features) default to ``dim``; other widths are projected in and out.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        dim_head: int = 64,
        heads: int = 8,
        *,
        ff_mult: int = 4,
        image_embed_dim: int | None = None,
        text_encoding_dim: int | None = None,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
    ):
        super().__init__()
        image_embed_dim = dim if image_embed_dim is None else image_embed_dim
        text_encoding_dim = dim if text_encoding_dim is None else text_encoding_dim
        sizes = dict(dim=dim, depth=depth, dim_head=dim_head, heads=heads, ff_mult=ff_mult,
                     image_embed_dim=image_embed_dim, text_encoding_dim=text_encoding_dim)  # fmt: skip
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.config = dict(sizes, attn_dropout=attn_dropout, ff_dropout=ff_dropout)
        self.image_embed_dim, self.text_encoding_dim = image_embed_dim, text_encoding_dim

        def project(width: int) -> nn.Module:
            return nn.Identity() if width == dim else nn.Linear(width, dim)

        self.to_text_embed = project(image_embed_dim)
        self.to_image_embed = project(image_embed_dim)
        self.to_text_encodings = project(text_encoding_dim)
        self.time_embed = TimestepEmbedding(dim, dim)
        self.null_token = nn.Parameter(torch.randn(dim) * 0.02)  # always visible: no row attends to nothing
        self.null_text_embed = nn.Parameter(torch.randn(dim) * 0.02)
        self.query = nn.Parameter(torch.randn(dim) * 0.02)
        self.blocks = nn.ModuleList(
            CausalBlock(dim, heads, dim_head, ff_mult, attn_dropout, ff_dropout) for _ in range(depth)
        )
        self.norm_out = nn.LayerNorm(dim)
        self.to_out = nn.Linear(dim, image_embed_dim)

    def forward(
        self,
        image_embed: Tensor,
        t: Tensor,
        *,
        text_embed: Tensor,
        text_encodings: Tensor | None = None,
        text_mask: Tensor | None = None,
        cond_drop: Tensor | None = None,
    ) -> Tensor:
        """image_embed (b, image_embed_dim) noised at timesteps t (b,) long; text_embed (b, image_embed_dim);
        text_encodings (b, n, text_encoding_dim) with text_mask (b, n) bool (True = real token); cond_drop
        (b,) bool: rows whose text condition is replaced by the null condition. Returns x0 (b, image_embed_dim).
        """
        b = image_embed.shape[0]
        for name, value in (("image_embed", image_embed), ("text_embed", text_embed)):
            if value.ndim != 2 or value.shape != (b, self.image_embed_dim):
                raise ValueError(f"{name} must have shape ({b}, {self.image_embed_dim}), got {tuple(value.shape)}")
        keep = torch.ones(b, dtype=torch.bool, device=image_embed.device) if cond_drop is None else ~cond_drop.bool()
        if text_encodings is None:
            encodings = image_embed.new_zeros(b, 0, self.null_token.shape[0])
            enc_mask = torch.zeros(b, 0, dtype=torch.bool, device=image_embed.device)
        else:
            if (
                text_encodings.ndim != 3
                or text_encodings.shape[0] != b
                or text_encodings.shape[2] != self.text_encoding_dim
            ):
                expected = f"({b}, n, {self.text_encoding_dim})"
                raise ValueError(f"text_encodings must have shape {expected}, got {tuple(text_encodings.shape)}")
            encodings = self.to_text_encodings(text_encodings)
            enc_mask = torch.ones(encodings.shape[:2], dtype=torch.bool, device=encodings.device)
            if text_mask is not None:
                if text_mask.shape != enc_mask.shape:
                    raise ValueError(f"text_mask must have shape {tuple(enc_mask.shape)}, got {tuple(text_mask.shape)}")
                enc_mask = text_mask.bool()
            enc_mask = enc_mask & keep[:, None]  # dropped rows see none of their text
        text_token = torch.where(keep[:, None], self.to_text_embed(text_embed), self.null_text_embed)
        tail = torch.stack(
            (text_token, self.time_embed(t), self.to_image_embed(image_embed), self.query.expand(b, -1)), dim=1
        )  # (b, 4, d)
        x = torch.cat((self.null_token.expand(b, 1, -1), encodings, tail), dim=1)  # (b, n + 5, d)
        visible = torch.cat((keep.new_ones(b, 1), enc_mask, keep.new_ones(b, 4)), dim=1)  # (b, j)
        n = x.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        mask = causal[None, None] & visible[:, None, None, :]  # (b, 1, i, j)
        for block in self.blocks:
            x = block(x, mask)
        return self.to_out(self.norm_out(x[:, -1]))


class DiffusionPrior(PretrainedMixin, nn.Module):
    """Text -> CLIP image embedding by diffusion. ``clip``: our ``CLIP`` or a ``BaseClipAdapter`` (frozen),
    or None when training from precomputed embeddings (then ``image_embed_dim`` is required).

    ``timesteps``: length of the noise schedule (``beta_schedule`` "cosine" or "linear");
    ``sample_timesteps``: default DDIM steps for sampling (None = DDPM over every timestep);
    ``cond_drop_prob``: probability of dropping a row's text condition in training;
    ``image_embed_scale``: embeddings are multiplied by it for diffusion (default sqrt(image_embed_dim), so a
    unit-norm CLIP embedding has entries of about unit variance, like the noise).
    """

    pretrained_children = ("net", "clip")

    def __init__(
        self,
        net: DiffusionPriorNetwork,
        clip: nn.Module | BaseClipAdapter | None = None,
        *,
        image_embed_dim: int | None = None,
        timesteps: int = 1000,
        sample_timesteps: int | None = None,
        cond_drop_prob: float = 0.2,
        beta_schedule: str = "cosine",
        condition_on_text_encodings: bool = True,
        image_embed_scale: float | None = None,
    ):
        super().__init__()
        if not isinstance(net, DiffusionPriorNetwork):
            raise TypeError(f"net must be a DiffusionPriorNetwork, got {type(net).__name__}")
        adapter = as_clip_adapter(clip) if clip is not None else None
        if adapter is not None:
            if image_embed_dim is not None and image_embed_dim != adapter.dim_latent:
                raise ValueError(f"image_embed_dim={image_embed_dim} differs from the CLIP's {adapter.dim_latent}")
            image_embed_dim = adapter.dim_latent
            if condition_on_text_encodings and net.text_encoding_dim != adapter.text_encoding_dim:
                raise ValueError(
                    f"the CLIP's text encodings have width {adapter.text_encoding_dim}, the network reads "
                    f"{net.text_encoding_dim}: build it with text_encoding_dim={adapter.text_encoding_dim}"
                )
        if image_embed_dim is None:
            raise ValueError("without a clip, give image_embed_dim (the width of the CLIP embeddings)")
        if net.image_embed_dim != image_embed_dim:
            raise ValueError(
                f"the image embeddings have width {image_embed_dim}, the network reads {net.image_embed_dim}: "
                f"build it with image_embed_dim={image_embed_dim} (or dim={image_embed_dim})"
            )
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob!r}")
        if beta_schedule not in SCHEDULE_KINDS:
            raise ValueError(f"beta_schedule must be one of {SCHEDULE_KINDS}, got {beta_schedule!r}")
        if sample_timesteps is not None and not 1 <= sample_timesteps <= timesteps:
            raise ValueError(f"sample_timesteps must be in [1, {timesteps}] or None, got {sample_timesteps!r}")
        self.config = dict(
            image_embed_dim=image_embed_dim, timesteps=timesteps, sample_timesteps=sample_timesteps,
            cond_drop_prob=cond_drop_prob, beta_schedule=beta_schedule,
            condition_on_text_encodings=condition_on_text_encodings, image_embed_scale=image_embed_scale,
        )  # fmt: skip
        self.net = net
        # the adapter is a plain object: the CLIP module is registered (and saved) once, as `clip`
        self.clip = adapter.clip.requires_grad_(False).eval() if adapter is not None else None
        self.clip_adapter = adapter
        self.image_embed_dim = image_embed_dim
        self.image_embed_scale = image_embed_scale if image_embed_scale is not None else math.sqrt(image_embed_dim)
        self.schedule = NoiseSchedule(timesteps, beta_schedule)
        self.sample_timesteps, self.cond_drop_prob = sample_timesteps, cond_drop_prob
        self.condition_on_text_encodings = condition_on_text_encodings

    @classmethod
    def _from_config(cls, config: dict[str, Any], **children: Any) -> DiffusionPrior:
        return cls(children.pop("net"), children.pop("clip", None), **config)

    def train(self, mode: bool = True) -> DiffusionPrior:
        super().train(mode)
        if self.clip is not None:
            self.clip.eval()  # frozen: never in training mode
        return self

    @property
    def device(self) -> torch.device:
        return self.net.to_out.weight.device

    # ------------------------------------------------------------------------------------------ conditions

    def _require_clip(self, what: str) -> BaseClipAdapter:
        if self.clip_adapter is None:
            raise ValueError(f"this DiffusionPrior has no clip: pass {what}, or build it with clip=...")
        return self.clip_adapter

    @torch.no_grad()
    def embed_text(self, text: str | list[str] | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Strings or token ids -> the frozen CLIP's (text_embed (b, d), text_encodings (b, n, e), mask (b, n))."""
        adapter = self._require_clip("text_embed (and text_encodings)")
        return tuple(adapter.embed_text(adapter.prepare_text(text)))

    @torch.no_grad()
    def embed_image(self, images: Tensor) -> Tensor:
        """images (b, c, H, W) -> the frozen CLIP's unit-norm image embeddings (b, d)."""
        return self._require_clip("image_embed").embed_image(images.to(self.device))

    def _text_conditions(
        self,
        text: Any,
        text_embed: Tensor | None,
        text_encodings: Tensor | None,
        text_mask: Tensor | None,
    ) -> dict[str, Tensor | None]:
        if text is not None:
            if text_embed is not None or text_encodings is not None:
                raise ValueError("give text, or text_embed (and text_encodings), not both")
            text_embed, text_encodings, text_mask = self.embed_text(text)
        if text_embed is None:
            raise ValueError("the prior needs text (strings or token ids) or text_embed")
        self._check_embed("text_embed", text_embed)
        if not self.condition_on_text_encodings:
            text_encodings, text_mask = None, None
        elif text_encodings is None:
            raise ValueError("this prior conditions on text encodings: pass text or text_encodings with text_embed")
        move = lambda x: None if x is None else x.to(self.device)
        return dict(text_embed=move(text_embed), text_encodings=move(text_encodings), text_mask=move(text_mask))

    def _check_embed(self, name: str, embed: Tensor) -> None:
        if not torch.is_tensor(embed) or embed.ndim != 2 or embed.shape[1] != self.image_embed_dim:
            raise ValueError(
                f"{name} must have shape (batch, {self.image_embed_dim}), got {tuple(getattr(embed, 'shape', ()))}"
            )

    # ------------------------------------------------------------------------------------------ training

    def forward(
        self,
        text: Any = None,
        images: Tensor | None = None,
        *,
        text_embed: Tensor | None = None,
        image_embed: Tensor | None = None,
        text_encodings: Tensor | None = None,
        text_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The training loss (a scalar) for captions and their images, or precomputed CLIP embeddings.

        text: strings or token ids (b, n); images (b, c, H, W) as the CLIP reads them. Or ``text_embed``
        (b, d) with ``text_encodings`` (b, n, e) and ``text_mask`` (b, n), and ``image_embed`` (b, d).
        ``generator`` draws the timesteps, the noise and the dropped conditions.
        """
        conditions = self._text_conditions(text, text_embed, text_encodings, text_mask)
        if images is not None:
            if image_embed is not None:
                raise ValueError("give images or image_embed, not both")
            image_embed = self.embed_image(images)
        if image_embed is None:
            raise ValueError("the prior needs images or image_embed")
        self._check_embed("image_embed", image_embed)
        b = image_embed.shape[0]
        if conditions["text_embed"].shape[0] != b:
            raise ValueError(f"text has batch {conditions['text_embed'].shape[0]}, the images {b}")
        x0 = image_embed.to(self.device) * self.image_embed_scale
        t = self.schedule.random_timesteps(b, self.device, generator)
        noise = randn(x0.shape, generator, self.device, x0.dtype)
        g_device = generator.device if generator is not None else "cpu"
        cond_drop = torch.rand(b, generator=generator, device=g_device).to(self.device) < self.cond_drop_prob
        pred = self.net(self.schedule.q_sample(x0, t, noise), t, cond_drop=cond_drop, **conditions)
        return self.loss(pred, x0)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Mean-squared error between the predicted and the true clean (scaled) embedding; override to change."""
        return F.mse_loss(pred, target)

    # ------------------------------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(
        self,
        text: Any = None,
        *,
        text_embed: Tensor | None = None,
        text_encodings: Tensor | None = None,
        text_mask: Tensor | None = None,
        num_samples_per_batch: int = 2,
        cond_scale: float = 1.0,
        generator: Generators = None,
        sample_steps: int | None = None,
        eta: float = 0.0,
    ) -> Tensor:
        """Unit-norm image embeddings (b, d) for text (strings or token ids) or a precomputed text condition.

        ``num_samples_per_batch`` candidates are drawn per text and the one most similar to the text embedding
        is kept. ``cond_scale`` >= 1: classifier-free guidance (1 = none). ``sample_steps``: DDIM steps
        (default ``sample_timesteps``; None = DDPM over every timestep). ``generator``: one torch.Generator
        or one per text (each text's candidates then come from its own generator only).
        """
        check_cond_scale(cond_scale)
        if isinstance(num_samples_per_batch, bool) or not isinstance(num_samples_per_batch, int):
            raise ValueError(f"num_samples_per_batch must be a positive int, got {num_samples_per_batch!r}")
        if num_samples_per_batch < 1:
            raise ValueError(f"num_samples_per_batch must be a positive int, got {num_samples_per_batch!r}")
        conditions = self._text_conditions(text, text_embed, text_encodings, text_mask)
        b, k = conditions["text_embed"].shape[0], num_samples_per_batch
        if generator is not None and not isinstance(generator, torch.Generator):
            generator = list(generator)
            if len(generator) != b:
                raise ValueError(f"generator list has {len(generator)} generators for a batch of {b}")
            generator = [g for g in generator for _ in range(k)]  # candidates of text i draw from generator i
        repeated = {
            name: None if value is None else value.repeat_interleave(k, dim=0) for name, value in conditions.items()
        }
        was_training = self.training
        self.eval()
        try:
            model_fn = lambda x, t: guided_forward(self.net, x, t, cond_scale, **repeated)
            steps = sample_steps if sample_steps is not None else self.sample_timesteps
            x = sample_loop(model_fn, (b * k, self.image_embed_dim), self.schedule, sample_steps=steps, eta=eta,
                            generator=generator, device=self.device)  # fmt: skip
        finally:
            self.train(was_training)
        candidates = rearrange(F.normalize(x, dim=-1), "(b k) d -> b k d", k=k)
        return rank_candidates(candidates, conditions["text_embed"])


def rank_candidates(candidates: Tensor, text_embed: Tensor) -> Tensor:
    """candidates (b, k, d), text_embed (b, d) -> (b, d): each text's candidate of highest cosine similarity."""
    similarity = torch.einsum("bkd,bd->bk", F.normalize(candidates, dim=-1), F.normalize(text_embed, dim=-1))
    best = similarity.argmax(dim=1)  # (b,)
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), best]
