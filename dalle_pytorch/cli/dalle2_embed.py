"""`dalle2-embed`: CLIP embeddings of image-text pairs, computed once for training DALL-E 2's prior and decoder.

    dalle2-embed --clip-path ./clip --image-folder ./data --output-dir ./embeddings
    dalle2-embed --clip-path ./clip --wds 'shards/{000..099}.tar' --output-dir ./embeddings --shard-size 50000

Writes `shard-XXXXX.safetensors` files (image_embed, text_embed and the caption's token ids) and an
`index.json` into --output-dir; `dalle_pytorch.data.embeddings.ClipEmbeddingsDataset` reads them back.
Running the same command again after an interruption continues after the last whole shard. Images are
cropped to a square at a random place (the largest square by default, smaller ones with --resize-ratio
below 1) and resized to CLIP's image size, and one caption line is chosen per image; both are fixed by
--seed, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dalle_pytorch.cli.common import (
    add_tokenizer_args,
    build_tokenizer,
    check_tokenizer_fits,
    resolve_checkpoint,
    run_main,
    tokenizer_spec_for,
    write_args_json,
)
from dalle_pytorch.cli.flags import add_arg
from dalle_pytorch.data.embeddings import precompute_clip_embeddings
from dalle_pytorch.data.text_image import TextImageDataset
from dalle_pytorch.models.clip import CLIP
from dalle_pytorch.training.distributed import resolve_device

PROG = "dalle2-embed"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Embed image-text pairs with a CLIP into sharded safetensors files."
    )
    add_arg(parser, "--clip_path", required=True, help="a CLIP model folder or a dalle-train-clip output folder")
    source = parser.add_mutually_exclusive_group(required=True)
    add_arg(source, "--image_folder", default=None, help="a folder of images with same-named .txt captions")
    add_arg(source, "--wds", default=None, help="WebDataset .tar shards: a file, a folder, a brace pattern or a URL")
    add_arg(parser, "--image_key", default="jpg;png;jpeg;webp", help="with --wds: image extensions, ';'-separated")
    add_arg(parser, "--caption_key", default="txt", help="with --wds: caption extensions, ';'-separated")
    add_arg(parser, "--output_dir", required=True, help="where the shards and index.json go")
    add_arg(parser, "--shard_size", type=int, default=10_000, help="pairs per shard file (default: 10000)")
    add_arg(parser, "--batch_size", type=int, default=64, help="pairs embedded at once (default: 64)")
    add_arg(
        parser,
        "--resize_ratio",
        type=float,
        default=1.0,
        help="smallest fraction of the image area a crop keeps; 1 takes the largest square (default: 1)",
    )
    add_arg(parser, "--truncate_captions", action="store_true", help="cut captions longer than CLIP's text length")
    add_arg(parser, "--no_text_tokens", action="store_true", help="do not store the captions' token ids")
    add_arg(
        parser,
        "--text_encodings",
        action="store_true",
        help="also store CLIP's per-token text features and their mask (for a prior that attends to them)",
    )
    add_arg(parser, "--seed", type=int, default=0, help="seed of the crops and caption choices (default: 0)")
    add_arg(parser, "--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, mps")
    add_tokenizer_args(parser)
    return parser


def run(argv: list[str] | None = None) -> Path:
    """Embeds the pairs; returns the output folder (the console script is `main`)."""
    args = build_parser().parse_args(argv)
    checkpoint = resolve_checkpoint(args.clip_path, "--clip_path")
    clip = CLIP.from_pretrained(checkpoint, map_location=resolve_device(args.device))
    spec = tokenizer_spec_for(args, checkpoint)
    tokenizer = build_tokenizer(spec)
    check_tokenizer_fits(tokenizer, clip, "CLIP")
    options = dict(
        text_len=clip.text_seq_len, image_size=clip.image_size, tokenizer=tokenizer,
        truncate_captions=args.truncate_captions, resize_ratio=args.resize_ratio,
    )  # fmt: skip
    if args.image_folder is not None:
        dataset = TextImageDataset(args.image_folder, **options)
        source = str(Path(args.image_folder).resolve())
    else:
        from dalle_pytorch.data.webdata import TextImageWebDataset  # webdataset is an optional extra

        dataset = TextImageWebDataset(
            args.wds, image_key=args.image_key, caption_key=args.caption_key, shuffle_buffer=0,
            shuffle_shards=False, rank=0, world_size=1, **options,
        )  # fmt: skip
        source = args.wds
    output_dir = precompute_clip_embeddings(
        clip, dataset, args.output_dir, shard_size=args.shard_size, batch_size=args.batch_size,
        save_text_tokens=not args.no_text_tokens, save_text_encodings=args.text_encodings, seed=args.seed,
        source=source,
    )  # fmt: skip
    write_args_json(output_dir, PROG, args, clip_checkpoint=str(checkpoint), tokenizer=spec)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    run_main(PROG, run, argv)


if __name__ == "__main__":
    main()
