"""Train a tiny DiscreteVAE and DALLE on random blocky images for a few steps and write a PNG.

A smoke test of the whole pipeline in well under a minute on a CPU:

    python examples/train_tiny.py --out outputs/tiny.png
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dalle_pytorch import DALLE, DiscreteVAE


def blocky_images(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Random 4x4 colour blocks upsampled to size x size: (b, 3, size, size) in [0, 1]."""
    blocks = torch.rand(batch, 3, 4, 4, generator=generator)
    return torch.nn.functional.interpolate(blocks, size=size, mode="nearest")


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps for each model")
    parser.add_argument("--out", type=Path, default=Path("outputs/tiny.png"), help="where to write the PNG")
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    vae = DiscreteVAE(image_size=32, num_layers=2, num_tokens=64, codebook_dim=32, hidden_dim=32)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    for _ in range(args.steps):
        loss = vae(blocky_images(8, 32, g), return_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"vae loss {loss.item():.4f}")

    dalle = DALLE(dim=64, vae=vae, num_text_tokens=100, text_seq_len=8, depth=2, heads=4, dim_head=16)
    opt = torch.optim.Adam([p for p in dalle.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(args.steps):
        text = torch.randint(1, 100, (8, 8), generator=g)
        loss = dalle(text, blocky_images(8, 32, g), return_loss=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"dalle loss {loss.item():.4f}")

    images = dalle.generate_images(torch.randint(1, 100, (4, 8), generator=g), generator=g)  # (4, 3, 32, 32)
    row = images.clamp(0, 1).permute(0, 2, 3, 1).reshape(-1, 32, 3)  # stacked vertically: (4 * 32, 32, 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((row.numpy() * 255).round().astype(np.uint8)).save(args.out)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
