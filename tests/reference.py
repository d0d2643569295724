"""Reference implementations the tests compare the library's fast forms against; not used by the package.

- :func:`reference_attention_mask`: the attention masks as one function of the type name, frozen as they
  were before patterns became classes; every built-in pattern's mask must equal it bit for bit.
- :func:`shift_tokens` with :func:`token_shift_sources`: token shift as an explicit gather;
  :func:`original_shift_tokens`: the original DALLE-pytorch's token shift, on the 2-D image grid.
- :func:`apply_rotary` with :func:`rotate_half`: rotary embeddings from the angles, by definition.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

ATTENTION_TYPES = ("full", "axial_row", "axial_col", "conv_like", "sparse")


def causal_mask(n: int) -> Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()


def _grid_coordinates(text_len: int, fmap: int) -> tuple[Tensor, Tensor, Tensor]:
    """For every position of [text | image grid]: (is_image, row, col); rows/cols are -1 for text."""
    n = text_len + fmap * fmap
    pos = torch.arange(n)
    is_image = pos >= text_len
    grid_index = (pos - text_len).clamp(min=0)
    row = torch.where(is_image, grid_index // fmap, -1)
    col = torch.where(is_image, grid_index % fmap, -1)
    return is_image, row, col


def reference_attention_mask(
    attn_type: str,
    text_len: int,
    fmap: int,
    *,
    kernel_size: int = 5,
    dilation: int = 1,
    sparse_block_size: int = 16,
    sparse_num_local_blocks: int = 4,
    sparse_num_random_blocks: int = 2,
    sparse_seed: int = 0,
) -> Tensor:
    """The (n, n) boolean mask of one attention type, n = text_len + fmap ** 2.

    - ``full``: causal over everything.
    - ``axial_row``: all text + earlier-or-same image tokens of the same row.
    - ``axial_col``: all text + earlier-or-same image tokens of the same column.
    - ``conv_like``: all text + the causal half of a ``kernel_size`` x ``kernel_size`` window (spacing
      ``dilation``) centred on the token: window rows above it, and the window tokens left of it in its row.
    - ``sparse``: block-sparse over the whole sequence: blocks of ``sparse_block_size`` positions see the
      ``sparse_num_local_blocks`` blocks ending at their own, every block holding text, and
      ``sparse_num_random_blocks`` earlier blocks drawn from ``sparse_seed``; all restricted to causal.
    """
    if attn_type not in ATTENTION_TYPES:
        raise ValueError(f"attn_type must be one of {ATTENTION_TYPES}, got {attn_type!r}")
    n = text_len + fmap * fmap
    causal = causal_mask(n)
    if attn_type == "full":
        return causal
    if attn_type == "sparse":
        return causal & _block_sparse_mask(
            n, text_len, sparse_block_size, sparse_num_local_blocks, sparse_num_random_blocks, sparse_seed
        )

    is_image, row, col = _grid_coordinates(text_len, fmap)
    # (i, j) grids of query / key coordinates
    qi, kj = is_image[:, None], is_image[None, :]
    dr = row[:, None] - row[None, :]  # query row - key row
    dc = col[:, None] - col[None, :]
    if attn_type == "axial_row":
        image_part = dr == 0
    elif attn_type == "axial_col":
        image_part = dc == 0
    else:  # conv_like
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        if dilation < 1:
            raise ValueError(f"dilation must be >= 1, got {dilation}")
        reach = (kernel_size // 2) * dilation
        image_part = (dr.abs() <= reach) & (dc.abs() <= reach) & (dr % dilation == 0) & (dc % dilation == 0)
    # text queries: causal text; image queries: all text + the pattern among image keys
    allowed = ~kj | (qi & kj & image_part)
    return causal & allowed


def _block_sparse_mask(n: int, text_len: int, block_size: int, num_local: int, num_random: int, seed: int) -> Tensor:
    layout = block_sparse_layout(n, text_len, block_size, num_local, num_random, seed)
    block_of = torch.arange(n) // block_size
    return layout[block_of[:, None], block_of[None, :]]


def block_sparse_layout(n: int, text_len: int, block_size: int, num_local: int, num_random: int, seed: int) -> Tensor:
    """(num_blocks, num_blocks) bool: which key block each query block of ``block_size`` positions may see.

    Local blocks (the ``num_local`` ending at the query block), every block holding text, and ``num_random``
    earlier blocks drawn from ``seed``. The draws for block q depend only on the blocks before it, so the
    layout of a shorter sequence is the top-left corner of the layout of a longer one. Not yet causal inside
    a block: :func:`reference_attention_mask` intersects it with the causal mask.
    """
    if block_size < 1 or num_local < 1 or num_random < 0:
        raise ValueError(
            "sparse attention needs sparse_block_size >= 1, sparse_num_local_blocks >= 1 and "
            f"sparse_num_random_blocks >= 0, got {block_size}, {num_local}, {num_random}"
        )
    num_blocks = -(-n // block_size)
    qb, kb = torch.meshgrid(torch.arange(num_blocks), torch.arange(num_blocks), indexing="ij")
    layout = (qb - kb >= 0) & (qb - kb < num_local)
    layout |= (kb * block_size < text_len) & (kb <= qb)  # blocks that hold text are global
    generator = torch.Generator().manual_seed(seed)
    for q in range(num_blocks):
        if q == 0 or num_random == 0:
            continue
        picks = torch.randperm(q, generator=generator)[:num_random]
        layout[q, picks] = True
    return layout


def rotate_half(x: Tensor) -> Tensor:
    x = rearrange(x, "... (d two) -> ... d two", two=2)
    x1, x2 = x.unbind(-1)
    return rearrange(torch.stack((-x2, x1), dim=-1), "... d two -> ... (d two)")


def apply_rotary(angles: Tensor, x: Tensor) -> Tensor:
    """Rotate the first ``angles.shape[-1]`` features of x (b, h, n, d) by angles (n, r); the rest pass.

    The reference definition; models use the precomputed tables of :func:`rotary_tables` with :func:`rotate`.
    """
    rot_dim = angles.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    angles = angles.to(x.dtype)
    x_rot = x_rot * angles.cos() + rotate_half(x_rot) * angles.sin()
    return torch.cat((x_rot, x_pass), dim=-1)


def token_shift_sources(text_len: int, fmap: int) -> Tensor:
    """(n, 2) long: where each position takes its two shifted channel groups from (-1 = zeros).

    Text takes group one from the previous token and keeps group two; an image token takes group one from
    its left neighbour and group two from the token above, so a layer sees the 2-D neighbourhood.
    """
    n = text_len + fmap * fmap
    pos = torch.arange(n)
    grid = pos - text_len
    is_image = grid >= 0
    has_left = is_image & (grid % fmap > 0)
    has_above = is_image & (grid >= fmap)
    first = torch.where(is_image, torch.where(has_left, pos - 1, -1), pos - 1)
    second = torch.where(is_image, torch.where(has_above, pos - fmap, -1), pos)
    return torch.stack((first, second), dim=-1)


def shift_tokens(history: Tensor, sources: Tensor) -> Tensor:
    """Token shift of the last ``len(sources)`` positions of history (b, end, d): returns (b, n_new, d)."""
    dim = history.shape[-1]
    group = dim // 4
    n_new = sources.shape[0]
    own = history[:, history.shape[1] - n_new :]
    gathered = []
    for g in range(2):
        src = sources[:, g]
        values = history[:, src.clamp(min=0), g * group : (g + 1) * group]
        gathered.append(values * (src >= 0)[None, :, None].to(values.dtype))
    return torch.cat((*gathered, own[..., 2 * group :]), dim=-1)


def original_shift_tokens(x: Tensor, text_len: int, fmap: int) -> Tensor:
    """The original DALLE-pytorch's token shift of x (b, n, d), n <= text_len + fmap ** 2, by its definition:
    text tokens take the first half of their channels (``chunk(2)``: rounded up) from the previous text token;
    on the image grid, the first quarter (``chunk(4)``: rounded up) comes from the row above and the second
    from the column to the left; zeros where there is no such token."""
    b, n, d = x.shape
    text, image = x[:, :text_len], x[:, text_len:]
    half = -(-d // 2)
    text = torch.cat((torch.nn.functional.pad(text[:, :-1, :half], (0, 0, 1, 0)), text[:, :, half:]), dim=-1)
    if image.shape[1] == 0:
        return text
    grid = torch.zeros(b, fmap * fmap, d, dtype=x.dtype)
    grid[:, : image.shape[1]] = image
    grid = rearrange(grid, "b (h w) d -> b h w d", h=fmap)
    quarter = -(-d // 4)
    shifted = grid.clone()
    shifted[:, :, :, :quarter] = 0
    shifted[:, 1:, :, :quarter] = grid[:, :-1, :, :quarter]  # from above
    left = slice(quarter, min(2 * quarter, d))
    shifted[:, :, :, left] = 0
    shifted[:, :, 1:, left] = grid[:, :, :-1, left]  # from the left
    image = rearrange(shifted, "b h w d -> b (h w) d")[:, : image.shape[1]]
    return torch.cat((text, image), dim=1)
