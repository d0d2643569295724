"""`dalle-train-vae`: train a DiscreteVAE (the image tokenizer) on a folder of images.

    dalle-train-vae --image_folder /path/to/images

The folder is searched recursively, so a flat folder and class subfolders both work. The Gumbel-softmax
temperature anneals with the step, to a floor (computed from the step, not compounded, so it resumes exactly):

    temperature(step) = max(starting_temp * exp(-anneal_rate * step), temp_min)

as in the DALL-E paper (https://arxiv.org/abs/2102.12092, appendix A.2). Every --sample_every_n_steps the run
logs originals above their reconstructions (from the most likely codes) and how many codes the batch uses.
Checkpoints go to OUTPUT_DIR/step-XXXXXXXX/; `dalle-train --vae_path OUTPUT_DIR` takes the newest.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from dalle_pytorch.cli.common import choose_seed, fit, resume_dir, run_main, seed_everything
from dalle_pytorch.cli.flags import add_arg, add_training_args
from dalle_pytorch.cli.runs import settle_output_dir
from dalle_pytorch.data.text_image import (
    IMAGE_EXTENSIONS,
    SAMPLE_ERRORS,
    SkipLog,
    open_image,
    preprocess_image,
    reason_for,
)
from dalle_pytorch.models.vae import DiscreteVAE
from dalle_pytorch.training.data_order import IndexedBatches
from dalle_pytorch.training.distributed import init_distributed, shutdown_distributed
from dalle_pytorch.training.run_logging import RunLogger
from dalle_pytorch.training.trainer import TrainResult

PROG = "dalle-train-vae"


class ImageFolderDataset(Dataset):
    """Every image under `folder` (recursively; hidden files skipped) as a float tensor
    (c, image_size, image_size) in [0, 1], c = 4 when `transparent` else 3, after a random square crop
    covering at least `resize_ratio` of the image. Unreadable images are warned about once and replaced by
    the next readable one."""

    def __init__(
        self, folder: str | os.PathLike, image_size: int, resize_ratio: float = 1.0, transparent: bool = False
    ):
        root = Path(folder)
        if not root.is_dir():
            raise ValueError(f"--image_folder: {folder} is not a directory")
        paths = []
        for current, dirs, files in os.walk(root):
            dirs[:] = sorted(name for name in dirs if not name.startswith("."))
            paths += [
                Path(current, name)
                for name in sorted(files)
                if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS
            ]
        if not paths:
            raise ValueError(f"--image_folder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
        self.paths, self.image_size, self.resize_ratio, self.transparent = paths, image_size, resize_ratio, transparent
        self.skip_log = SkipLog()
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        for offset in range(len(self.paths)):
            position = (index + offset) % len(self.paths)
            if position in self._bad:
                continue
            try:
                image = open_image(self.paths[position])
            except SAMPLE_ERRORS as error:
                self._bad.add(position)
                self.skip_log.record(str(self.paths[position]), reason_for(error, "image"), str(error))
                continue
            return preprocess_image(image, self.image_size, self.resize_ratio, self.transparent)
        raise RuntimeError(f"no readable image among the {len(self.paths)} files")


def temperature_at(step: int, starting_temp: float, temp_min: float, anneal_rate: float) -> float:
    """Gumbel-softmax temperature of a step: exponential decay from starting_temp, floored at temp_min."""
    return max(starting_temp * math.exp(-anneal_rate * step), temp_min)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Train a discrete VAE that turns images into tokens.")
    data = parser.add_argument_group("data")
    add_arg(data, "--image_folder", required=True, help="folder of images, flat or in class subfolders")
    add_arg(data, "--image_size", type=int, default=128, help="side of the square training images (default: 128)")
    add_arg(
        data,
        "--random_resize_crop_lower_ratio",
        type=float,
        default=1.0,
        help="random square crops cover at least this fraction of each image (default: 1.0)",
    )
    add_arg(data, "--transparent", action="store_true", help="keep the alpha channel (RGBA, 4 channels)")

    model = parser.add_argument_group("model (ignored when resuming: the checkpoint has them)")
    add_arg(model, "--num_tokens", type=int, default=8192, help="codebook size (default: 8192)")
    add_arg(model, "--num_layers", type=int, default=3, help="downsamplings; the grid is image_size / 2**num_layers")
    add_arg(
        model, "--num_resnet_blocks", type=int, default=2, help="residual blocks in encoder and decoder (default: 2)"
    )
    add_arg(model, "--emb_dim", type=int, default=512, help="codebook vector size (default: 512)")
    add_arg(model, "--hidden_dim", type=int, default=256, help="convolution channels (default: 256)")
    add_arg(model, "--smooth_l1_loss", action="store_true", help="smooth L1 instead of MSE reconstruction loss")
    add_arg(model, "--kl_loss_weight", type=float, default=0.0, help="weight of the KL term to a uniform prior")
    add_arg(model, "--straight_through", action="store_true", help="hard one-hot samples, straight-through gradients")
    add_arg(model, "--reinmax", action="store_true", help="ReinMax gradient estimator (arXiv 2304.08612)")

    anneal = parser.add_argument_group("temperature annealing")
    add_arg(anneal, "--starting_temp", type=float, default=1.0, help="temperature at step 0 (default: 1.0)")
    add_arg(anneal, "--temp_min", type=float, default=0.5, help="the temperature never goes below this (default: 0.5)")
    add_arg(anneal, "--anneal_rate", type=float, default=1e-6, help="exponential decay rate per step (default: 1e-6)")
    add_arg(anneal, "--num_images_save", type=int, default=4, help="reconstructions logged each time (default: 4)")
    add_training_args(parser, output_dir="vae", epochs=20, batch_size=8, learning_rate=1e-3, lr_schedule="exponential")
    return parser


def build_vae(args: argparse.Namespace) -> DiscreteVAE:
    channels = 4 if args.transparent else 3
    return DiscreteVAE(
        image_size=args.image_size, num_tokens=args.num_tokens, codebook_dim=args.emb_dim, num_layers=args.num_layers,
        num_resnet_blocks=args.num_resnet_blocks, hidden_dim=args.hidden_dim, channels=channels,
        smooth_l1_loss=args.smooth_l1_loss, temperature=args.starting_temp, straight_through=args.straight_through,
        reinmax=args.reinmax, kl_div_loss_weight=args.kl_loss_weight,
        normalization=((0.5,) * channels, (0.5,) * channels),
    )  # fmt: skip


def run(argv: list[str] | None = None) -> TrainResult:
    """Parses `argv`, trains, and returns the result (the console script is `main`)."""
    args = build_parser().parse_args(argv)
    ctx = init_distributed(args.device)
    try:
        checkpoint = resume_dir(args, expect="DiscreteVAE")
        settle_output_dir(args, PROG, checkpoint)
        seed = choose_seed(args, checkpoint)
        seed_everything(seed)
        vae = DiscreteVAE.from_pretrained(checkpoint) if checkpoint is not None else build_vae(args)
        dataset = ImageFolderDataset(
            args.image_folder, vae.image_size, args.random_resize_crop_lower_ratio, transparent=vae.channels == 4
        )
        data = IndexedBatches(dataset, batch_size=args.batch_size, seed=seed, ctx=ctx, num_workers=args.num_workers)

        def loss_fn(model: nn.Module, images: torch.Tensor, step: int):
            temp = temperature_at(step, args.starting_temp, args.temp_min, args.anneal_rate)
            return model(images, return_loss=True, temp=temp), {"temperature": temp}

        def on_sample(step: int, model: DiscreteVAE, images: torch.Tensor, logger: RunLogger) -> None:
            model.eval()
            codes = model.get_codebook_indices(images)
            used = codes.unique().numel()
            logger.log(step, {"codebook_used": used, "codebook_usage": used / model.num_tokens})
            count = min(args.num_images_save, len(images))
            reconstructions = model.decode(codes[:count]).clamp(0, 1)
            logger.log_images(step, "reconstructions", torch.cat([images[:count], reconstructions]), nrow=count)

        return fit(
            PROG, args, vae, data, loss_fn, ctx, seed=seed, on_sample=on_sample, resume_from=checkpoint,
            flag_aliases={"emb_dim": "codebook_dim", "kl_loss_weight": "kl_div_loss_weight"},
        )  # fmt: skip
    finally:
        shutdown_distributed()


def main(argv: list[str] | None = None) -> None:
    run_main(PROG, run, argv)


if __name__ == "__main__":
    main()
