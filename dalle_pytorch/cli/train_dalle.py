"""`dalle-train`: train DALLE on image-caption pairs.

    dalle-train --vae_path ./vae --image_text_folder /path/to/data       # a VAE from dalle-train-vae
    dalle-train --dalle_path ./dalle --image_text_folder /path/to/data   # resume
    dalle-train --image_text_folder /path/to/data                        # OpenAI's VAE
    dalle-train --taming --image_text_folder /path/to/data               # a VQGAN

The data is a folder of images with same-named .txt captions (`dalle_pytorch.data.text_image.TextImageDataset`), or
WebDataset .tar shards with --wds. The VAE is frozen; --precompute_image_tokens runs it once over the
data instead of at every step. Every --sample_every_n_steps a sample image is logged with its caption.
Checkpoints (OUTPUT_DIR/step-XXXXXXXX/) hold the DALLE with its VAE in `vae/`; `--dalle_path OUTPUT_DIR`
resumes from the newest, exactly (same data order, same weights as an uninterrupted run).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dalle_pytorch.cli.common import (
    add_tokenizer_args,
    add_vae_args,
    build_tokenizer,
    choose_seed,
    fit,
    load_model,
    load_vae,
    resolve_checkpoint,
    resume_dir,
    run_main,
    seed_everything,
    tokenizer_spec_for,
)
from dalle_pytorch.cli.flags import add_arg, add_option_flags, add_training_args, options_from_args
from dalle_pytorch.cli.runs import settle_output_dir
from dalle_pytorch.data.text_image import TextImageDataset
from dalle_pytorch.models.dalle import DALLE
from dalle_pytorch.models.dalle_config import DALLEConfig
from dalle_pytorch.training.data_order import IndexedBatches, SeededDataset, StreamingBatches, derive_seed
from dalle_pytorch.training.distributed import (
    DistributedContext,
    gather_strided,
    init_distributed,
    shutdown_distributed,
)
from dalle_pytorch.training.run_logging import RunLogger
from dalle_pytorch.training.state import TRAINING_STATE_NAME
from dalle_pytorch.training.trainer import TrainResult

PROG = "dalle-train"
DEFAULT_WDS_KEYS = "jpg;png;jpeg;webp,txt"
# DALLEConfig fields whose flag has another name (the original's), and flag defaults other than the field's
MODEL_FLAGS = {"stable": "stable_softmax"}
MODEL_DEFAULTS = {"dim": 512, "depth": 2}
VAE_FLAGS = (
    "vae_path",
    "taming",
    "vqgan_model_path",
    "vqgan_config_path",
    "openai_encoder_path",
    "openai_decoder_path",
)


def _name_list(text: str) -> list[str]:
    """'full, axial_row' -> ['full', 'axial_row']."""
    return [item.strip() for item in text.split(",")]


def _id_list(text: str) -> list[int | str]:
    """'0,1,0,1' -> [0, 1, 0, 1]; non-numeric ids stay strings."""
    return [int(item) if item.strip().lstrip("-").isdigit() else item.strip() for item in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Train DALLE on image-caption pairs.")
    data = parser.add_argument_group("data")
    add_arg(
        data,
        "--image_text_folder",
        required=True,
        help="folder of images with same-named .txt captions; with --wds: shard files, a folder of shards, "
        "a brace pattern (data/{000..099}.tar) or a URL",
    )
    add_arg(
        data,
        "--wds",
        nargs="?",
        const=DEFAULT_WDS_KEYS,
        default=None,
        help=f"read WebDataset shards; optional IMAGE_KEYS,CAPTION_KEYS (default: {DEFAULT_WDS_KEYS})",
    )
    add_arg(data, "--truncate_captions", action="store_true", help="cut captions longer than --text_seq_len")
    add_arg(
        data,
        "--random_resize_crop_lower_ratio",
        type=float,
        default=0.75,
        help="random square crops cover at least this fraction of each image (default: 0.75)",
    )
    add_arg(
        data,
        "--precompute_image_tokens",
        action="store_true",
        help="encode every image once before training (one crop and caption per image) instead of every step",
    )
    add_tokenizer_args(parser)
    add_vae_args(parser)
    parser.add_argument_group("resume").add_argument(
        "--dalle_path",
        "--dalle-path",
        dest="dalle_path",
        default=None,
        help="a DALLE model folder or training output folder: resume (or fine-tune when it has no training state)",
    )

    model = parser.add_argument_group("model (ignored with --dalle_path: the checkpoint has them)")
    add_option_flags(
        model,
        DALLEConfig,
        flags=MODEL_FLAGS,
        defaults=MODEL_DEFAULTS,
        parsers={"attn_types": _name_list, "shared_attn_ids": _id_list, "shared_ff_ids": _id_list},
        skip=("num_text_tokens",),  # the tokenizer's vocabulary size
    )
    add_arg(
        model,
        "--null_cond_prob",
        type=float,
        default=0.0,
        help="drop the caption with this probability, for classifier-free guidance (--cond_scale) (default: 0)",
    )
    add_training_args(parser, output_dir="dalle", epochs=20, batch_size=4, learning_rate=3e-4, clip_grad_norm=0.5)
    parser.add_argument(
        "--dalle_output_file_name",
        "--dalle-output-file-name",
        dest="output_dir",
        help="same as --output_dir (original name)",
    )
    return parser


def build_dalle(args: argparse.Namespace, vae: nn.Module, num_text_tokens: int) -> DALLE:
    config = options_from_args(DALLEConfig, args, flags=MODEL_FLAGS, num_text_tokens=num_text_tokens)
    return DALLE(vae=vae, config=config)


def precompute_image_tokens(
    dataset: Dataset, dalle: DALLE, *, seed: int, batch_size: int, ctx: DistributedContext, num_workers: int = 0
) -> TensorDataset:
    """Reads every sample once (crop and caption drawn with a seed of its own) and encodes its image:
    a dataset of (text tokens (text_seq_len,), image codes (image_seq_len,)). Each rank encodes every
    world_size-th sample, then the ranks share their codes."""
    keys = [(i, derive_seed("precompute", seed, i)) for i in range(ctx.rank, len(dataset), ctx.world_size)]
    loader = DataLoader(SeededDataset(dataset), batch_size=batch_size, sampler=keys, num_workers=num_workers)
    texts = [torch.zeros(0, dalle.text_seq_len, dtype=torch.long)]
    codes = [torch.zeros(0, dalle.image_seq_len, dtype=torch.long, device=ctx.device)]
    with torch.no_grad():
        for _, (text, images) in loader:
            texts.append(text)
            codes.append(dalle.vae.get_codebook_indices(images.to(ctx.device)).long())
    all_texts = gather_strided(torch.cat(texts).to(ctx.device), len(dataset), ctx)
    all_codes = gather_strided(torch.cat(codes), len(dataset), ctx)
    return TensorDataset(all_texts, all_codes)


def build_data(args: argparse.Namespace, dalle: DALLE, tokenizer: Any, seed: int, ctx: DistributedContext) -> Any:
    options = dict(
        text_len=dalle.text_seq_len,
        image_size=dalle.image_size,
        tokenizer=tokenizer,
        truncate_captions=args.truncate_captions,
        resize_ratio=args.random_resize_crop_lower_ratio,
        transparent=dalle.channels == 4,
    )
    if args.wds:
        if args.precompute_image_tokens:
            raise ValueError("--precompute_image_tokens needs a folder, not --wds shards")
        from dalle_pytorch.data.webdata import webdataset_loader

        image_key, _, caption_key = args.wds.partition(",")
        loader = webdataset_loader(
            args.image_text_folder,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            image_key=image_key or "jpg;png;jpeg;webp",
            caption_key=caption_key or "txt",
            seed=seed,
            **options,
        )
        return StreamingBatches(loader, ctx=ctx)
    dataset: Dataset = TextImageDataset(args.image_text_folder, **options)
    dataset.check()  # fails now, not mid-run, when no sample is usable (e.g. captions needing truncation)
    if args.precompute_image_tokens:
        dataset = precompute_image_tokens(
            dataset, dalle, seed=seed, batch_size=args.batch_size, ctx=ctx, num_workers=args.num_workers
        )
    return IndexedBatches(dataset, batch_size=args.batch_size, seed=seed, ctx=ctx, num_workers=args.num_workers)


def run(argv: list[str] | None = None) -> TrainResult:
    """Parses `argv`, trains, and returns the result (the console script is `main`)."""
    args = build_parser().parse_args(argv)
    ctx = init_distributed(args.device)
    try:
        if args.dalle_path is not None and args.resume is not None:
            raise ValueError("give --dalle_path or --resume, not both")
        start = (
            resolve_checkpoint(args.dalle_path, "--dalle_path", expect="DALLE", training_state=True)
            if args.dalle_path
            else resume_dir(args, expect="DALLE")
        )
        resuming = start is not None and (start / TRAINING_STATE_NAME).is_file()
        settle_output_dir(args, PROG, start if resuming else None)
        seed = choose_seed(args, start if resuming else None)
        seed_everything(seed)
        spec = tokenizer_spec_for(args, start)
        tokenizer = build_tokenizer(spec)
        if start is not None:
            if any(getattr(args, flag) for flag in VAE_FLAGS):
                print(f"{PROG}: note: the VAE comes from the checkpoint; the VAE flags are ignored", file=sys.stderr)
            dalle = load_model(start, DALLE, "--dalle_path")
        else:
            dalle = build_dalle(args, load_vae(args), tokenizer.vocab_size)
        if tokenizer.vocab_size > dalle.num_text_tokens:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the DALLE only "
                f"{dalle.num_text_tokens}: use the tokenizer it was trained with (--bpe_path)"
            )
        dalle.to(ctx.device)
        data = build_data(args, dalle, tokenizer, seed, ctx)

        def loss_fn(model: nn.Module, batch: Any, step: int) -> torch.Tensor:
            text, images = batch
            return model(text, images, return_loss=True, null_cond_prob=args.null_cond_prob)

        def on_sample(step: int, model: DALLE, batch: Any, logger: RunLogger) -> None:
            text = batch[0][:1]
            generator = torch.Generator(device=ctx.device).manual_seed(derive_seed("sample", seed, step))
            image = model.generate_images(text, filter_thres=0.9, generator=generator)
            caption = tokenizer.decode([int(t) for t in text[0] if t != 0])
            logger.log_images(step, "samples", image, [caption])

        return fit(
            PROG,
            args,
            dalle,
            data,
            loss_fn,
            ctx,
            seed=seed,
            on_sample=on_sample,
            resume_from=start if resuming else None,
            flag_aliases={flag: field for field, flag in MODEL_FLAGS.items()},
            tokenizer=spec,
            resumed_from=str(start) if start is not None else None,
        )
    finally:
        shutdown_distributed()


def main(argv: list[str] | None = None) -> None:
    run_main(PROG, run, argv)


if __name__ == "__main__":
    main()
