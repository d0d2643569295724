"""Sampling: small pure functions over logits (b, vocab).

Top-k as in the original DALL-E reproductions (``filter_thres`` is the fraction of the vocabulary dropped),
nucleus / top-p (Holtzman et al. 2019, https://arxiv.org/abs/1904.09751), temperature, classifier-free
guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Generators = torch.Generator | Sequence[torch.Generator] | None


def _finite_number(value: object, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def check_generation_args(
    *,
    temperature: float,
    cond_scale: float = 1.0,
    generator: object = None,
    img: object = None,
    num_init_img_tokens: int | None = None,
) -> None:
    """The sampling options shared by DALLE's generation methods, checked before any work: a NaN
    temperature or guidance scale would silently sample one token over and over."""
    if _finite_number(temperature, "temperature") <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _finite_number(cond_scale, "cond_scale")
    if generator is not None and not isinstance(generator, torch.Generator):
        if isinstance(generator, str | bytes) or not isinstance(generator, Sequence):
            raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
        wrong = [type(g).__name__ for g in generator if not isinstance(g, torch.Generator)]
        if wrong:
            raise TypeError(f"generator list must hold only torch.Generator objects, found {wrong[0]}")
    if num_init_img_tokens is not None:
        if img is None:
            raise ValueError("num_init_img_tokens is the number of codes of img to keep: it needs img")
        if isinstance(num_init_img_tokens, bool) or not isinstance(num_init_img_tokens, int):
            raise TypeError(f"num_init_img_tokens must be an int, got {type(num_init_img_tokens).__name__}")


def top_k_filter(logits: Tensor, filter_thres: float) -> Tensor:
    """Keep the ``ceil((1 - filter_thres) * vocab)`` largest logits of each row (at least one); -inf elsewhere."""
    if not 0.0 <= filter_thres < 1.0:
        raise ValueError(f"filter_thres must be in [0, 1), got {filter_thres}")
    k = max(1, math.ceil((1.0 - filter_thres) * logits.shape[-1]))
    if k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of largest logits whose probabilities sum to at least ``top_p``; -inf elsewhere."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # drop a token when the tokens before it already reach top_p (the first token always stays)
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def guide(cond_logits: Tensor, null_logits: Tensor, cond_scale: float) -> Tensor:
    """Classifier-free guidance: null + (cond - null) * cond_scale."""
    return null_logits + (cond_logits - null_logits) * cond_scale


def per_sample_draw(
    draw: Callable[..., Tensor], batch: int, shape: Sequence[int], generator: Generators, device: torch.device
) -> Tensor:
    """`draw` (torch.rand or torch.randn) of shape (batch, *shape) on `device`. With one generator per
    sample, row i is drawn from generator i alone, so it does not depend on the other rows of the batch."""
    if generator is None or isinstance(generator, torch.Generator):
        g_device = generator.device if generator is not None else "cpu"
        return draw((batch, *shape), generator=generator, device=g_device).to(device)
    generators = list(generator)
    if len(generators) != batch:
        raise ValueError(f"generator list has {len(generators)} generators for a batch of {batch}")
    return torch.stack([draw(tuple(shape), generator=g, device=g.device).to(device) for g in generators])


def _uniforms(batch: int, generator: Generators, device: torch.device) -> Tensor:
    """(b,) uniforms in [0, 1); with one generator per sample, each row depends only on its own generator."""
    return per_sample_draw(torch.rand, batch, (), generator, device)


def sample(logits: Tensor, temperature: float = 1.0, generator: Generators = None) -> Tensor:
    """Draw one token per row of logits (b, vocab) by inverse-CDF sampling; returns (b,) long.

    One uniform per row keeps results independent of the device and, with a list of generators, of the
    other rows in the batch.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    probs = (logits.float() / temperature).softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    u = _uniforms(logits.shape[0], generator, logits.device) * cdf[:, -1]
    # the first index whose cdf exceeds u; tokens of probability zero can never be that index
    index = torch.searchsorted(cdf, u[:, None], right=True).squeeze(-1)
    return index.clamp(max=logits.shape[-1] - 1)


def filter_logits(logits: Tensor, *, filter_thres: float | None = None, top_p: float | None = None) -> Tensor:
    """Top-k (when ``filter_thres`` is given) then top-p (when ``top_p`` is given)."""
    if filter_thres is not None:
        logits = top_k_filter(logits, filter_thres)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits
