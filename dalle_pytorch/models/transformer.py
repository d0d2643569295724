"""The DALLE transformer: blocks, token shift, rotary positions, reversible execution and the decoding cache.

The sequence is ``[BOS, text | image grid]`` (``text_len`` text positions, then ``fmap * fmap`` image
positions in raster order). Each layer is an attention sublayer and a feed-forward sublayer, each
``x + sublayer(norm(x))``; with ``reversible=True`` the two form a RevNet coupling (Gomez et al. 2017,
https://arxiv.org/abs/1707.04585; Reformer, https://arxiv.org/abs/2001.04451) so activations are recomputed
in the backward pass instead of stored.

Each layer's attention pattern (:mod:`dalle_pytorch.attention.patterns`) gives a dense mask, which serves
cached decoding and is the reference everywhere. A pattern whose mask is the causal mask runs the causal
kernel; a pass over positions [0, n) without a cache (training) runs a pattern with a fast path through the
kernels of :mod:`dalle_pytorch.kernels.sparse_attention`, once its tile plan is checked to cover exactly its
mask (``fast_path=False`` keeps the dense masks throughout). Layers receive a :class:`LayerInputs`.
The token shift (:mod:`dalle_pytorch.models.token_shift`) and the rotary angles come in two styles: this
library's and the original DALLE-pytorch's (``shift_tokens_style`` / ``rotary_emb_style`` = ``"original"``).

Shape letters: b batch, n positions, d model dim.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle_pytorch.attention.layer import Attention, rotary_tables
from dalle_pytorch.attention.pattern import (
    AttentionPattern,
    build_pattern,
    causal_mask,
    checked_mask,
    fast_plan,
    normalize_attn_types,
)
from dalle_pytorch.kernels.sparse_attention import fast_path_available
from dalle_pytorch.kernels.tile_plans import TilePlan
from dalle_pytorch.models.reversible import ReversibleSequence
from dalle_pytorch.models.token_shift import (
    check_shift_style,
    shift_one_token,
    shift_sequence,
    token_shift_source,
    token_shift_tables,
)


class DecodingCache:
    """Keys, values and token-shift history of the positions processed so far, per layer.

    Buffers are allocated once for ``max_len`` positions and filled in place, so one decoding step costs
    work proportional to the current length, not a copy of the whole prefix.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.offset = 0
        self._buffers: dict = {}

    def append(self, key, new: Tensor) -> Tensor:
        """Store ``new`` (..., n_new, d) at positions [offset, offset + n_new) and return (..., end, d)."""
        end = self.offset + new.shape[-2]
        if end > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; cannot extend to {end}")
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = new.new_empty(*new.shape[:-2], self.max_len, new.shape[-1])
            self._buffers[key] = buffer
        buffer[..., self.offset : end, :] = new
        return buffer[..., :end, :]


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020, https://arxiv.org/abs/2002.05202)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim * mult * 2)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(dim * mult, dim)

    def forward(self, x: Tensor, **_) -> Tensor:
        x, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(self.dropout(x * F.gelu(gate)))


ROTARY_STYLES = ("default", "original")


def check_rotary_style(style: str) -> str:
    """``style`` if it names a rotary angle scheme, else a ValueError naming the ``rotary_emb_style`` option."""
    if style not in ROTARY_STYLES:
        raise ValueError(f"rotary_emb_style must be one of {ROTARY_STYLES}, got {style!r}")
    return style


def rotary_angles(text_len: int, fmap: int, dim_head: int, theta: float = 10000.0, style: str = "default") -> Tensor:
    """(n, r) rotary angles: a 1-D part for text order and 2-D axial parts for image rows and columns, each
    ``(dim_head // 3) // 2 * 2`` features wide.

    ``"default"``: image tokens all sit at text position ``text_len`` and text tokens at row = column = 0, image
    rows and columns counting from 1, so relative angles stay meaningful across the text / image boundary.
    ``"original"``: the angles of DALLE-pytorch 1.x: image tokens at text position 8192, text tokens at row =
    column = -10, image rows and columns at ``linspace(-1, 1, fmap)``, with pixel frequencies ``linspace(1, 5)
    * pi`` for rows and columns and text frequencies over ``dim_head // 3`` features.
    """
    check_rotary_style(style)
    per_axis = (dim_head // 3) // 2 * 2
    if per_axis < 2:
        raise ValueError(f"rotary_emb needs dim_head >= 6, got {dim_head}")
    n = text_len + fmap * fmap
    pos = torch.arange(n)
    grid = pos - text_len
    is_image = grid >= 0
    if style == "default":
        text_pos = torch.where(is_image, text_len, pos).float()
        row = torch.where(is_image, grid // fmap + 1, 0).float()
        col = torch.where(is_image, grid % fmap + 1, 0).float()
        text_freq = axial_freq = 1.0 / theta ** (torch.arange(0, per_axis, 2).float() / per_axis)
    else:
        text_pos = torch.where(is_image, 8192, pos).float()
        steps = torch.linspace(-1.0, 1.0, fmap)
        row = torch.where(is_image, steps[(grid // fmap).clamp(min=0)], -10.0)
        col = torch.where(is_image, steps[(grid % fmap).clamp(min=0)], -10.0)
        rot_dim = dim_head // 3
        text_freq = 1.0 / theta ** (torch.arange(0, rot_dim, 2)[: rot_dim // 2].float() / rot_dim)
        axial_freq = torch.linspace(1.0, 5.0, rot_dim // 2) * math.pi
    parts = [
        (p[:, None] * freq).repeat_interleave(2, dim=-1)
        for p, freq in ((text_pos, text_freq), (row, axial_freq), (col, axial_freq))
    ]
    return torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class AttentionInputs:
    """What one layer's attention needs for the queries [start, end) over the keys [0, end)."""

    mask: Tensor | None  # (end - start, end) bool; None with ``causal`` or when every key is visible
    causal: bool  # the plain causal mask (queries from position 0), run by the causal kernel
    plan: TilePlan | None  # the pattern's checked fast path (a pass from position 0 without cache)


@dataclass(frozen=True)
class LayerInputs:
    """Everything a layer reads besides its input, for the positions [start, end) of one pass."""

    start: int
    fmap: int
    cache: DecodingCache | None
    rotary: tuple[Tensor, Tensor] | None  # (cos, sin) tables (end - start, dim_head)
    shift_style: str  # the token shift's style (token_shift.SHIFT_STYLES)
    shift_tables: Tensor  # (terms, end, 1), token_shift_tables of the positions [0, end)
    shift_step: tuple[int, ...] | None  # token_shift_source of the one new position of cached decoding
    attention: tuple[AttentionInputs, ...]  # one per layer


class Sublayer(nn.Module):
    """norm -> (token shift) -> attention or feed-forward -> (sandwich norm)."""

    def __init__(self, dim: int, fn: nn.Module, *, sandwich_norm: bool, shift: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn
        self.norm_out = nn.LayerNorm(dim) if sandwich_norm else nn.Identity()
        self.shift = shift

    def forward(self, x: Tensor, inputs: LayerInputs, key: tuple[int, int]) -> Tensor:
        """x (b, n, d) -> (b, n, d); ``key`` = (layer index, 0 for attention / 1 for feed-forward)."""
        x = self.norm(x)
        if self.shift:
            history = inputs.cache.append((key, "shift"), x) if inputs.cache is not None else x
            if inputs.shift_step is not None:  # one new position of cached decoding
                x = shift_one_token(history, *inputs.shift_step, style=inputs.shift_style)
            else:  # from position 0 (training, the prompt of decoding), or several cached positions
                x = shift_sequence(history, inputs.fmap, inputs.shift_tables, inputs.shift_style)[:, inputs.start :]
        if isinstance(self.fn, Attention):
            attention = inputs.attention[key[0]]
            x = self.fn(
                x, attention.mask, causal=attention.causal, rotary=inputs.rotary, cache=inputs.cache, cache_key=key,
                plan=attention.plan,
            )  # fmt: skip
        else:
            x = self.fn(x)
        return self.norm_out(x)


def _expand(ids: Sequence | None, depth: int, name: str) -> list:
    if ids is None:
        return list(range(depth))
    ids = list(ids)
    if len(ids) == 0:
        raise ValueError(f"{name} must not be empty")
    return [ids[i % len(ids)] for i in range(depth)]


class Transformer(nn.Module):
    """A stack of ``depth`` layers over the [text | image] sequence; see the module docstring.

    ``attn_types``: attention patterns cycled over the layers, as names (built with ``pattern_options``,
    DALLE's keywords such as ``conv_kernel_size``), :class:`~dalle_pytorch.attention.pattern.AttentionPattern`
    instances or ``{"pattern": name, ...}`` dicts. ``feed_forward_class`` builds each feed-forward block as
    ``cls(dim, ff_mult, ff_dropout)`` (a module mapping (b, n, d) to (b, n, d)); a subclass may set its own.
    ``shift_tokens_style`` (:data:`~dalle_pytorch.models.token_shift.SHIFT_STYLES`) and ``rotary_emb_style``
    (:func:`rotary_angles`): ``"default"`` or ``"original"``, as DALLE's options of those names.
    """

    feed_forward_class: type[nn.Module] = FeedForward

    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        text_len: int,
        fmap: int,
        heads: int = 8,
        dim_head: int = 64,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        ff_mult: int = 4,
        attn_types: Sequence[str | AttentionPattern] | str | AttentionPattern = ("full",),
        reversible: bool = False,
        stable: bool = False,
        sandwich_norm: bool = False,
        shift_tokens: bool = True,
        rotary_emb: bool = True,
        shift_tokens_style: str = "default",
        rotary_emb_style: str = "default",
        shared_attn_ids: Sequence | None = None,
        shared_ff_ids: Sequence | None = None,
        pattern_options: Mapping[str, Any] | None = None,
        fast_path: bool = True,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        patterns = [build_pattern(spec, pattern_options) for spec in normalize_attn_types(attn_types)]
        self.text_len, self.fmap = text_len, fmap
        self.seq_len = text_len + fmap * fmap
        self.reversible = reversible
        self.layer_patterns: list[AttentionPattern] = [patterns[i % len(patterns)] for i in range(depth)]
        self.shift_style = check_shift_style(shift_tokens_style)
        check_rotary_style(rotary_emb_style)
        rotary_values = rotary_emb and rotary_emb_style == "original"  # the original rotates values too

        attn_ids, ff_ids = (
            _expand(shared_attn_ids, depth, "shared_attn_ids"),
            _expand(shared_ff_ids, depth, "shared_ff_ids"),
        )
        shared_attn: dict = {}
        shared_ff: dict = {}
        layers = []
        for i in range(depth):
            attn_id, pattern = attn_ids[i], self.layer_patterns[i]
            if attn_id in shared_attn and shared_attn[attn_id][1] != pattern:
                raise ValueError(
                    f"shared_attn_ids gives layer {i} the id {attn_id!r} of a layer with attention pattern "
                    f"{shared_attn[attn_id][1]!r}, but layer {i} has {pattern!r}"
                )
            if attn_id not in shared_attn:
                attention = Attention(dim, heads, dim_head, attn_dropout, stable, rotary_values=rotary_values)
                shared_attn[attn_id] = (attention, pattern)
            if ff_ids[i] not in shared_ff:
                shared_ff[ff_ids[i]] = self.feed_forward_class(dim, ff_mult, ff_dropout)
            layers.append(
                nn.ModuleList(
                    [
                        Sublayer(dim, shared_attn[attn_id][0], sandwich_norm=sandwich_norm, shift=shift_tokens),
                        Sublayer(dim, shared_ff[ff_ids[i]], sandwich_norm=sandwich_norm, shift=shift_tokens),
                    ]
                )
            )
        self.layers = nn.ModuleList(layers)
        self.reversible_stack = ReversibleSequence(self.layers) if reversible else None

        # derived from the configuration: rebuilt at construction, never saved in checkpoints. Equal patterns
        # (same class and fields) share one mask; a pattern without a tile plan whose mask is the causal mask
        # (``Full``) runs the causal kernel
        self.patterns: list[AttentionPattern] = []
        for pattern in self.layer_patterns:
            if pattern not in self.patterns:
                self.patterns.append(pattern)
        self._pattern_of_layer = [self.patterns.index(pattern) for pattern in self.layer_patterns]
        masks = torch.stack([checked_mask(pattern, text_len, fmap) for pattern in self.patterns])
        self.register_buffer("pattern_masks", masks, persistent=False)  # (patterns, n, n)
        self._is_causal = [
            torch.equal(mask, causal_mask(self.seq_len)) and pattern.tile_plan(text_len, fmap, self.seq_len) is None
            for pattern, mask in zip(self.patterns, masks)
        ]
        # a full-sequence pass (training) runs patterns with a checked tile plan through the fast kernels;
        # ``fast_path = False`` keeps the dense masks everywhere (the reference the tests compare with)
        self.fast_path = fast_path
        self.register_buffer("shift_tables", token_shift_tables(text_len, fmap, shift_tokens_style), persistent=False)
        self.shift = shift_tokens
        self.rotary = rotary_emb
        if rotary_emb:
            cos, sin = rotary_tables(rotary_angles(text_len, fmap, dim_head, style=rotary_emb_style), dim_head)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)

    def layer_mask(self, layer: int) -> Tensor:
        """The (n, n) bool mask of a layer's attention pattern, n = text_len + fmap ** 2."""
        return self.pattern_masks[self._pattern_of_layer[layer]]

    def _attention_inputs(self, start: int, end: int, cached: bool) -> tuple[AttentionInputs, ...]:
        """Per layer: the mask, causal flag and fast path for queries [start, end) over keys [0, end)."""
        per_pattern = []
        for index, pattern in enumerate(self.patterns):
            mask = self.pattern_masks[index, start:end, :end]
            if self._is_causal[index]:
                if start == 0:
                    per_pattern.append(AttentionInputs(None, True, None))
                else:  # one new query sees every earlier key
                    per_pattern.append(AttentionInputs(None if end - start == 1 else mask, False, None))
                continue
            plan = None
            if self.fast_path and not cached and fast_path_available(mask.device):  # else never used: not checked
                plan = fast_plan(pattern, self.text_len, self.fmap, end, self.pattern_masks[index])
            per_pattern.append(AttentionInputs(mask, False, plan))
        return tuple(per_pattern[index] for index in self._pattern_of_layer)

    def forward(self, x: Tensor, cache: DecodingCache | None = None) -> Tensor:
        """x: (b, n, d) for positions [cache.offset, cache.offset + n) (from 0 without a cache)."""
        start = cache.offset if cache is not None else 0
        end = start + x.shape[1]
        if end > self.seq_len:
            raise ValueError(f"sequence of {end} positions is longer than the {self.seq_len} this model has")
        inputs = LayerInputs(
            start=start,
            fmap=self.fmap,
            cache=cache,
            rotary=(self.rotary_cos[start:end], self.rotary_sin[start:end]) if self.rotary else None,
            shift_style=self.shift_style,
            shift_tables=self.shift_tables[:, :end],
            shift_step=(
                token_shift_source(start, self.text_len, self.fmap, self.shift_style)
                if cache is not None and end - start == 1
                else None
            ),
            attention=self._attention_inputs(start, end, cached=cache is not None),
        )
        if self.reversible:
            x = self.reversible_stack(x, inputs, use_checkpointing=torch.is_grad_enabled() and cache is None)
        else:
            for i, (attn, ff) in enumerate(self.layers):
                x = x + attn(x, inputs, (i, 0))
                x = x + ff(x, inputs, (i, 1))
        if cache is not None:
            cache.offset = end
        return x
