"""Token shift: some channels of each position come from a neighbouring position, so that a layer sees the
2-D neighbourhood of an image token (and the previous text token) at no cost.

A *style* names which channel groups move and where each group comes from (:data:`SHIFT_STYLES`):

- ``"default"`` (this library): group one (a quarter of the channels) of a text token from the previous token,
  of an image token from its left neighbour; group two (the next quarter) of an image token from the token
  above, a text token keeps its own.
- ``"original"`` (DALLE-pytorch 1.x): a text token takes its first half of the channels (rounded up) from the
  previous token; an image token takes its first quarter (rounded up) from the token above and the next as
  many from its left neighbour.

The other channels stay. A missing neighbour (the first token, an image token in the first row or column)
gives zeros; image tokens never take from text.

Shape letters: b batch, n positions, d model dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# per channel group: (where a text token takes it from, where an image token takes it from)
SHIFT_STYLES = {
    "default": (("previous", "left"), ("own", "above")),
    "original": (("previous", "above"), ("previous", "left"), ("own", "left")),
}
_OFFSET_ORDER = ("previous", "above", "own")  # the order a group's terms are added in (1, fmap, 0 back)


def check_shift_style(style: str) -> str:
    """``style`` if it names a token shift style, else a ValueError naming the ``shift_tokens_style`` option."""
    if style not in SHIFT_STYLES:
        raise ValueError(f"shift_tokens_style must be one of {tuple(SHIFT_STYLES)}, got {style!r}")
    return style


def shift_groups(style: str, dim: int) -> tuple[tuple[int, int], ...]:
    """The channel range [start, end) of each group of ``SHIFT_STYLES[style]`` for model width ``dim``."""
    if style == "default":
        quarter = dim // 4
        return (0, quarter), (quarter, 2 * quarter)
    quarter, half = -(-dim // 4), -(-dim // 2)  # rounded up, as chunk(4) and chunk(2) split
    return (0, quarter), (quarter, half), (half, min(2 * quarter, dim))


def _kind(source: str) -> str:
    """A source by how far back it is: 'previous' (1, left too), 'above' (fmap) or 'own' (0)."""
    return "previous" if source in ("previous", "left") else source


def _terms(style: str) -> list[tuple[int, str]]:
    """(group, kind) of every term of the sequence shift, in the order of :func:`token_shift_tables`."""
    terms = []
    for group, sources in enumerate(SHIFT_STYLES[style]):
        kinds = {_kind(source) for source in sources}
        terms += [(group, kind) for kind in _OFFSET_ORDER if kind in kinds]
    return terms


def _takes(source: str, pos: Tensor, text_len: int, fmap: int) -> Tensor:
    """Bool (n,): whether each position takes a group from ``source`` (a text or an image source)."""
    grid = pos - text_len
    is_image = grid >= 0
    return {
        "previous": ~is_image & (pos > 0),
        "own": ~is_image,
        "left": is_image & (grid % fmap > 0),
        "above": is_image & (grid >= fmap),
    }[source]


def token_shift_source(position: int, text_len: int, fmap: int, style: str = "default") -> tuple[int, ...]:
    """Where ``position`` takes each shifted group from (-1 = zeros), as Python ints: the one-token decoding step
    needs no index tensors (and no device synchronisation to read them)."""
    grid = position - text_len
    sources = []
    for text_source, image_source in SHIFT_STYLES[style]:
        source = text_source if grid < 0 else image_source
        if source == "own":
            sources.append(position)
        elif source == "previous":
            sources.append(position - 1)
        elif source == "left":
            sources.append(position - 1 if grid % fmap > 0 else -1)
        else:
            sources.append(position - fmap if grid >= fmap else -1)
    return tuple(sources)


def shift_one_token(history: Tensor, *sources: int, style: str = "default") -> Tensor:
    """Token shift of the last position of history (b, end, d) alone, sources from :func:`token_shift_source`:
    (b, 1, d)."""
    groups = shift_groups(style, history.shape[-1])
    own = history[:, -1:]
    parts = []
    for source, (start, end) in zip(sources, groups):
        if source < 0:  # no such neighbour
            parts.append(own.new_zeros(own.shape[0], 1, end - start))
        else:
            parts.append(history[:, source : source + 1, start:end])
    return torch.cat((*parts, own[..., groups[-1][1] :]), -1)


def token_shift_tables(text_len: int, fmap: int, style: str = "default") -> Tensor:
    """(terms, n, 1) float 0/1: for each term of the style (a group taken from the previous position, from the
    position above, or kept), which positions take it.

    Over a whole sequence a group is then a sum of constant offsets times masks (:func:`shift_sequence`): cheap
    slices whose gradient is a slice too, where a gather's is a scatter-add. The default style has three
    terms: group one from the previous position, group two from above, group two kept.
    """
    pos = torch.arange(text_len + fmap * fmap)
    rows = []
    for group, kind in _terms(style):
        takes = torch.zeros_like(pos, dtype=torch.bool)
        for source in SHIFT_STYLES[style][group]:
            if _kind(source) == kind:
                takes |= _takes(source, pos, text_len, fmap)
        rows.append(takes)
    return torch.stack(rows)[..., None].float()


def shift_sequence(x: Tensor, fmap: int, tables: Tensor, style: str = "default") -> Tensor:
    """Token shift of all positions [0, n) of x (b, n, d), with ``tables[:, :n]`` of :func:`token_shift_tables`:
    returns (b, n, d)."""
    n = x.shape[1]
    groups = shift_groups(style, x.shape[-1])
    tables = tables.to(x.dtype)
    sums: list[Tensor | None] = [None] * len(groups)
    for (group, kind), table in zip(_terms(style), tables):
        start, end = groups[group]
        if kind == "previous":  # position p holds x[p - 1]
            term = F.pad(x[:, : n - 1, start:end], (0, 0, 1, 0))
        elif kind == "above":  # position p holds x[p - fmap]
            term = F.pad(x[:, :, start:end], (0, 0, fmap, 0))[:, :n]
        else:
            term = x[:, :, start:end]
        term = term * table
        sums[group] = term if sums[group] is None else sums[group] + term
    return torch.cat((*sums, x[:, :, groups[-1][1] :]), dim=-1)


def shift_sources(text_len: int, fmap: int, style: str = "default", device: torch.device | None = None) -> Tensor:
    """(n, groups) long: per position, the source of each group (-1 = zeros), as :func:`token_shift_source`."""
    return torch.tensor(
        [token_shift_source(p, text_len, fmap, style) for p in range(text_len + fmap * fmap)], device=device
    )


def shift_indexed(history: Tensor, own: Tensor, sources: Tensor, style: str = "default") -> Tensor:
    """Token shift of one new position with its sources as a tensor (a compiled step's position is a tensor):
    history (b, L, d) already holding the position, own (b, 1, d), sources (groups,) from :func:`shift_sources`."""
    groups = shift_groups(style, own.shape[-1])
    picked = history.index_select(1, sources.clamp(min=0))  # (b, groups, d)
    valid = (sources >= 0).to(own.dtype)[None, :, None]  # (1, groups, 1)
    picked = picked * valid
    parts = [picked[:, g : g + 1, start:end] for g, (start, end) in enumerate(groups)]
    return torch.cat((*parts, own[..., groups[-1][1] :]), dim=-1)
