"""Image files in and out for the command-line tools: PIL images <-> float tensors in [0, 1], grids.

Pillow modes: https://pillow.readthedocs.io/en/stable/handbook/concepts.html#modes
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import Tensor

from dalle_pytorch.data.text_image import image_to_tensor, open_image, to_model_mode
from dalle_pytorch.io.atomic import atomic_write_file

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def to_pil(image: Tensor) -> Image.Image:
    """A float tensor (c, h, w) with c in {1, 3, 4}, values in [0, 1] (clamped), -> a PIL image."""
    if not torch.is_tensor(image) or not image.is_floating_point() or image.ndim != 3:
        raise TypeError(f"image must be a float tensor (channels, height, width), got {getattr(image, 'shape', image)}")
    channels = image.shape[0]
    if channels not in _MODES:
        raise ValueError(f"image must have 1, 3 or 4 channels, got {channels}")
    pixels = image.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8)
    array = rearrange(pixels, "c h w -> h w c").numpy()
    return Image.fromarray(array[:, :, 0] if channels == 1 else np.ascontiguousarray(array), mode=_MODES[channels])


def save_image(image: Tensor, path: str | os.PathLike) -> Path:
    """Writes a float tensor (c, h, w) in [0, 1] as an image file (format from the suffix, e.g. .png).

    The file is written under a temporary name and renamed into place, so a symlink already at `path` is
    replaced, never written through, and a reader never sees half an image.
    """
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"unknown image file extension {path.suffix!r} in {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = to_pil(image)
    atomic_write_file(path, lambda tmp: picture.save(tmp, format=image_format))
    return path


def image_grid(images: Tensor, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """Images (b, c, h, w) -> one grid image (c, H, W) with `nrow` images per row (default ~sqrt(b))."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[0] == 0:
        shape = getattr(images, "shape", images)
        raise ValueError(f"images must be a non-empty (batch, channels, height, width) tensor, got {shape}")
    batch, channels, height, width = images.shape
    nrow = nrow or math.ceil(math.sqrt(batch))
    ncol = math.ceil(batch / nrow)
    grid = torch.full(
        (channels, ncol * (height + padding) + padding, nrow * (width + padding) + padding),
        pad_value, dtype=images.dtype, device=images.device,
    )  # fmt: skip
    for i in range(batch):
        top = (i // nrow) * (height + padding) + padding
        left = (i % nrow) * (width + padding) + padding
        grid[:, top : top + height, left : left + width] = images[i]
    return grid


def load_image(path: str | os.PathLike, image_size: int, channels: int = 3) -> Tensor:
    """An image file -> float tensor (1, channels, image_size, image_size) in [0, 1]: the largest centred
    square, resized. Transparency is kept when channels == 4, else composited on white."""
    if channels not in (3, 4):
        raise ValueError(f"channels must be 3 or 4, got {channels}")
    image = to_model_mode(open_image(path), transparent=channels == 4)
    side = min(image.size)
    left, top = (image.width - side) / 2, (image.height - side) / 2
    box = (left, top, left + side, top + side)
    resized = image.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box)
    return image_to_tensor(resized)[None]
