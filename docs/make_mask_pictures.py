"""Draw the masks of the built-in attention patterns into docs/img/ (PNG), for docs/attention.md.

    python docs/make_mask_pictures.py            # text_len 4, an 8 x 8 image grid

Row i is query i, column j key j; a filled cell means query i may attend to key j. Text keys are drawn in
blue, image keys in black; the lines mark the text / image boundary and every image row.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from dalle_pytorch.attention import AttentionPattern, AxialCol, AxialRow, BlockSparse, ConvLike, ConvLikeCorner, Full

PICTURES: dict[str, AttentionPattern] = {
    "full": Full(),
    "axial_row": AxialRow(),
    "axial_col": AxialCol(),
    "conv_like": ConvLike(kernel_size=3),
    "conv_like_dilated": ConvLike(kernel_size=3, dilation=2),
    "sparse": BlockSparse(block_size=4, num_local_blocks=2, num_random_blocks=1),
    "conv_like_corner": ConvLikeCorner(kernel_size=3),
}
TEXT_KEY, IMAGE_KEY, LINE, BACKGROUND = (66, 110, 200), (20, 20, 20), (200, 200, 200), (255, 255, 255)


def draw(pattern: AttentionPattern, text_len: int, fmap: int, cell: int = 5) -> Image.Image:
    mask = pattern.mask(text_len, fmap)
    n = mask.shape[0]
    image = Image.new("RGB", (n * cell + 1, n * cell + 1), BACKGROUND)
    canvas = ImageDraw.Draw(image)
    for edge in [text_len + row * fmap for row in range(fmap)]:  # the text / image boundary and image rows
        width = 1 if edge > text_len else 2
        canvas.line([(edge * cell, 0), (edge * cell, n * cell)], fill=LINE, width=width)
        canvas.line([(0, edge * cell), (n * cell, edge * cell)], fill=LINE, width=width)
    for i, j in mask.nonzero().tolist():
        colour = TEXT_KEY if j < text_len else IMAGE_KEY
        canvas.rectangle([j * cell + 1, i * cell + 1, (j + 1) * cell - 1, (i + 1) * cell - 1], fill=colour)
    return image


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-len", type=int, default=4, help="text positions, BOS included (default: 4)")
    parser.add_argument("--fmap", type=int, default=8, help="image grid side (default: 8)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "img", help="output folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, pattern in PICTURES.items():
        path = args.out / f"mask_{name}.png"
        draw(pattern, args.text_len, args.fmap).save(path)
        print(f"{path}: {pattern!r}")


if __name__ == "__main__":
    main()
