"""`dalle2-train-decoder`: train one U-Net of DALL-E 2's decoder (CLIP image embedding -> image).

    dalle2-train-decoder --unet-number 1 --image-text-folder ./data --clip-path ./clip --image-sizes 64,256 \\
        --output-dir ./decoder-unet1
    dalle2-train-decoder --unet-number 2 --image-text-folder ./data --decoder-path ./decoder-unet1 \\
        --output-dir ./decoder-unet2

The decoder is a cascade of U-Nets trained one at a time (Ramesh et al. 2022, https://arxiv.org/abs/2204.06125):
only U-Net --unet-number learns, the others (and the frozen CLIP) keep their weights byte for byte. A new
decoder is built from the model flags (or --config) around the CLIP of --clip-path; --decoder-path starts
from a trained one (a model folder, or a training output folder whose newest checkpoint is taken; point it
at `.../step-XXXXXXXX/ema` for the moving-average weights). The image embeddings are computed with the
decoder's CLIP, or read from --embeddings (dalle2-embed's output for the same folder).

Training runs on the library's `Trainer`: moving average of the weights (--ema-decay), gradient
accumulation, clipping, bf16/fp16 autocast with the NaN guard, warm-up and cosine schedules, exact resume
and torchrun DDP.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dalle_pytorch.cli.common import (
    add_tokenizer_args,
    build_tokenizer,
    choose_seed,
    fit,
    read_args_json,
    resolve_checkpoint,
    resume_dir,
    run_main,
    seed_everything,
)
from dalle_pytorch.cli.dalle2_options import (
    add_config_arg,
    int_list,
    load_clip,
    parse_with_config,
    tokenizer_spec_near,
)
from dalle_pytorch.cli.flags import add_arg, add_switch, add_training_args
from dalle_pytorch.cli.runs import settle_output_dir
from dalle_pytorch.data.embeddings import ClipEmbeddingsDataset, WithImageEmbeddings
from dalle_pytorch.data.text_image import TextImageDataset
from dalle_pytorch.diffusion.clip_adapter import as_clip_adapter
from dalle_pytorch.diffusion.decoder import Decoder
from dalle_pytorch.diffusion.unet import Unet
from dalle_pytorch.training.data_order import IndexedBatches
from dalle_pytorch.training.distributed import init_distributed, shutdown_distributed
from dalle_pytorch.training.trainer import TrainResult

PROG = "dalle2-train-decoder"
MODEL_FLAGS = {
    "image_sizes", "dim", "dim_mults", "cond_dim", "num_resnet_blocks", "resnet_groups", "attn_heads",
    "attn_dim_head", "dropout", "cond_on_text_encodings", "timesteps", "sample_timesteps", "image_cond_drop_prob",
    "text_cond_drop_prob", "beta_schedule", "lowres_noise_level",
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Train one U-Net of DALL-E 2's decoder.")
    add_arg(parser, "--unet_number", type=int, required=True, help="the U-Net to train, counted from 1")
    data = parser.add_argument_group("data")
    add_arg(data, "--image_text_folder", required=True, help="images with same-named .txt captions")
    add_arg(
        data,
        "--embeddings",
        default=None,
        help="the dalle2-embed output of the same folder: use its image embeddings instead of running the CLIP",
    )
    add_arg(data, "--truncate_captions", action="store_true", help="cut captions longer than the CLIP's text length")
    add_arg(
        data,
        "--random_resize_crop_lower_ratio",
        type=float,
        default=1.0,
        help="random square crops cover at least this fraction of each image (default: 1, the largest square)",
    )
    source = parser.add_argument_group("the decoder (one of)")
    add_arg(source, "--clip_path", default=None, help="a CLIP model folder or output folder: build a new decoder")
    add_arg(source, "--decoder_path", default=None, help="a trained decoder (model or output folder) to continue")
    add_tokenizer_args(parser)

    model = parser.add_argument_group("a new decoder (with --clip_path; ignored with --decoder_path or --resume)")
    add_config_arg(model)
    add_arg(model, "--image_sizes", type=int_list, default=(64,), help="each U-Net's image side, e.g. 64,256")
    add_arg(model, "--dim", type=int_list, default=(128,), help="each U-Net's base channels (one value: all)")
    add_arg(model, "--dim_mults", type=int_list, default=(1, 2, 4, 8), help="channel multiple per level")
    add_arg(model, "--cond_dim", type=int, default=None, help="width of the context tokens (default: dim)")
    add_arg(model, "--num_resnet_blocks", type=int, default=1, help="ResNet blocks per level (default: 1)")
    add_arg(model, "--resnet_groups", type=int, default=8, help="GroupNorm groups (default: 8)")
    add_arg(model, "--attn_heads", type=int, default=4, help="attention heads (default: 4)")
    add_arg(model, "--attn_dim_head", type=int, default=32, help="width of each head (default: 32)")
    add_arg(model, "--dropout", type=float, default=0.0, help="ResNet block dropout (default: 0)")
    add_switch(model, "--cond_on_text_encodings", False, "the U-Nets also read the CLIP's per-token text encodings")
    add_arg(model, "--timesteps", type=int, default=1000, help="length of the noise schedule (default: 1000)")
    add_arg(model, "--sample_timesteps", type=int, default=None, help="default DDIM steps (default: DDPM)")
    add_arg(model, "--image_cond_drop_prob", type=float, default=0.1, help="image embedding drop rate (default: 0.1)")
    add_arg(model, "--text_cond_drop_prob", type=float, default=0.5, help="text drop rate (default: 0.5)")
    add_arg(model, "--beta_schedule", choices=("cosine", "linear"), default="cosine", help="noise schedule")
    add_arg(model, "--lowres_noise_level", type=float, default=0.2, help="noise on the low-res condition (0.2)")
    add_training_args(parser, output_dir="decoder", epochs=20, batch_size=16, learning_rate=1e-4)
    return parser


def build_decoder(args: argparse.Namespace, clip: nn.Module) -> Decoder:
    """A new decoder of len(--image_sizes) U-Nets around `clip`."""
    # a --config file may give a single int where the flag takes a comma-separated list
    sizes, dims, mults = (
        tuple(v) if isinstance(v, list | tuple) else (v,) for v in (args.image_sizes, args.dim, args.dim_mults)
    )
    if len(dims) == 1:
        dims = dims * len(sizes)
    if len(dims) != len(sizes):
        raise ValueError(f"--dim needs one value or one per U-Net ({len(sizes)}), got {','.join(map(str, dims))}")
    adapter = as_clip_adapter(clip)
    unets = [
        Unet(
            dim=dim,
            image_embed_dim=adapter.dim_latent,
            cond_dim=args.cond_dim,
            dim_mults=mults,
            num_resnet_blocks=args.num_resnet_blocks,
            resnet_groups=args.resnet_groups,
            attn_heads=args.attn_heads,
            attn_dim_head=args.attn_dim_head,
            dropout=args.dropout,
            lowres_cond=number > 0,
            cond_on_text_encodings=args.cond_on_text_encodings,
            text_embed_dim=adapter.text_encoding_dim,
        )  # fmt: skip
        for number, dim in enumerate(dims)
    ]
    return Decoder(
        unet=tuple(unets), clip=clip, image_sizes=tuple(sizes), timesteps=args.timesteps,
        sample_timesteps=args.sample_timesteps, image_cond_drop_prob=args.image_cond_drop_prob,
        text_cond_drop_prob=args.text_cond_drop_prob, beta_schedule=args.beta_schedule,
        lowres_noise_level=args.lowres_noise_level,
    )  # fmt: skip


def only_unet_trains(decoder: Decoder, unet_number: int) -> Decoder:
    """Freezes every U-Net but `unet_number` (the CLIP and image tokenizers are frozen already)."""
    index = decoder._check_unet_number(unet_number)
    for i, unet in enumerate(decoder.unets):
        unet.requires_grad_(i == index)
    return decoder


def decoder_loss(unet_number: int) -> Callable[[nn.Module, Any, int], torch.Tensor]:
    """The loss of U-Net `unet_number` on a batch of (token ids, images[, image embeddings])."""

    def loss_fn(model: nn.Module, batch: Any, step: int) -> torch.Tensor:
        text, images, *stored = batch
        return model(images, unet_number, image_embed=stored[0] if stored else None, text=text)

    return loss_fn


def load_decoder(args: argparse.Namespace, start: Any) -> tuple[Decoder, dict[str, Any]]:
    """The decoder to train (resumed, continued or new) and its tokenizer's spec."""
    if start is not None:
        trained = read_args_json(start).get("args", {}).get("unet_number")
        if trained is not None and trained != args.unet_number:
            raise ValueError(f"--resume: {start} trained U-Net {trained}, not --unet_number {args.unet_number}")
    if start is not None or args.decoder_path is not None:
        folder = (
            start if start is not None else resolve_checkpoint(args.decoder_path, "--decoder_path", expect="Decoder")
        )
        decoder = Decoder.from_pretrained(folder)
        if decoder.clip is None:
            raise ValueError(f"{folder} is a decoder without a CLIP; this tool needs one to embed the images")
        return decoder, tokenizer_spec_near(args, folder)
    clip, _, spec = load_clip(args)
    return build_decoder(args, clip), spec


def run(argv: list[str] | None = None) -> TrainResult:
    """Parses `argv`, trains, and returns the result (the console script is `main`)."""
    parser = build_parser()
    args = parse_with_config(parser, argv, MODEL_FLAGS)
    if args.resume is None and (args.clip_path is None) == (args.decoder_path is None):
        parser.error("give --clip_path (a new decoder) or --decoder_path (a trained one), one of them")
    if args.resume is not None and args.decoder_path is not None:
        parser.error("give --decoder_path or --resume, not both")
    ctx = init_distributed(args.device)
    try:
        start = resume_dir(args, expect="Decoder")
        settle_output_dir(args, PROG, start)
        seed = choose_seed(args, start)
        seed_everything(seed)
        decoder, spec = load_decoder(args, start)
        only_unet_trains(decoder, args.unet_number)
        clip = decoder.clip_adapter
        dataset: Any = TextImageDataset(
            args.image_text_folder, text_len=clip.max_text_len, image_size=decoder.image_sizes[-1],
            tokenizer=build_tokenizer(spec), truncate_captions=args.truncate_captions,
            resize_ratio=args.random_resize_crop_lower_ratio,
        )  # fmt: skip
        dataset.check()
        if args.embeddings is not None:
            dataset = WithImageEmbeddings(dataset, ClipEmbeddingsDataset(args.embeddings))
        data = IndexedBatches(dataset, batch_size=args.batch_size, seed=seed, ctx=ctx, num_workers=args.num_workers)
        return fit(
            PROG, args, decoder, data, decoder_loss(args.unet_number), ctx, seed=seed, on_sample=None,
            resume_from=start, tokenizer=spec,
        )  # fmt: skip
    finally:
        shutdown_distributed()


def main(argv: list[str] | None = None) -> None:
    run_main(PROG, run, argv)


if __name__ == "__main__":
    main()
