"""DALLE's sampling loops: image codes one at a time with a KV cache, images, and text completion.

:class:`GenerationOptions` is the one list of sampling options, shared by ``generate_images``,
``generate_image_codes`` and the ``dalle-generate`` flags. Filtering and sampling themselves are the pure
functions of :mod:`dalle_pytorch.models.sampling`; classifier-free guidance: Ho & Salimans 2022,
https://arxiv.org/abs/2207.12598.

Shape letters: b batch, n positions, d model dim.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dalle_pytorch.kernels.packed_linear import packed_linears
from dalle_pytorch.models.options import collect_options, option, options_signature
from dalle_pytorch.models.precision import decoding_copy, weights_dtype
from dalle_pytorch.models.sampling import Generators, check_generation_args, filter_logits, guide, sample
from dalle_pytorch.models.static_decoding import (
    check_static_decoding,
    compile_backend,
    compiled_step_fn,
    prepare_cache,
    shift_sources,
    text_step,
)
from dalle_pytorch.models.transformer import DecodingCache


@dataclass
class GenerationOptions:
    """How image codes are sampled; pass the fields as keyword arguments or ``options=GenerationOptions(...)``."""

    filter_thres: float = option(0.5, help="top-k filtering: the fraction of the image vocabulary dropped, in [0, 1)")
    top_p: float | None = option(None, help="nucleus filtering: keep the tokens of this much probability, in (0, 1]")
    temperature: float = option(1.0, help="sampling temperature, > 0")
    cond_scale: float = option(
        1.0, help="classifier-free guidance scale (1 = off); needs a model trained with null_cond_prob > 0"
    )
    num_init_img_tokens: int | None = option(
        None, help="when priming with an image (img): how many of its codes are kept (default: 14/32 of the grid)"
    )
    use_cache: bool = option(True, help="decode with a KV cache (same result, much faster)")
    compile: bool | str | Callable | None = option(
        None,
        help="torch.compile the decoding step with this backend (True: inductor); compiling takes a while once per "
        "model and batch size, then every step is faster (needs use_cache)",
    )
    truncate_text: bool = option(False, help="cut text longer than text_seq_len instead of raising")
    generator: Generators = option(None, help="a torch.Generator, or a list with one per sample")

    def __post_init__(self) -> None:
        check_generation_args(temperature=self.temperature, cond_scale=self.cond_scale, generator=self.generator)
        if not 0.0 <= self.filter_thres < 1.0:
            raise ValueError(f"filter_thres must be in [0, 1), got {self.filter_thres}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.compile = compile_backend(self.compile)
        if self.compile is not None and not self.use_cache:
            raise ValueError("compile needs use_cache=True (the compiled step is the cached step)")


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Eval mode inside the block, the previous mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class GenerationMixin:
    """``generate_images``, ``generate_image_codes`` and ``generate_texts`` of :class:`~dalle_pytorch.DALLE`
    (they use its embeddings, transformer and logit heads)."""

    @options_signature(GenerationOptions)
    @torch.no_grad()
    def generate_images(
        self,
        text: Tensor,
        *,
        mask: Tensor | None = None,
        clip: nn.Module | None = None,
        img: Tensor | None = None,
        options: GenerationOptions | None = None,
        **kwargs: Any,
    ):
        """Sample images (b, c, H, W) for text (b, <= text_seq_len), in the VAE's output range.

        The sampling options are the fields of :class:`GenerationOptions`, as keyword arguments or
        ``options``. ``img`` (pixels (1 or b, c, H, W) or codes): prime with its first
        ``num_init_img_tokens`` codes. With ``clip``, returns ``(images, scores)``, the scores (b,) being CLIP
        similarities of each image to its text.
        """
        opts = collect_options(GenerationOptions, options, kwargs, owner="generate_images")
        codes = self.generate_image_codes(text, mask=mask, img=img, options=opts)
        images = self.vae.decode(codes)
        if clip is None:
            return images
        clip_text = text[:, : self.text_seq_len] if opts.truncate_text else text
        clip_mask = mask[:, : clip_text.shape[1]] if mask is not None else None
        clip_dtype = next((p.dtype for p in clip.parameters() if p.is_floating_point()), images.dtype)
        with evaluating(clip):
            scores = clip(clip_text.to(images.device), images.to(clip_dtype), text_mask=clip_mask)
        return images, scores

    def decoding_copy(self, precision: str | torch.dtype):
        """A copy of this model for generation with lower-precision weights: ``"bf16"`` (bfloat16 weights,
        activations and cache), ``"int8"`` (weight-only int8 linear layers, the rest float32) or ``"fp32"``.

        This model is not changed; the copy shares its VAE. Sampling runs on float32 logits whatever the
        precision. See :mod:`dalle_pytorch.models.precision`.
        """
        return decoding_copy(self, precision)

    @options_signature(GenerationOptions)
    @torch.no_grad()
    def generate_image_codes(
        self,
        text: Tensor,
        *,
        mask: Tensor | None = None,
        img: Tensor | None = None,
        options: GenerationOptions | None = None,
        step_logits: list | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Like :meth:`generate_images` but returns the image codes (b, image_seq_len) long.

        When ``step_logits`` is a list, the (guided) image logits used at every step are appended to it.
        """
        opts = collect_options(GenerationOptions, options, kwargs, owner="generate_image_codes")
        weights_dtype(self, skip=(self.vae,))  # a model converted in part: a clear error now, not in a matmul
        check_generation_args(temperature=opts.temperature, img=img, num_init_img_tokens=opts.num_init_img_tokens)
        text_ids = self._prepare_text(text, mask, opts.truncate_text)
        batch = text_ids.shape[0]
        guided = opts.cond_scale != 1.0
        codes = torch.empty(batch, 0, dtype=torch.long, device=self.device)
        if img is not None:
            prime = self._image_tokens(img)
            if prime.shape[0] not in (1, batch):
                raise ValueError(f"img batch size must be 1 or {batch}, got {prime.shape[0]}")
            num_init = opts.num_init_img_tokens
            if num_init is None:
                num_init = int(0.4375 * self.image_seq_len)
            if not 0 <= num_init < self.image_seq_len:
                raise ValueError(f"num_init_img_tokens must be in [0, {self.image_seq_len}), got {num_init}")
            codes = prime[:, :num_init].expand(batch, -1)
        generator = opts.generator
        if isinstance(generator, Sequence) and len(generator) != batch:
            raise ValueError(f"generator list has {len(generator)} generators for a batch of {batch}")

        # guidance runs the conditional and the null-text branch as one batch: rows [cond; null]
        branch_text = torch.cat((text_ids, self._null_text(batch))) if guided else text_ids
        if opts.compile is not None:
            check_static_decoding(self.transformer)
        # on a CPU the linears run on weights packed for the step's row count while this call runs
        with evaluating(self), packed_linears(self, len(branch_text)):
            cache = DecodingCache(self.seq_len) if opts.use_cache else None
            logits = self._prefill(branch_text, codes, guided, cache)  # (b or 2b, num_image_tokens) float32
            if opts.compile is not None:
                prepare_cache(cache)
                step, sources = compiled_step_fn(opts.compile), shift_sources(self.transformer)
            while True:
                if guided:
                    logits = guide(logits[:batch], logits[batch:], opts.cond_scale)
                if step_logits is not None:
                    step_logits.append(logits.clone())
                logits = filter_logits(logits / opts.temperature, filter_thres=opts.filter_thres, top_p=opts.top_p)
                new = sample(logits, 1.0, generator)[:, None]  # (b, 1)
                codes = torch.cat((codes, new), dim=1)
                if codes.shape[1] == self.image_seq_len:
                    return codes
                if opts.compile is not None:
                    grid = torch.full((1,), codes.shape[1] - 1, device=self.device)
                    logits = step(self, new, grid, cache._buffers, grid + self.text_len, sources, guided).float()
                elif opts.use_cache:
                    logits = self._decode_step(new, codes.shape[1] - 1, guided, cache)
                else:
                    logits = self._prefill(branch_text, codes, guided, None)

    def _prefill(self, branch_text: Tensor, codes: Tensor, guided: bool, cache: DecodingCache | None) -> Tensor:
        """The transformer on [BOS, text, codes] from position 0 -> float32 image logits of the last position."""
        x = torch.cat((self._embed_text(branch_text), self._embed_branches(codes, 0, guided)), dim=1)
        return self._image_logits(self.transformer(x, cache)[:, -1]).float()

    def _decode_step(self, new: Tensor, grid: int, guided: bool, cache: DecodingCache) -> Tensor:
        """One cached step: the codes new (b, 1) at grid index ``grid`` -> float32 image logits (b or 2b, vocab)."""
        h = self.transformer(self._embed_branches(new, grid, guided), cache)
        return self._image_logits(h[:, -1]).float()

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
        compile: bool | str | Callable | None = None,
        step_logits: list | None = None,
    ) -> tuple[Tensor, list[str]]:
        """Complete ``text`` (or sample from nothing) up to text_seq_len tokens.

        ``tokenizer`` has ``encode(str) -> list[int]`` and ``decode(ids) -> str``. Returns
        ``(token_ids (1, text_seq_len) long with 0 for padding, [decoded text])``. ``compile``: as in
        :class:`GenerationOptions`, the cached text step torch.compiled with this backend (True: inductor).
        When ``step_logits`` is a list, the text logits of every step are appended to it.
        """
        check_generation_args(temperature=temperature, generator=generator)
        backend = compile_backend(compile)
        prompt = list(tokenizer.encode(text)) if text else []
        if len(prompt) > self.text_seq_len:
            raise ValueError(f"text encodes to {len(prompt)} tokens, more than text_seq_len={self.text_seq_len}")
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device).reshape(1, len(prompt))
        ids = self._prepare_text(ids, None)[:, : len(prompt)]
        if backend is not None:
            check_static_decoding(self.transformer)
        with evaluating(self), packed_linears(self, 1):
            cache = DecodingCache(self.seq_len)
            h = self.transformer(self._embed_text(ids), cache)
            logits = self._text_logits(h[:, -1])
            if backend is not None:
                prepare_cache(cache)
                step, sources = compiled_step_fn(backend, text_step), shift_sources(self.transformer)
            while ids.shape[1] < self.text_seq_len:
                logits = logits.float()  # sampling in float32 whatever the weights' precision
                if step_logits is not None:
                    step_logits.append(logits.clone())
                logits = filter_logits(logits / temperature, filter_thres=filter_thres)
                new = sample(logits, 1.0, generator)[:, None]
                position = ids.shape[1]
                # any padding token becomes the padding token of this position, as in training data
                new = torch.where(new >= self.num_text_tokens, self.text_pad_ids[position], new)
                ids = torch.cat((ids, new), dim=1)
                if ids.shape[1] == self.text_seq_len:
                    break
                if backend is not None:  # the new token sits at sequence position position + 1 (after BOS)
                    pos = torch.full((1,), position + 1, device=self.device)
                    logits = step(self, new, cache._buffers, pos, sources)
                else:
                    h = self.transformer(self.text_emb(new) + self._text_position(position + 1), cache)
                    logits = self._text_logits(h[:, -1])
        token_ids = torch.where(ids >= self.num_text_tokens, 0, ids)
        real = [int(t) for t in token_ids[0] if t != 0]
        return token_ids, [tokenizer.decode(real)]

    def _text_position(self, position: int) -> Tensor | float:
        if self.rotary:
            return 0.0
        return self.text_pos_emb.weight[position]
