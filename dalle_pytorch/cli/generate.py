"""`dalle-generate`: images from text with a trained DALLE, or by optimising a VAE's codes against a CLIP.

    dalle-generate --dalle_path ./dalle --text 'fireflies in a field under a full moon'
    dalle-generate --dalle_path ./dalle --text 'a red cube|a blue ball' --num_images 16 --clip_path ./clip --keep_top 4
    dalle-generate --method clip-guided --vae_path ./vae --clip_path ./clip --text 'a red cube' --steps 300

`--method clip-guided` needs no DALLE: see `dalle_pytorch.generation.clip_guided`.

Prompts are separated by '|' (or one per line in --text_file). Image n of a prompt is drawn with its own
random generator seeded with --seed + n, so the images do not depend on --batch_size. With --clip_path a
CLIP scores every image against its prompt and the best --keep_top are kept, best first.

For each prompt: OUTPUTS_DIR/<prompt>/0.png, 1.png, ..., grid.png and metadata.json (prompt, seeds,
settings, CLIP scores). The folder name is made from the prompt's letters, digits, '_' and '-' only, so no
prompt can name a path outside OUTPUTS_DIR.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import unicodedata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dalle_pytorch.cli.common import (
    add_tokenizer_args,
    build_tokenizer,
    check_tokenizer_fits,
    load_model,
    read_args_json,
    resolve_checkpoint,
    run_main,
    tokenizer_spec_for,
    write_args_json,
)
from dalle_pytorch.cli.flags import add_arg, add_option_flags, options_from_args
from dalle_pytorch.cli.runs import ARGS_NAME, describe_run, run_contents, run_tool
from dalle_pytorch.data.images import image_grid, load_image, save_image
from dalle_pytorch.generation.clip_guided import clip_guided_generate
from dalle_pytorch.io.atomic import atomic_write_file
from dalle_pytorch.io.checkpoint import load_pretrained
from dalle_pytorch.models.clip import CLIP
from dalle_pytorch.models.dalle import DALLE
from dalle_pytorch.models.generation import GenerationOptions
from dalle_pytorch.models.precision import DECODING_PRECISIONS
from dalle_pytorch.training.distributed import resolve_device
from dalle_pytorch.training.trainer import PRECISIONS

PROG = "dalle-generate"
# the flags of the GenerationOptions fields: --top_k is the original's name of filter_thres; the rest the CLI sets
OPTION_FLAGS = {"filter_thres": "top_k"}
NOT_FLAGS = ("use_cache", "truncate_text", "generator")
METHODS = ("dalle", "clip-guided")
MAX_NAME_BYTES = 100
_NOT_NAME_CHARACTER = re.compile(r"[^\w-]+")  # \w: letters and digits of any script, and '_'
_IMAGE_FILE = re.compile(r"\d+\.png")
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"{port}{i}" for port in ("COM", "LPT") for i in range(1, 10))}


def prompt_folder_name(prompt: str) -> str:
    """One safe path component for a prompt: runs of anything but letters, digits, '_' and '-' become
    '_' (so no '/', '\\', '.' or ':' survives), at most MAX_NAME_BYTES of UTF-8, never empty."""
    name = _NOT_NAME_CHARACTER.sub("_", unicodedata.normalize("NFKC", prompt)).strip("_-")
    name = name.encode("utf-8")[:MAX_NAME_BYTES].decode("utf-8", errors="ignore").rstrip("_-")
    if not name:
        return "prompt"
    return f"{name}_" if name.upper() in _WINDOWS_RESERVED else name


def prompt_folder(outputs_dir: Path, prompt: str, taken: set[str]) -> Path:
    """`outputs_dir/<name>` for `prompt`, made unique against `taken` and against folders of other prompts;
    refuses anything that would resolve outside `outputs_dir` (e.g. through a symlink)."""
    root = outputs_dir.resolve()
    base = prompt_folder_name(prompt)
    name, number = base, 2
    while name in taken or _holds_other_prompt(root / name, prompt):
        name, number = f"{base}-{number}", number + 1
    folder = (root / name).resolve()
    if folder.parent != root:
        raise ValueError(f"prompt {prompt!r} would write to {folder}, outside --outputs_dir {root}")
    taken.add(name)
    return folder


def _holds_other_prompt(folder: Path, prompt: str) -> bool:
    """True unless `folder` is free or a plain folder this tool wrote for the same prompt."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        return True
    if not folder.exists():
        return False
    if (folder / "metadata.json").is_symlink():
        return True  # not written by this tool, which replaces files instead of following links
    try:
        return json.loads((folder / "metadata.json").read_text(encoding="utf-8")).get("prompt") != prompt
    except (OSError, ValueError, AttributeError):
        return any(folder.iterdir())  # someone else's files: leave them alone


def read_prompts(args: argparse.Namespace) -> list[str]:
    if (args.text is None) == (args.text_file is None):
        raise ValueError("give the prompts with --text ('|'-separated) or --text_file (one per line)")
    raw = (
        args.text.split("|") if args.text is not None else Path(args.text_file).read_text(encoding="utf-8").splitlines()
    )
    prompts = [prompt.strip() for prompt in raw if prompt.strip()]
    if not prompts:
        raise ValueError("no prompt given: --text / --text_file holds only blanks")
    return prompts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Generate images from text with a trained DALLE.")
    add_arg(
        parser,
        "--method",
        choices=METHODS,
        default="dalle",
        help="dalle: sample a DALLE; clip-guided: optimise --vae_path's codes against --clip_path (default: dalle)",
    )
    add_arg(
        parser,
        "--dalle_path",
        default=None,
        help="a DALLE model folder or a dalle-train output folder (newest checkpoint); needed by --method dalle",
    )
    add_arg(parser, "--text", default=None, help="prompt(s), separated by '|'")
    add_arg(parser, "--text_file", default=None, help="a UTF-8 file with one prompt per line")
    add_arg(parser, "--num_images", type=int, default=8, help="images per prompt (default: 8)")
    add_arg(
        parser, "--batch_size", type=int, default=4, help="images generated at once; does not change them (default: 4)"
    )
    add_option_flags(
        parser,
        GenerationOptions,
        flags=OPTION_FLAGS,
        defaults={"filter_thres": 0.9},
        skip=NOT_FLAGS,
        parsers={"compile": str},
    )
    add_arg(parser, "--seed", type=int, default=0, help="image n of each prompt uses seed + n (default: 0)")
    add_arg(
        parser,
        "--clip_path",
        default=None,
        help="a CLIP model folder or dalle-train-clip output folder: ranks the images; guides --method clip-guided",
    )
    add_arg(parser, "--keep_top", type=int, default=None, help="with --clip_path: keep only the best N images")
    add_arg(parser, "--img", default=None, help="an image file whose top rows prime the generation")
    add_arg(parser, "--gentxt", action="store_true", help="first let DALLE complete each prompt, then draw it")
    add_arg(parser, "--outputs_dir", default="outputs", help="where the prompt folders go (default: outputs)")
    add_arg(parser, "--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, mps")
    add_arg(
        parser,
        "--precision",
        choices=list(PRECISIONS),
        default="fp32",
        help="fp32, bf16 or fp16 autocast (default: fp32)",
    )
    add_arg(parser, "--weights", choices=list(DECODING_PRECISIONS), default="fp32",
            help="decode with a copy of DALLE with fp32, bf16 or weight-only int8 weights (default: fp32)")  # fmt: skip
    guided = parser.add_argument_group("--method clip-guided")
    add_arg(guided, "--vae_path", default=None, help="a trained VAE: a model folder or a dalle-train-vae output folder")
    add_arg(guided, "--steps", type=int, default=200, help="optimisation steps (default: 200)")
    add_arg(guided, "--lr", type=float, default=0.1, help="Adam learning rate of the code logits (default: 0.1)")
    add_arg(guided, "--num_augments", type=int, default=8, help="augmented views CLIP scores per step (default: 8)")
    add_tokenizer_args(parser)
    return parser


def _check_args(args: argparse.Namespace) -> None:
    for name in ("num_images", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.keep_top is not None and (args.clip_path is None or args.keep_top < 1):
        raise ValueError("--keep_top needs --clip_path and must be >= 1")
    if args.num_init_img_tokens is not None and args.img is None:
        raise ValueError("--num_init_img_tokens needs --img")
    needed = ["dalle_path"] if args.method == "dalle" else ["vae_path", "clip_path"]
    for name in needed:
        if getattr(args, name) is None:
            raise ValueError(f"--method {args.method} needs --{name}")
    if args.method == "clip-guided" and (args.img is not None or args.gentxt):
        raise ValueError("--img and --gentxt are for --method dalle")


@torch.no_grad()
def clip_scores(clip: CLIP, text: torch.Tensor, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """CLIP similarity (n,) of every image (n, c, h, w) to one tokenized text (1, clip.text_seq_len)."""
    scores = []
    for chunk in images.split(batch_size):
        chunk = chunk.to(text.device)[:, : clip.channels]
        if chunk.shape[-1] != clip.image_size:
            chunk = F.interpolate(chunk, size=(clip.image_size, clip.image_size), mode="bilinear", antialias=True)
        scores.append(clip(text.expand(len(chunk), -1), chunk).float().cpu())
    return torch.cat(scores)


def run(argv: list[str] | None = None) -> list[Path]:
    """Generates for every prompt; returns the prompt folders written (the console script is `main`)."""
    args = build_parser().parse_args(argv)
    _check_args(args)
    options = options_from_args(GenerationOptions, args, flags=OPTION_FLAGS)
    prompts = read_prompts(args)
    device = resolve_device(args.device)
    outputs_dir = Path(args.outputs_dir)
    if holds_training_run(outputs_dir):
        raise ValueError(f"--outputs_dir {outputs_dir} holds a {describe_run(outputs_dir)}; give another folder")
    if args.method == "clip-guided":
        return run_clip_guided(args, prompts, device)
    checkpoint = resolve_checkpoint(args.dalle_path, "--dalle_path", expect="DALLE")
    check_guidance(args.cond_scale, checkpoint)
    dalle = load_model(checkpoint, DALLE, "--dalle_path", map_location=device)
    if args.weights != "fp32":
        dalle = dalle.decoding_copy(args.weights)
    spec = tokenizer_spec_for(args, checkpoint)
    tokenizer = build_tokenizer(spec)
    clip = None
    if args.clip_path is not None:
        clip = CLIP.from_pretrained(resolve_checkpoint(args.clip_path, "--clip_path"), map_location=device)
    for model, name in ((dalle, "DALLE"), (clip, "CLIP")):
        if model is not None:
            check_tokenizer_fits(tokenizer, model, name)
    prime = load_image(args.img, dalle.image_size, dalle.channels).to(device) if args.img else None
    outputs_dir.mkdir(parents=True, exist_ok=True)
    write_args_json(outputs_dir, PROG, args, dalle_checkpoint=str(checkpoint), tokenizer=spec)
    dtype = PRECISIONS[args.precision]
    settings = {
        key: getattr(args, key)
        for key in (
            "top_k",
            "top_p",
            "temperature",
            "cond_scale",
            "num_images",
            "img",
            "num_init_img_tokens",
            "keep_top",
            "precision",
            "weights",
        )
    }
    taken: set[str] = set()
    folders = []
    for prompt in prompts:
        drawn = prompt
        if args.gentxt:
            generator = torch.Generator().manual_seed(args.seed)
            _, texts = dalle.generate_texts(
                tokenizer, prompt, filter_thres=options.filter_thres, generator=generator, compile=options.compile
            )
            drawn = texts[0]
        if len(tokenizer.encode(drawn)) > dalle.text_seq_len:
            print(f"{PROG}: note: prompt {drawn[:40]!r} is cut to {dalle.text_seq_len} tokens", file=sys.stderr)
        text = tokenizer.tokenize([drawn], dalle.text_seq_len, truncate_text=True).to(device)
        batches = []
        for start in range(0, args.num_images, args.batch_size):
            count = min(args.batch_size, args.num_images - start)
            generators = [torch.Generator(device=device).manual_seed(args.seed + start + i) for i in range(count)]
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                images = dalle.generate_images(
                    text.expand(count, -1), img=prime, options=dataclasses.replace(options, generator=generators)
                )
            batches.append(images.float().clamp(0, 1).cpu())
        images = torch.cat(batches)
        scores = None
        order = list(range(len(images)))
        if clip is not None:
            clip_text = tokenizer.tokenize([drawn], clip.text_seq_len, truncate_text=True).to(device)
            scores = clip_scores(clip, clip_text, images, args.batch_size)
            order = scores.argsort(descending=True).tolist()[: args.keep_top or len(images)]
        folder = _write_prompt(
            prompt_folder(outputs_dir, prompt, taken), prompt, drawn, images, order, scores, args, checkpoint, settings
        )
        folders.append(folder)
        print(f"{PROG}: {len(order)} images of {prompt!r}, grid.png and metadata.json -> {folder}")
    return folders


def holds_training_run(folder: Path) -> bool:
    """True when `folder` holds a training run (checkpoints, metrics, or an args.json of a training tool); the
    args.json of an earlier dalle-generate run there is fine."""
    contents = run_contents(folder)
    return any(name != ARGS_NAME for name in contents) or run_tool(folder) not in (None, PROG)


def check_guidance(cond_scale: float, checkpoint: Path) -> None:
    """Classifier-free guidance (cond_scale != 1) only means something for a DALLE trained to predict without
    its caption (--null_cond_prob > 0): a ValueError when the run's args.json says it was not; a note when
    the checkpoint has no args.json to tell."""
    if cond_scale == 1:
        return
    recorded = read_args_json(checkpoint).get("args", {}).get("null_cond_prob")
    if recorded is None:
        print(
            f"{PROG}: note: cannot tell whether {checkpoint} was trained with --null_cond_prob; --cond_scale "
            f"{cond_scale} helps only if it was",
            file=sys.stderr,
        )
    elif not recorded:
        raise ValueError(
            f"--cond_scale {cond_scale} needs a DALLE trained with --null_cond_prob > 0, but {checkpoint} was "
            "trained with --null_cond_prob 0 (it never learned to predict without the caption); use --cond_scale 1"
        )


def run_clip_guided(args: argparse.Namespace, prompts: list[str], device: torch.device) -> list[Path]:
    """--method clip-guided: image n of a prompt is optimised with its own generator seeded with
    --seed + n, so the images do not depend on --batch_size either."""
    vae_checkpoint = resolve_checkpoint(args.vae_path, "--vae_path")
    vae = load_pretrained(vae_checkpoint, map_location=device)
    clip_checkpoint = resolve_checkpoint(args.clip_path, "--clip_path")
    clip = CLIP.from_pretrained(clip_checkpoint, map_location=device)
    spec = tokenizer_spec_for(args, clip_checkpoint)
    tokenizer = build_tokenizer(spec)
    check_tokenizer_fits(tokenizer, clip, "CLIP")
    outputs_dir = Path(args.outputs_dir)
    outputs_dir.mkdir(parents=True, exist_ok=True)
    write_args_json(outputs_dir, PROG, args, vae_checkpoint=str(vae_checkpoint), clip_checkpoint=str(clip_checkpoint),
                    tokenizer=spec)  # fmt: skip
    settings = {key: getattr(args, key) for key in ("method", "steps", "lr", "num_augments", "num_images", "keep_top")}
    taken: set[str] = set()
    folders = []
    for prompt in prompts:
        text = tokenizer.tokenize([prompt], clip.text_seq_len, truncate_text=True).to(device)
        batches = []
        for start in range(0, args.num_images, args.batch_size):
            count = min(args.batch_size, args.num_images - start)
            generators = [torch.Generator(device=device).manual_seed(args.seed + start + i) for i in range(count)]
            result = clip_guided_generate(
                vae, clip, text.expand(count, -1), steps=args.steps, lr=args.lr, num_augments=args.num_augments,
                generator=generators,
            )  # fmt: skip
            batches.append(result.images.float().clamp(0, 1).cpu())
        images = torch.cat(batches)
        scores = clip_scores(clip, text, images, args.batch_size)
        order = scores.argsort(descending=True).tolist()[: args.keep_top or len(images)]
        folder = prompt_folder(outputs_dir, prompt, taken)
        folders.append(_write_prompt(folder, prompt, prompt, images, order, scores, args, vae_checkpoint, settings))
        print(f"{PROG}: {len(order)} images of {prompt!r}, grid.png and metadata.json -> {folder}")
    return folders


def _write_prompt(
    folder: Path,
    prompt: str,
    drawn: str,
    images: torch.Tensor,
    order: list[int],
    scores: torch.Tensor | None,
    args: argparse.Namespace,
    checkpoint: Path,
    settings: dict[str, Any],
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():  # images of an earlier run with more images would be mistaken for these
        if _IMAGE_FILE.fullmatch(stale.name):
            stale.unlink()
    entries = []
    for rank, index in enumerate(order):
        save_image(images[index], folder / f"{rank}.png")
        entries.append(
            {
                "file": f"{rank}.png",
                "index": index,
                "seed": args.seed + index,
                "clip_score": None if scores is None else float(scores[index]),
            }
        )
    save_image(image_grid(images[order]), folder / "grid.png")
    metadata = {
        "prompt": prompt,
        "generated_text": drawn if drawn != prompt else None,
        "method": args.method,
        "dalle_path": str(checkpoint) if args.method == "dalle" else None,
        "vae_path": str(checkpoint) if args.method == "clip-guided" else None,
        "seed": args.seed,
        "settings": settings,
        "clip_path": args.clip_path,
        "images": entries,
    }
    text = json.dumps(metadata, indent=2, ensure_ascii=False) + "\n"
    atomic_write_file(folder / "metadata.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))  # never via a link
    return folder


def main(argv: list[str] | None = None) -> None:
    run_main(PROG, run, argv)


if __name__ == "__main__":
    main()
