"""`dalle-train-clip`: train the CLIP that reranks generated images, on the same image-caption data.

    dalle-train-clip --image_text_folder /path/to/data --bpe_path tokenizer.json
    dalle-generate --dalle_path ./dalle --clip_path ./clip --text '...' --keep_top 4

The loss is CLIP's symmetric contrastive loss over each process's batch (Radford et al. 2021,
https://arxiv.org/abs/2103.00020). Every --sample_every_n_steps the run logs how often an image's own
caption is the most similar one in the batch (batch_retrieval_accuracy). Use the tokenizer the DALLE was
trained with, so that dalle-generate can give both models the same tokens.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from dalle_pytorch.cli.common import (
    add_tokenizer_args,
    build_tokenizer,
    choose_seed,
    fit,
    resolve_checkpoint,
    resume_dir,
    run_main,
    seed_everything,
    tokenizer_spec_for,
)
from dalle_pytorch.cli.flags import add_arg, add_training_args
from dalle_pytorch.cli.runs import settle_output_dir
from dalle_pytorch.data.text_image import TextImageDataset
from dalle_pytorch.models.clip import CLIP
from dalle_pytorch.training.data_order import IndexedBatches, StreamingBatches
from dalle_pytorch.training.distributed import init_distributed, shutdown_distributed
from dalle_pytorch.training.run_logging import RunLogger
from dalle_pytorch.training.state import TRAINING_STATE_NAME
from dalle_pytorch.training.trainer import TrainResult

PROG = "dalle-train-clip"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Train a CLIP to rank generated images by their text.")
    data = parser.add_argument_group("data")
    add_arg(
        data,
        "--image_text_folder",
        required=True,
        help="folder of images with same-named .txt captions; with --wds: WebDataset shards",
    )
    add_arg(
        data,
        "--wds",
        nargs="?",
        const="jpg;png;jpeg;webp,txt",
        default=None,
        help="read WebDataset shards; optional IMAGE_KEYS,CAPTION_KEYS",
    )
    add_arg(data, "--truncate_captions", action="store_true", help="cut captions longer than --text_seq_len")
    add_arg(
        data,
        "--random_resize_crop_lower_ratio",
        type=float,
        default=0.75,
        help="random square crops cover at least this fraction of each image (default: 0.75)",
    )
    add_tokenizer_args(parser)
    parser.add_argument_group("resume").add_argument(
        "--clip_path",
        "--clip-path",
        dest="clip_path",
        default=None,
        help="a CLIP model folder or training output folder: resume (or fine-tune when it has no training state)",
    )

    model = parser.add_argument_group("model (ignored with --clip_path: the checkpoint has them)")
    add_arg(model, "--dim_text", type=int, default=512, help="text transformer width (default: 512)")
    add_arg(model, "--dim_image", type=int, default=512, help="image transformer width (default: 512)")
    add_arg(model, "--dim_latent", type=int, default=512, help="shared latent size (default: 512)")
    add_arg(model, "--text_enc_depth", type=int, default=6, help="text transformer layers (default: 6)")
    add_arg(model, "--text_seq_len", type=int, default=256, help="text tokens per caption (default: 256)")
    add_arg(model, "--text_heads", type=int, default=8, help="text attention heads (default: 8)")
    add_arg(model, "--visual_enc_depth", type=int, default=6, help="image transformer layers (default: 6)")
    add_arg(model, "--visual_heads", type=int, default=8, help="image attention heads (default: 8)")
    add_arg(model, "--visual_image_size", type=int, default=256, help="side of the training images (default: 256)")
    add_arg(model, "--visual_patch_size", type=int, default=32, help="side of the image patches (default: 32)")
    add_training_args(parser, output_dir="clip", epochs=20, batch_size=32, learning_rate=3e-4)
    return parser


def build_clip(args: argparse.Namespace, num_text_tokens: int) -> CLIP:
    return CLIP(
        dim_text=args.dim_text, dim_image=args.dim_image, dim_latent=args.dim_latent, num_text_tokens=num_text_tokens,
        text_enc_depth=args.text_enc_depth, text_seq_len=args.text_seq_len, text_heads=args.text_heads,
        visual_enc_depth=args.visual_enc_depth, visual_heads=args.visual_heads,
        visual_image_size=args.visual_image_size, visual_patch_size=args.visual_patch_size,
    )  # fmt: skip


def run(argv: list[str] | None = None) -> TrainResult:
    """Parses `argv`, trains, and returns the result (the console script is `main`)."""
    args = build_parser().parse_args(argv)
    ctx = init_distributed(args.device)
    try:
        if args.clip_path is not None and args.resume is not None:
            raise ValueError("give --clip_path or --resume, not both")
        start = (
            resolve_checkpoint(args.clip_path, "--clip_path", expect="CLIP", training_state=True)
            if args.clip_path
            else resume_dir(args, expect="CLIP")
        )
        resuming = start is not None and (start / TRAINING_STATE_NAME).is_file()
        settle_output_dir(args, PROG, start if resuming else None)
        seed = choose_seed(args, start if resuming else None)
        seed_everything(seed)
        spec = tokenizer_spec_for(args, start)
        tokenizer = build_tokenizer(spec)
        clip = CLIP.from_pretrained(start) if start is not None else build_clip(args, tokenizer.vocab_size)
        if tokenizer.vocab_size > clip.num_text_tokens:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the CLIP only {clip.num_text_tokens}"
            )
        options = dict(
            text_len=clip.text_seq_len,
            image_size=clip.image_size,
            tokenizer=tokenizer,
            truncate_captions=args.truncate_captions,
            resize_ratio=args.random_resize_crop_lower_ratio,
            transparent=clip.channels == 4,
        )
        if args.wds:
            from dalle_pytorch.data.webdata import webdataset_loader

            image_key, _, caption_key = args.wds.partition(",")
            loader = webdataset_loader(
                args.image_text_folder,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                image_key=image_key,
                caption_key=caption_key or "txt",
                seed=seed,
                **options,
            )
            data: Any = StreamingBatches(loader, ctx=ctx)
        else:
            dataset = TextImageDataset(args.image_text_folder, **options)
            dataset.check()  # fails now, not mid-run, when no sample is usable
            data = IndexedBatches(dataset, batch_size=args.batch_size, seed=seed, ctx=ctx, num_workers=args.num_workers)

        def loss_fn(model: nn.Module, batch: Any, step: int) -> torch.Tensor:
            text, images = batch
            return model(text, images, return_loss=True)

        def on_sample(step: int, model: CLIP, batch: Any, logger: RunLogger) -> None:
            text, images = batch
            model.eval()
            similarity = model.embed_text(text) @ model.embed_image(images).t()  # (b text, b image)
            hits = similarity.argmax(dim=1) == torch.arange(len(text), device=similarity.device)
            logger.log(step, {"batch_retrieval_accuracy": hits.float().mean().item()})

        return fit(
            PROG,
            args,
            clip,
            data,
            loss_fn,
            ctx,
            seed=seed,
            on_sample=on_sample,
            resume_from=start if resuming else None,
            tokenizer=spec,
            resumed_from=str(start) if start is not None else None,
        )
    finally:
        shutdown_distributed()


def main(argv: list[str] | None = None) -> None:
    run_main(PROG, run, argv)


if __name__ == "__main__":
    main()
