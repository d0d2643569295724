"""What the DALL-E 2 tools share beyond `dalle_pytorch.cli.common`: a model config read from a JSON file,
comma-separated lists of ints, loading the frozen CLIP with its tokenizer, and the moving-average weights
a training checkpoint holds beside the raw ones."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dalle_pytorch.cli.common import build_tokenizer, check_tokenizer_fits, resolve_checkpoint, tokenizer_spec_for
from dalle_pytorch.cli.flags import add_arg
from dalle_pytorch.models.clip import CLIP
from dalle_pytorch.training.state import EMA_DIR_NAME


def int_list(text: str) -> tuple[int, ...]:
    """'16,32' -> (16, 32), for argparse."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return values


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    add_arg(
        parser,
        "--config",
        default=None,
        help='a JSON file of model flags, e.g. {"dim": 512, "depth": 6}; flags given on the command line win',
    )


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None, model_flags: set[str]) -> Any:
    """Parses `argv`; with --config, the file's values become the defaults of the model flags named in it."""
    args = parser.parse_args(argv)
    if args.config is None:
        return args
    path = Path(args.config)
    if not path.is_file():
        parser.error(f"--config: no such file {path}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        parser.error(f"--config: {path} is not valid JSON ({error})")
    if not isinstance(config, dict):
        parser.error(f"--config: {path} must hold a JSON object of model flags")
    config = {key.replace("-", "_"): value for key, value in config.items()}
    unknown = sorted(set(config) - model_flags)
    if unknown:
        parser.error(f"--config: unknown model settings {unknown}; known: {sorted(model_flags)}")
    for key, value in config.items():  # lists in JSON are the comma-separated flags
        config[key] = tuple(value) if isinstance(value, list) else value
    parser.set_defaults(**config)
    return parser.parse_args(argv)


def load_clip(args: argparse.Namespace) -> tuple[CLIP, Any, dict[str, Any]]:
    """The frozen CLIP of --clip_path, its tokenizer and the tokenizer's spec (as stored in args.json)."""
    checkpoint = resolve_checkpoint(args.clip_path, "--clip_path")
    clip = CLIP.from_pretrained(checkpoint)
    spec = tokenizer_spec_for(args, checkpoint)
    tokenizer = build_tokenizer(spec)
    check_tokenizer_fits(tokenizer, clip, "CLIP")
    return clip.requires_grad_(False).eval(), tokenizer, spec


def tokenizer_spec_near(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """The tokenizer spec of the training run `folder` (a checkpoint or its `ema/`) came from, else the flags'."""
    return tokenizer_spec_for(args, folder.parent if folder.name == EMA_DIR_NAME else folder)


def weights_folder(path: str | Path, flag: str, expect: str, *, ema: bool = True) -> Path:
    """A model folder, or the newest checkpoint of a training output folder, holding an `expect` (a class
    name); its moving-average weights (`ema/`) when it holds them and `ema` is on."""
    folder = resolve_checkpoint(path, flag, expect=expect)
    return folder / EMA_DIR_NAME if ema and (folder / EMA_DIR_NAME).is_dir() else folder
