"""`dalle2-generate`: images from text with a DALL-E 2 prior and decoder; variations of an image; inpainting.

    dalle2-generate --prior-path ./prior --decoder-path ./decoder --text 'a red cube|a blue ball' --num-images 8
    dalle2-generate --dalle2-path ./dalle2 --text 'a red cube' --cond-scale 3 --sample-steps 50
    dalle2-generate --decoder-path ./decoder --variations-of photo.png
    dalle2-generate --prior-path ./prior --decoder-path ./decoder --inpaint photo.png --mask mask.png --text 'a cat'

The prior samples a CLIP image embedding for each prompt and the decoder draws it (Ramesh et al. 2022,
https://arxiv.org/abs/2204.06125). --variations-of draws new images sharing the CLIP image embedding of the
given image (no prior needed). --inpaint keeps the pixels of the image where the mask image is black and
generates those where it is white, guided by the prompt (or, without one, by the image's own embedding).

--prior-path and --decoder-path take a model folder or a training output folder, whose newest checkpoint
is used, with its moving-average weights (`ema/`) when it has them (--no-ema: the raw weights). Image n of
a prompt is drawn with its own generator seeded with --seed + n, so the images do not depend on --batch-size.

For each prompt (or image): OUTPUTS_DIR/<name>/0.png, 1.png, ..., grid.png and metadata.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from dalle_pytorch.cli.common import add_tokenizer_args, build_tokenizer, run_main, write_args_json
from dalle_pytorch.cli.dalle2_options import tokenizer_spec_near, weights_folder
from dalle_pytorch.cli.flags import add_arg, add_switch
from dalle_pytorch.cli.generate import prompt_folder, read_prompts
from dalle_pytorch.cli.runs import describe_run, run_contents, run_tool
from dalle_pytorch.data.images import image_grid, load_image, save_image
from dalle_pytorch.diffusion.dalle2 import DALLE2
from dalle_pytorch.diffusion.decoder import Decoder
from dalle_pytorch.diffusion.prior import DiffusionPrior
from dalle_pytorch.io.atomic import atomic_write_file
from dalle_pytorch.training.distributed import resolve_device

PROG = "dalle2-generate"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Generate images with a DALL-E 2 prior and decoder.")
    models = parser.add_argument_group("models")
    add_arg(models, "--dalle2_path", default=None, help="a DALLE2 model folder (prior/ and decoder/)")
    add_arg(models, "--prior_path", default=None, help="a prior model folder or dalle2-train-prior output folder")
    add_arg(models, "--decoder_path", default=None, help="a decoder model folder or dalle2-train-decoder output folder")
    add_switch(models, "--ema", True, "use the moving-average weights of a training checkpoint when it has them")
    add_tokenizer_args(parser)
    what = parser.add_argument_group("what to draw")
    add_arg(what, "--text", default=None, help="prompt(s), separated by '|'")
    add_arg(what, "--text_file", default=None, help="a UTF-8 file with one prompt per line")
    add_arg(what, "--variations_of", default=None, help="an image file: draw variations of it (needs no prior)")
    add_arg(what, "--inpaint", default=None, help="an image file to fill in where --mask is white")
    add_arg(what, "--mask", default=None, help="with --inpaint: an image, white where new pixels are generated")
    sampling = parser.add_argument_group("sampling")
    add_arg(sampling, "--num_images", type=int, default=4, help="images per prompt or image (default: 4)")
    add_arg(sampling, "--batch_size", type=int, default=4, help="images made at once; does not change them (4)")
    add_arg(sampling, "--seed", type=int, default=0, help="image n uses seed + n (default: 0)")
    add_arg(sampling, "--cond_scale", type=float, default=1.0, help="the decoder's guidance, >= 1 (default: 1)")
    add_arg(sampling, "--prior_cond_scale", type=float, default=1.0, help="the prior's guidance, >= 1 (default: 1)")
    add_arg(sampling, "--sample_steps", type=int, default=None, help="the decoder's DDIM steps (default: the model's)")
    add_arg(sampling, "--prior_sample_steps", type=int, default=None, help="the prior's DDIM steps (default: its own)")
    add_arg(sampling, "--num_samples_per_batch", type=int, default=2, help="prior candidates per image (default: 2)")
    add_arg(parser, "--outputs_dir", default="outputs", help="where the output folders go (default: outputs)")
    add_arg(parser, "--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, mps")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    for name in ("num_images", "batch_size", "num_samples_per_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("sample_steps", "prior_sample_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("cond_scale", "prior_cond_scale"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1 (1 = no guidance), got {getattr(args, name)}")
    if args.dalle2_path is not None and (args.prior_path is not None or args.decoder_path is not None):
        raise ValueError("give --dalle2_path, or --prior_path and --decoder_path, not both")
    if args.dalle2_path is None and args.decoder_path is None:
        raise ValueError("give --decoder_path (and --prior_path for prompts), or --dalle2_path")
    if (args.inpaint is None) != (args.mask is None):
        raise ValueError("--inpaint and --mask go together: the image and the mask of what to generate")
    if args.variations_of is not None and args.inpaint is not None:
        raise ValueError("give --variations_of or --inpaint, not both")
    has_text = args.text is not None or args.text_file is not None
    if args.variations_of is not None and has_text:
        raise ValueError("--variations_of draws from the image alone: drop --text / --text_file")
    if args.variations_of is None and args.inpaint is None and not has_text:
        raise ValueError("nothing to draw: give --text (or --text_file), --variations_of IMAGE or --inpaint IMAGE")


def load_models(args: argparse.Namespace, device: torch.device) -> tuple[DiffusionPrior | None, Decoder, Path]:
    """The prior (None when not given) and decoder, and the folder whose args.json names the tokenizer."""
    if args.dalle2_path is not None:
        folder = Path(args.dalle2_path)
        dalle2 = DALLE2.from_pretrained(folder, map_location=device)
        return dalle2.prior, dalle2.decoder, folder
    decoder_folder = weights_folder(args.decoder_path, "--decoder_path", "Decoder", ema=args.ema)
    decoder = Decoder.from_pretrained(decoder_folder, map_location=device)
    if args.prior_path is None:
        return None, decoder, decoder_folder
    prior_folder = weights_folder(args.prior_path, "--prior_path", "DiffusionPrior", ema=args.ema)
    prior = DiffusionPrior.from_pretrained(prior_folder, map_location=device)
    if prior.clip is None:
        raise ValueError(f"--prior_path: {prior_folder} has no CLIP to read prompts; train it with --clip_path")
    if prior.image_embed_dim != decoder.unets[0].image_embed_dim:
        raise ValueError(
            f"the prior makes embeddings of width {prior.image_embed_dim}, the decoder reads "
            f"{decoder.unets[0].image_embed_dim}: they were trained with different CLIPs"
        )
    return prior, decoder, prior_folder


def run(argv: list[str] | None = None) -> list[Path]:
    """Generates; returns the output folders written (the console script is `main`)."""
    args = build_parser().parse_args(argv)
    _check_args(args)
    device = resolve_device(args.device)
    outputs_dir = Path(args.outputs_dir)
    if run_contents(outputs_dir) and run_tool(outputs_dir) != PROG:  # an earlier dalle2-generate's folder is fine
        raise ValueError(f"--outputs_dir {outputs_dir} holds a {describe_run(outputs_dir)}; give another folder")
    prior, decoder, tokenizer_source = load_models(args, device)
    check_guidance(args, prior, decoder)
    size = decoder.image_sizes[-1]
    has_text = args.text is not None or args.text_file is not None
    if has_text and prior is None:
        raise ValueError("prompts need a prior: give --prior_path (or --dalle2_path)")
    if not has_text and decoder.clip is None:
        raise ValueError("the decoder has no CLIP to embed the image: give --text and a prior")
    spec = tokenizer_spec_near(args, tokenizer_source)
    tokenizer = build_tokenizer(spec) if has_text else None
    source = args.variations_of or args.inpaint
    image = load_image(source, size).to(device) if source is not None else None
    known = None
    if args.mask is not None:
        # white (>= 0.5) marks the pixels to generate; the decoder wants True where a pixel is kept
        known = load_image(args.mask, size).to(device).mean(dim=1)[0] < 0.5  # (s, s)
    outputs_dir.mkdir(parents=True, exist_ok=True)
    write_args_json(outputs_dir, PROG, args, tokenizer=spec)
    settings = {key: getattr(args, key) for key in (
        "num_images", "cond_scale", "prior_cond_scale", "sample_steps", "prior_sample_steps", "num_samples_per_batch",
        "variations_of", "inpaint", "mask", "ema",
    )}  # fmt: skip
    prompts = read_prompts(args) if has_text else [None]
    taken: set[str] = set()
    folders = []
    for prompt in prompts:
        text = None
        if prompt is not None:
            text = tokenizer.tokenize([prompt], prior.clip_adapter.max_text_len, truncate_text=True).to(device)
        batches = []
        for start in range(0, args.num_images, args.batch_size):
            count = min(args.batch_size, args.num_images - start)
            generators = [torch.Generator(device=device).manual_seed(args.seed + start + i) for i in range(count)]
            batches.append(draw(args, prior, decoder, text, image, known, count, generators).float().cpu())
        name = (
            prompt if prompt is not None else f"{'variations' if args.variations_of else 'inpaint'}_{Path(source).stem}"
        )
        folder = prompt_folder(outputs_dir, name, taken)
        folders.append(write_images(folder, name, torch.cat(batches), args, settings))
        print(f"{PROG}: {args.num_images} images of {name!r}, grid.png and metadata.json -> {folder}")
    return folders


def check_guidance(args: argparse.Namespace, prior: DiffusionPrior | None, decoder: Decoder) -> None:
    """Guidance needs a model trained to predict without its condition (a drop rate above 0)."""
    if args.cond_scale != 1 and decoder.image_cond_drop_prob == 0:
        raise ValueError(
            f"--cond_scale {args.cond_scale} needs a decoder trained with --image_cond_drop_prob > 0; "
            "use --cond_scale 1"
        )
    if prior is not None and args.prior_cond_scale != 1 and prior.cond_drop_prob == 0:
        raise ValueError(
            f"--prior_cond_scale {args.prior_cond_scale} needs a prior trained with --cond_drop_prob > 0; "
            "use --prior_cond_scale 1"
        )


@torch.no_grad()
def draw(
    args: argparse.Namespace,
    prior: DiffusionPrior | None,
    decoder: Decoder,
    text: torch.Tensor | None,
    image: torch.Tensor | None,
    known: torch.Tensor | None,
    count: int,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """`count` images (count, 3, s, s) in [0, 1]: for the prompt `text` (1, n) when given, else from `image`."""
    text_kwargs: dict[str, Any] = {}
    if text is not None:
        text_embed, text_encodings, text_mask = prior.embed_text(text.expand(count, -1))
        image_embed = prior.sample(
            text_embed=text_embed, text_encodings=text_encodings, text_mask=text_mask,
            num_samples_per_batch=args.num_samples_per_batch, cond_scale=args.prior_cond_scale,
            generator=generators, sample_steps=args.prior_sample_steps,
        )  # fmt: skip
        # U-Nets that read text: a decoder with its own CLIP encodes the ids itself, one without takes the prior's
        text_kwargs = (
            dict(text_encodings=text_encodings, text_mask=text_mask)
            if decoder.clip_adapter is None
            else dict(text=text.expand(count, -1))
        )
    else:
        image_embed = decoder.embed_images(image).expand(count, -1)
    inpaint = {}
    if known is not None:
        inpaint = dict(inpaint_image=image.expand(count, -1, -1, -1), inpaint_mask=known.expand(count, -1, -1))
    return decoder.sample(
        image_embed, cond_scale=args.cond_scale, generator=generators, sample_steps=args.sample_steps,
        **text_kwargs, **inpaint,
    )  # fmt: skip


def write_images(folder: Path, name: str, images: torch.Tensor, args: argparse.Namespace, settings: dict) -> Path:
    """n.png for every image, grid.png and metadata.json in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, picture in enumerate(images):
        save_image(picture, folder / f"{index}.png")
    save_image(image_grid(images), folder / "grid.png")
    metadata = {
        "prompt": name,  # for --variations_of / --inpaint without text: the image's name
        "mode": "variations" if args.variations_of else "inpaint" if args.inpaint else "text",
        "dalle2_path": args.dalle2_path,
        "prior_path": args.prior_path,
        "decoder_path": args.decoder_path,
        "seed": args.seed,
        "settings": settings,
        "images": [{"file": f"{i}.png", "seed": args.seed + i} for i in range(len(images))],
    }
    text = json.dumps(metadata, indent=2, ensure_ascii=False) + "\n"
    atomic_write_file(folder / "metadata.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return folder


def main(argv: list[str] | None = None) -> None:
    run_main(PROG, run, argv)


if __name__ == "__main__":
    main()
