"""DALLE: an autoregressive transformer over [BOS, text tokens, image tokens] (Ramesh et al. 2021,
https://arxiv.org/abs/2102.12092).

Text positions predict text (their logits cover the text vocabulary and the per-position padding tokens);
image positions predict image codes of the frozen VAE. The options are :class:`DALLEConfig`; the loss is the
overridable :meth:`DALLE.loss`; the transformer comes from :meth:`DALLE.build_transformer`. Generation (KV
cache, top-k / top-p, temperature, priming, classifier-free guidance) is in
:mod:`dalle_pytorch.models.generation`.

Shape letters: b batch, n positions, d model dim.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_pytorch.io.checkpoint import PretrainedMixin
from dalle_pytorch.models.dalle_config import DEPRECATED_ARGUMENTS, DALLEConfig
from dalle_pytorch.models.generation import GenerationMixin
from dalle_pytorch.models.options import collect_options, options_signature
from dalle_pytorch.models.transformer import Transformer


class DALLEOutput(NamedTuple):
    """What ``DALLE.forward(..., return_outputs=True)`` returns.

    - ``text_logits`` (b, text_seq_len, num_text_tokens + text_seq_len): position i predicts text token i
      (BOS predicts the first); the last ``text_seq_len`` columns are the per-position padding tokens.
    - ``image_logits`` (b, image_seq_len, num_image_tokens): position j predicts image code j (the last text
      position predicts the first code). None without an image.
    - ``text_targets`` (b, text_seq_len) long in [0, num_text_tokens + text_seq_len): the text the model
      was given, padding as its per-position ids, and all padding for captions dropped by
      ``null_cond_prob``.
    - ``image_targets`` (b, image_seq_len) long in [0, num_image_tokens): the image codes. None without
      an image.
    - ``loss``: ``DALLE.loss`` of the above with ``return_loss=True``, else None.
    """

    text_logits: Tensor
    image_logits: Tensor | None
    text_targets: Tensor
    image_targets: Tensor | None
    loss: Tensor | None = None


class DALLE(GenerationMixin, PretrainedMixin, nn.Module):
    """Text-to-image transformer. ``vae`` is any image tokenizer with ``image_size``, ``num_tokens``,
    ``num_layers``, ``channels``, ``get_codebook_indices`` and ``decode`` (DiscreteVAE, OpenAIDiscreteVAE,
    VQGanVAE); it is frozen: DALLE sets ``requires_grad=False`` on its parameters and keeps it in eval mode.
    """

    pretrained_children = ("vae",)
    config_class = DALLEConfig
    #: the transformer :meth:`build_transformer` makes; a subclass may set its own (same constructor keywords,
    #: ``forward(x (b, n, d), cache=None) -> (b, n, d)``)
    transformer_class: type[nn.Module] = Transformer

    @options_signature(DALLEConfig)
    def __init__(self, *, vae: nn.Module, config: DALLEConfig | None = None, **kwargs: Any):
        """Keyword arguments: the fields of :class:`DALLEConfig` (or a whole ``config``, which they override)."""
        super().__init__()
        for name in ("image_size", "num_tokens", "num_layers", "get_codebook_indices", "decode"):
            if not hasattr(vae, name):
                raise TypeError(f"vae must be an image tokenizer with a {name!r} attribute (e.g. DiscreteVAE)")
        owner = type(self).__name__
        cfg = collect_options(self.config_class, config, kwargs, owner=owner, deprecated=DEPRECATED_ARGUMENTS)
        self.dalle_config = cfg
        self.config = cfg.to_dict()
        dim, text_seq_len, num_text_tokens = cfg.dim, cfg.text_seq_len, cfg.num_text_tokens

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
        self.loss_img_weight, self.stable, self.rotary = cfg.loss_img_weight, cfg.stable, cfg.rotary_emb

        self.text_emb = nn.Embedding(self.num_text_total, dim)
        self.image_emb = nn.Embedding(self.num_image_tokens, dim)
        if not cfg.rotary_emb:
            self.text_pos_emb = nn.Embedding(self.text_len, dim)
            self.image_row_emb = nn.Embedding(self.fmap, dim)
            self.image_col_emb = nn.Embedding(self.fmap, dim)
        self.transformer = self.build_transformer(cfg)
        self.norm_out = nn.LayerNorm(dim)
        self.share_input_output_emb = cfg.share_input_output_emb
        if not cfg.share_input_output_emb:
            self.to_text_logits = nn.Linear(dim, self.num_text_total)
            self.to_image_logits = nn.Linear(dim, self.num_image_tokens)
        self.register_buffer("text_pad_ids", torch.arange(text_seq_len) + num_text_tokens, persistent=False)

    def build_transformer(self, config: DALLEConfig) -> nn.Module:
        """The transformer over [BOS, text, image]: ``transformer_class`` built from ``config``. Override to
        build another (it is called once, from ``__init__``, after the embeddings exist)."""
        return self.transformer_class(
            dim=config.dim, depth=config.depth, text_len=self.text_len, fmap=self.fmap, heads=config.heads,
            dim_head=config.dim_head, attn_dropout=config.attn_dropout, ff_dropout=config.ff_dropout,
            ff_mult=config.ff_mult, attn_types=config.attn_types, reversible=config.reversible, stable=config.stable,
            sandwich_norm=config.sandwich_norm, shift_tokens=config.shift_tokens, rotary_emb=config.rotary_emb,
            shift_tokens_style=config.shift_tokens_style, rotary_emb_style=config.rotary_emb_style,
            shared_attn_ids=config.shared_attn_ids, shared_ff_ids=config.shared_ff_ids,
            pattern_options=config.pattern_options(),
        )  # fmt: skip

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
        return_outputs: bool = False,
    ) -> Tensor | DALLEOutput:
        """text (b, <= text_seq_len) long, 0 = padding; image: pixels (b, c, H, W) or codes (b, image_seq_len).

        With ``return_loss``: the loss :meth:`loss` computes from the logits and targets. With
        ``return_outputs``: a :class:`DALLEOutput` of logits and targets (and the loss with ``return_loss``).
        Otherwise logits (b, n, num_text_tokens + text_seq_len + num_image_tokens) with -inf where a position
        may not predict a token (text positions predict text, image positions image codes).
        ``null_cond_prob``: each caption is replaced by padding with this probability (in the targets too),
        for classifier-free guidance.
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
        loss = self.loss(text_logits, image_logits, text_ids, codes) if return_loss else None
        if return_outputs:
            return DALLEOutput(text_logits, image_logits, text_ids, codes, loss)
        return loss if return_loss else self._full_logits(text_logits, image_logits)

    def loss(self, text_logits: Tensor, image_logits: Tensor, text_targets: Tensor, image_targets: Tensor) -> Tensor:
        """The training loss ``(text CE + loss_img_weight * image CE) / (loss_img_weight + 1)``, each CE the
        mean over positions. Override it for another loss; the arguments are those of :class:`DALLEOutput`:
        text_logits (b, text_seq_len, num_text_tokens + text_seq_len), image_logits (b, image_seq_len,
        num_image_tokens), text_targets (b, text_seq_len) and image_targets (b, image_seq_len) long.
        """
        # (b * n, vocab) rows: the layout the loss kernel reads fastest
        loss_text = F.cross_entropy(text_logits.flatten(0, 1), text_targets.flatten())
        loss_image = F.cross_entropy(image_logits.flatten(0, 1), image_targets.flatten())
        return (loss_text + self.loss_img_weight * loss_image) / (self.loss_img_weight + 1)

    def _full_logits(self, text_logits: Tensor, image_logits: Tensor | None) -> Tensor:
        text_part = F.pad(text_logits, (0, self.num_image_tokens), value=float("-inf"))
        if image_logits is None:
            return text_part
        image_part = F.pad(image_logits, (self.num_text_total, 0), value=float("-inf"))
        return torch.cat((text_part, image_part), dim=1)
