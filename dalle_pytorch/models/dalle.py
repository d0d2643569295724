"""DALLE: an autoregressive transformer over [BOS, text tokens, image tokens] (Ramesh et al. 2021,
https://arxiv.org/abs/2102.12092).

Text positions predict text (their logits cover the text vocabulary and the per-position padding tokens);
image positions predict image codes of the frozen VAE. Generation decodes image codes one at a time with a
KV cache, with optional top-k / top-p filtering, temperature, priming and classifier-free guidance.

Shape letters: b batch, n positions, d model dim.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_pytorch.attention.pattern import AttentionPattern, normalize_attn_types
from dalle_pytorch.io.checkpoint import PretrainedMixin
from dalle_pytorch.models.sampling import Generators, filter_logits, guide, sample
from dalle_pytorch.models.transformer import DecodingCache, Transformer


@contextlib.contextmanager
def _evaluating(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class DALLE(PretrainedMixin, nn.Module):
    """Text-to-image transformer. ``vae`` is any image tokenizer with ``image_size``, ``num_tokens``,
    ``num_layers``, ``channels``, ``get_codebook_indices`` and ``decode`` (DiscreteVAE, OpenAIDiscreteVAE,
    VQGanVAE); it is frozen: DALLE sets ``requires_grad=False`` on its parameters and keeps it in eval mode.
    """

    pretrained_children = ("vae",)

    def __init__(
        self,
        *,
        dim: int,
        vae: nn.Module,
        num_text_tokens: int = 10000,
        text_seq_len: int = 256,
        depth: int,
        heads: int = 8,
        dim_head: int = 64,
        reversible: bool = False,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        sparse_attn: bool = False,
        attn_types: Sequence[str | AttentionPattern] | str | AttentionPattern | None = None,
        loss_img_weight: float = 7,
        stable: bool = False,
        sandwich_norm: bool = False,
        shift_tokens: bool = True,
        rotary_emb: bool = True,
        shared_attn_ids: Sequence | None = None,
        shared_ff_ids: Sequence | None = None,
        share_input_output_emb: bool = False,
        ff_mult: int = 4,
        conv_kernel_size: int = 5,
        conv_dilation: int = 1,
        sparse_block_size: int = 16,
        sparse_num_local_blocks: int = 4,
        sparse_num_random_blocks: int = 2,
        optimize_for_inference: bool = False,
    ):
        super().__init__()
        for name in ("image_size", "num_tokens", "num_layers", "get_codebook_indices", "decode"):
            if not hasattr(vae, name):
                raise TypeError(f"vae must be an image tokenizer with a {name!r} attribute (e.g. DiscreteVAE)")
        if num_text_tokens < 1 or text_seq_len < 1:
            raise ValueError(f"num_text_tokens and text_seq_len must be >= 1, got {num_text_tokens}, {text_seq_len}")
        if attn_types is None:
            attn_types = ("sparse",) if sparse_attn else ("full",)
        attn_types = normalize_attn_types(attn_types)  # names stay names; config.json dicts become patterns
        self.config = dict(
            dim=dim, num_text_tokens=num_text_tokens, text_seq_len=text_seq_len, depth=depth, heads=heads,
            dim_head=dim_head, reversible=reversible, attn_dropout=attn_dropout, ff_dropout=ff_dropout,
            attn_types=list(attn_types), loss_img_weight=loss_img_weight, stable=stable,
            sandwich_norm=sandwich_norm, shift_tokens=shift_tokens, rotary_emb=rotary_emb,
            shared_attn_ids=None if shared_attn_ids is None else list(shared_attn_ids),
            shared_ff_ids=None if shared_ff_ids is None else list(shared_ff_ids),
            share_input_output_emb=share_input_output_emb, ff_mult=ff_mult,
            conv_kernel_size=conv_kernel_size, conv_dilation=conv_dilation, sparse_block_size=sparse_block_size,
            sparse_num_local_blocks=sparse_num_local_blocks, sparse_num_random_blocks=sparse_num_random_blocks,
        )  # fmt: skip

        self.vae = vae.requires_grad_(False).eval()
        self.num_text_tokens, self.text_seq_len = num_text_tokens, text_seq_len
        self.num_image_tokens = vae.num_tokens
        self.image_size, self.channels = vae.image_size, getattr(vae, "channels", 3)
        self.fmap = vae.image_size // 2**vae.num_layers
        self.image_seq_len = self.fmap**2
        # every text position has its own padding token, after the real text vocabulary
        self.num_text_total = num_text_tokens + text_seq_len
        self.text_len = text_seq_len + 1  # BOS + text
        self.seq_len = text_seq_len + self.image_seq_len  # the last image token is never an input
        self.loss_img_weight, self.stable, self.rotary = loss_img_weight, stable, rotary_emb

        self.text_emb = nn.Embedding(self.num_text_total, dim)
        self.image_emb = nn.Embedding(self.num_image_tokens, dim)
        if not rotary_emb:
            self.text_pos_emb = nn.Embedding(self.text_len, dim)
            self.image_row_emb = nn.Embedding(self.fmap, dim)
            self.image_col_emb = nn.Embedding(self.fmap, dim)
        self.transformer = Transformer(
            dim=dim, depth=depth, text_len=self.text_len, fmap=self.fmap, heads=heads, dim_head=dim_head,
            attn_dropout=attn_dropout, ff_dropout=ff_dropout, ff_mult=ff_mult, attn_types=attn_types,
            reversible=reversible, stable=stable, sandwich_norm=sandwich_norm, shift_tokens=shift_tokens,
            rotary_emb=rotary_emb, shared_attn_ids=shared_attn_ids, shared_ff_ids=shared_ff_ids,
            pattern_options=dict(
                conv_kernel_size=conv_kernel_size, conv_dilation=conv_dilation, sparse_block_size=sparse_block_size,
                sparse_num_local_blocks=sparse_num_local_blocks, sparse_num_random_blocks=sparse_num_random_blocks,
            ),
        )  # fmt: skip
        self.norm_out = nn.LayerNorm(dim)
        self.share_input_output_emb = share_input_output_emb
        if not share_input_output_emb:
            self.to_text_logits = nn.Linear(dim, self.num_text_total)
            self.to_image_logits = nn.Linear(dim, self.num_image_tokens)
        self.register_buffer("text_pad_ids", torch.arange(text_seq_len) + num_text_tokens, persistent=False)

    # ----------------------------------------------------------------------------------------------------
    # helpers
    # ----------------------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> DALLE:
        super().train(mode)
        self.vae.eval()  # the tokenizer is frozen: never in training mode
        return self

    @property
    def device(self) -> torch.device:
        return self.text_emb.weight.device

    def _prepare_text(self, text: Tensor, mask: Tensor | None, truncate_text: bool = False) -> Tensor:
        """Validate text (b, <= text_seq_len) long and return (b, text_seq_len) with padding ids filled in."""
        if not torch.is_tensor(text) or text.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"text must be a tensor of integer token ids, got {getattr(text, 'dtype', type(text))}")
        if text.ndim != 2:
            raise ValueError(f"text must have shape (batch, text_seq_len), got {tuple(text.shape)}")
        if text.shape[1] > self.text_seq_len:
            if not truncate_text:
                raise ValueError(
                    f"text has {text.shape[1]} tokens, more than text_seq_len={self.text_seq_len}; "
                    "pass truncate_text=True to cut it"
                )
            text = text[:, : self.text_seq_len]
            mask = mask[:, : self.text_seq_len] if mask is not None else None
        if text.numel() and (text.min() < 0 or text.max() >= self.num_text_tokens):
            raise ValueError(f"text token ids must be in [0, {self.num_text_tokens}), got [{text.min()}, {text.max()}]")
        text = text.long().to(self.device)
        pad = self.text_seq_len - text.shape[1]
        is_padding = text == 0
        if mask is not None:
            if mask.shape != text.shape:
                raise ValueError(f"mask must have the shape of text {tuple(text.shape)}, got {tuple(mask.shape)}")
            is_padding = is_padding | ~mask.to(device=text.device, dtype=torch.bool)
        text = F.pad(text, (0, pad))
        is_padding = F.pad(is_padding, (0, pad), value=True)
        return torch.where(is_padding, self.text_pad_ids, text)

    def _image_tokens(self, image: Tensor) -> Tensor:
        """Raw pixels (b, c, H, W) or codes (b, image_seq_len) -> codes (b, image_seq_len) long."""
        if not torch.is_tensor(image):
            raise TypeError(f"image must be a tensor, got {type(image).__name__}")
        if image.is_floating_point():
            expected = (self.channels, self.image_size, self.image_size)
            if image.ndim != 4 or tuple(image.shape[1:]) != expected:
                raise ValueError(
                    f"image must have shape (batch, {', '.join(map(str, expected))}), got {tuple(image.shape)}"
                )
            return self.vae.get_codebook_indices(image.to(self.device)).long()
        if image.ndim != 2 or image.shape[1] != self.image_seq_len:
            raise ValueError(f"image token ids must have shape (batch, {self.image_seq_len}), got {tuple(image.shape)}")
        if image.numel() and (image.min() < 0 or image.max() >= self.num_image_tokens):
            raise ValueError(
                f"image token ids must be in [0, {self.num_image_tokens}), got [{image.min()}, {image.max()}]"
            )
        return image.long().to(self.device)

    def _embed_text(self, text_ids: Tensor) -> Tensor:
        """Padded text ids (b, t) -> embeddings of [BOS, text] (b, t + 1, d)."""
        tokens = F.pad(text_ids, (1, 0), value=0)  # id 0 never occurs as text, so it serves as BOS
        x = self.text_emb(tokens)
        if not self.rotary:
            x = x + self.text_pos_emb(torch.arange(tokens.shape[1], device=x.device))
        return x

    def _embed_image(self, codes: Tensor, start: int = 0) -> Tensor:
        """Image codes (b, k) at grid indices [start, start + k) -> (b, k, d)."""
        x = self.image_emb(codes)
        if not self.rotary:
            grid = torch.arange(start, start + codes.shape[1], device=x.device)
            x = x + self.image_row_emb(grid // self.fmap) + self.image_col_emb(grid % self.fmap)
        return x

    def _shrink_grad(self, x: Tensor) -> Tensor:
        # CogView: scale the gradient reaching the embeddings by 0.1, leaving values unchanged
        return x * 0.1 + x.detach() * 0.9 if self.stable else x

    def _hidden(self, h: Tensor) -> Tensor:
        if self.stable:
            h = h / h.amax(dim=-1, keepdim=True).detach()  # CogView's divide-by-max before the logits
        return self.norm_out(h)

    def _text_logits(self, h: Tensor) -> Tensor:
        h = self._hidden(h)
        return h @ self.text_emb.weight.t() if self.share_input_output_emb else self.to_text_logits(h)

    def _image_logits(self, h: Tensor) -> Tensor:
        h = self._hidden(h)
        return h @ self.image_emb.weight.t() if self.share_input_output_emb else self.to_image_logits(h)

    def _null_text(self, batch: int) -> Tensor:
        return self.text_pad_ids.expand(batch, -1)

    # ----------------------------------------------------------------------------------------------------
    # training
    # ----------------------------------------------------------------------------------------------------

    def forward(
        self,
        text: Tensor,
        image: Tensor | None = None,
        mask: Tensor | None = None,
        return_loss: bool = False,
        null_cond_prob: float = 0.0,
    ):
        """text (b, <= text_seq_len) long, 0 = padding; image: pixels (b, c, H, W) or codes (b, image_seq_len).

        Returns the loss ``(text CE + loss_img_weight * image CE) / (loss_img_weight + 1)`` with
        ``return_loss``, else logits (b, n, num_text_tokens + text_seq_len + num_image_tokens) with -inf where
        a position may not predict a token (text positions predict text, image positions image codes).
        """
        if not 0.0 <= null_cond_prob <= 1.0:
            raise ValueError(f"null_cond_prob must be in [0, 1], got {null_cond_prob}")
        text_ids = self._prepare_text(text, mask)
        batch = text_ids.shape[0]
        if null_cond_prob > 0:
            drop = torch.rand(batch, device=text_ids.device) < null_cond_prob
            text_ids = torch.where(drop[:, None], self._null_text(batch), text_ids)
        x = self._embed_text(text_ids)
        codes = None
        if image is not None:
            codes = self._image_tokens(image)
            if codes.shape[0] != batch:
                raise ValueError(f"text and image batch sizes differ: {batch} vs {codes.shape[0]}")
            x = torch.cat((x, self._embed_image(codes[:, :-1])), dim=1)
        elif return_loss:
            raise ValueError("return_loss=True needs an image")

        h = self.transformer(self._shrink_grad(x))  # (b, n, d)
        text_logits = self._text_logits(h[:, : self.text_seq_len])
        image_logits = self._image_logits(h[:, self.text_seq_len :]) if codes is not None else None

        if not return_loss:
            return self._full_logits(text_logits, image_logits)
        # (b * n, vocab) rows: the layout the loss kernel reads fastest
        loss_text = F.cross_entropy(text_logits.flatten(0, 1), text_ids.flatten())
        loss_image = F.cross_entropy(image_logits.flatten(0, 1), codes.flatten())
        return (loss_text + self.loss_img_weight * loss_image) / (self.loss_img_weight + 1)

    def _full_logits(self, text_logits: Tensor, image_logits: Tensor | None) -> Tensor:
        text_part = F.pad(text_logits, (0, self.num_image_tokens), value=float("-inf"))
        if image_logits is None:
            return text_part
        image_part = F.pad(image_logits, (self.num_text_total, 0), value=float("-inf"))
        return torch.cat((text_part, image_part), dim=1)

    # ----------------------------------------------------------------------------------------------------
    # generation
    # ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_images(
        self,
        text: Tensor,
        *,
        mask: Tensor | None = None,
        clip: nn.Module | None = None,
        filter_thres: float = 0.5,
        top_p: float | None = None,
        temperature: float = 1.0,
        cond_scale: float = 1.0,
        img: Tensor | None = None,
        num_init_img_tokens: int | None = None,
        use_cache: bool = True,
        generator: Generators = None,
        truncate_text: bool = False,
    ):
        """Sample images (b, c, H, W) for text (b, <= text_seq_len), in the VAE's output range.

        ``filter_thres``: fraction of the image vocabulary dropped by top-k; ``top_p``: nucleus filtering;
        ``cond_scale``: classifier-free guidance (1 = off); ``img``: prime with the first
        ``num_init_img_tokens`` codes of these images (default 14/32 of them); ``generator``: one
        ``torch.Generator`` or a list with one per sample. With ``clip``, returns ``(images, scores)``, the
        scores (b,) being CLIP similarities of each image to its text.
        """
        codes = self.generate_image_codes(
            text, mask=mask, filter_thres=filter_thres, top_p=top_p, temperature=temperature,
            cond_scale=cond_scale, img=img, num_init_img_tokens=num_init_img_tokens, use_cache=use_cache,
            generator=generator, truncate_text=truncate_text,
        )  # fmt: skip
        images = self.vae.decode(codes)
        if clip is None:
            return images
        clip_text = text[:, : self.text_seq_len] if truncate_text else text
        clip_mask = mask[:, : clip_text.shape[1]] if mask is not None else None
        with _evaluating(clip):
            scores = clip(clip_text.to(images.device), images, text_mask=clip_mask)
        return images, scores

    @torch.no_grad()
    def generate_image_codes(
        self,
        text: Tensor,
        *,
        mask: Tensor | None = None,
        filter_thres: float = 0.5,
        top_p: float | None = None,
        temperature: float = 1.0,
        cond_scale: float = 1.0,
        img: Tensor | None = None,
        num_init_img_tokens: int | None = None,
        use_cache: bool = True,
        generator: Generators = None,
        truncate_text: bool = False,
        step_logits: list | None = None,
    ) -> Tensor:
        """Like :meth:`generate_images` but returns the image codes (b, image_seq_len) long.

        When ``step_logits`` is a list, the (guided) image logits used at every step are appended to it.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        text_ids = self._prepare_text(text, mask, truncate_text)
        batch = text_ids.shape[0]
        guided = cond_scale != 1.0
        codes = torch.empty(batch, 0, dtype=torch.long, device=self.device)
        if img is not None:
            prime = self._image_tokens(img)
            if prime.shape[0] not in (1, batch):
                raise ValueError(f"img batch size must be 1 or {batch}, got {prime.shape[0]}")
            if num_init_img_tokens is None:
                num_init_img_tokens = int(0.4375 * self.image_seq_len)
            if not 0 <= num_init_img_tokens < self.image_seq_len:
                raise ValueError(f"num_init_img_tokens must be in [0, {self.image_seq_len}), got {num_init_img_tokens}")
            codes = prime[:, :num_init_img_tokens].expand(batch, -1)
        if isinstance(generator, Sequence) and len(generator) != batch:
            raise ValueError(f"generator list has {len(generator)} generators for a batch of {batch}")

        # guidance runs the conditional and the null-text branch as one batch: rows [cond; null]
        branch_text = torch.cat((text_ids, self._null_text(batch))) if guided else text_ids
        with _evaluating(self):
            cache = DecodingCache(self.seq_len) if use_cache else None
            x = torch.cat((self._embed_text(branch_text), self._embed_branches(codes, 0, guided)), dim=1)
            h = self.transformer(x, cache)
            while True:
                logits = self._image_logits(h[:, -1])  # (b or 2b, num_image_tokens)
                if guided:
                    logits = guide(logits[:batch], logits[batch:], cond_scale)
                if step_logits is not None:
                    step_logits.append(logits.clone())
                logits = filter_logits(logits / temperature, filter_thres=filter_thres, top_p=top_p)
                new = sample(logits, 1.0, generator)[:, None]  # (b, 1)
                codes = torch.cat((codes, new), dim=1)
                if codes.shape[1] == self.image_seq_len:
                    return codes
                if use_cache:
                    h = self.transformer(self._embed_branches(new, codes.shape[1] - 1, guided), cache)
                else:
                    x = torch.cat((self._embed_text(branch_text), self._embed_branches(codes, 0, guided)), dim=1)
                    h = self.transformer(x)

    def _embed_branches(self, codes: Tensor, start: int, guided: bool) -> Tensor:
        x = self._embed_image(codes, start)
        return torch.cat((x, x)) if guided else x

    @torch.no_grad()
    def generate_texts(
        self,
        tokenizer,
        text: str | None = None,
        *,
        filter_thres: float = 0.5,
        temperature: float = 1.0,
        generator: Generators = None,
    ) -> tuple[Tensor, list[str]]:
        """Complete ``text`` (or sample from nothing) up to text_seq_len tokens.

        ``tokenizer`` has ``encode(str) -> list[int]`` and ``decode(ids) -> str``. Returns
        ``(token_ids (1, text_seq_len) long with 0 for padding, [decoded text])``.
        """
        prompt = list(tokenizer.encode(text)) if text else []
        if len(prompt) > self.text_seq_len:
            raise ValueError(f"text encodes to {len(prompt)} tokens, more than text_seq_len={self.text_seq_len}")
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device).reshape(1, len(prompt))
        ids = self._prepare_text(ids, None)[:, : len(prompt)]
        with _evaluating(self):
            cache = DecodingCache(self.seq_len)
            h = self.transformer(self._embed_text(ids), cache)
            while ids.shape[1] < self.text_seq_len:
                logits = filter_logits(self._text_logits(h[:, -1]) / temperature, filter_thres=filter_thres)
                new = sample(logits, 1.0, generator)[:, None]
                position = ids.shape[1]
                # any padding token becomes the padding token of this position, as in training data
                new = torch.where(new >= self.num_text_tokens, self.text_pad_ids[position], new)
                ids = torch.cat((ids, new), dim=1)
                h = self.transformer(self.text_emb(new) + self._text_position(position + 1), cache)
        token_ids = torch.where(ids >= self.num_text_tokens, 0, ids)
        real = [int(t) for t in token_ids[0] if t != 0]
        return token_ids, [tokenizer.decode(real)]

    def _text_position(self, position: int) -> Tensor | float:
        if self.rotary:
            return 0.0
        return self.text_pos_emb.weight[position]
