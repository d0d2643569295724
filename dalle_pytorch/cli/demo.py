"""`dalle-demo`: train DALLE from scratch on the built-in shapes dataset and show that it understood the text.

    dalle-demo                      # about 5 minutes on 2 CPU cores
    dalle-demo --fast               # about 2 minutes
    dalle-demo --steps dalle=3000 --cond_scale 3

Writes grid.png, report.json, tokenizer.json and the trained models into --out_dir and prints, per prompt,
how often the samples show the colour and the shape that the prompt asked for. See `dalle_pytorch.demo.pipeline`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

import torch

from dalle_pytorch.demo.pipeline import DEFAULT_CONFIG, FAST_CONFIG, run_demo
from dalle_pytorch.demo.report import format_report

STEP_KEYS = {"vae": "vae_steps", "dalle": "dalle_steps", "clip": "clip_steps", "classifier": "classifier_steps"}


def _flag(name: str) -> list[str]:
    """'--out_dir' -> ['--out_dir', '--out-dir']: underscores as in the other tools, dashes accepted."""
    dashed = "--" + name[2:].replace("_", "-")
    return [name] if dashed == name else [name, dashed]


def _step_override(text: str) -> tuple[str, int]:
    key, _, value = text.partition("=")
    if key not in STEP_KEYS or not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected KEY=N with KEY in {sorted(STEP_KEYS)} and N >= 0, got {text!r}")
    return STEP_KEYS[key], int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dalle-demo", description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fast", action="store_true", help="the small budget (about 2 minutes on 2 CPU cores)")
    parser.add_argument(*_flag("--out_dir"), dest="out_dir", default="outputs/demo", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and sampling (default 0)")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if available, else CPU), 'cpu', 'cuda:0', ...")
    parser.add_argument(
        "--steps",
        nargs="+",
        type=_step_override,
        default=[],
        metavar="KEY=N",
        help=f"override training steps, KEY in {sorted(STEP_KEYS)}; clip=N > 0 turns on CLIP reranking",
    )
    parser.add_argument(*_flag("--train_images"), dest="train_images", type=int, help="number of training images")
    parser.add_argument(*_flag("--samples"), dest="samples", type=int, help="samples per prompt")
    parser.add_argument(*_flag("--clip_candidates"), dest="clip_candidates", type=int,
                        help="candidates per sample for CLIP to choose from (needs clip steps > 0)")  # fmt: skip
    parser.add_argument(*_flag("--cond_scale"), dest="cond_scale", type=float, help="classifier-free guidance scale")
    parser.add_argument("--temperature", type=float, help="sampling temperature")
    parser.add_argument(*_flag("--filter_thres"), dest="filter_thres", type=float,
                        help="top-k: fraction of the image vocabulary dropped at each step")  # fmt: skip
    parser.add_argument("--threads", type=int, help="torch CPU threads for this run (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = FAST_CONFIG if args.fast else DEFAULT_CONFIG
    overrides = dict(args.steps)
    if "clip_steps" in overrides and args.clip_candidates is None:
        # CLIP ranks candidates; without CLIP there is nothing to rank them with
        overrides["candidates_per_sample"] = 1 if overrides["clip_steps"] == 0 else max(4, config.candidates_per_sample)
    renamed = {"train_images": "num_train_images", "samples": "samples_per_prompt",
               "clip_candidates": "candidates_per_sample"}  # fmt: skip
    for flag in ("train_images", "samples", "clip_candidates", "cond_scale", "temperature", "filter_thres"):
        if getattr(args, flag) is not None:
            overrides[renamed.get(flag, flag)] = getattr(args, flag)
    try:
        config = dataclasses.replace(config, seed=args.seed, **overrides)
    except (TypeError, ValueError) as error:
        print(f"dalle-demo: error: {error}", file=sys.stderr)
        return 2
    previous_threads = torch.get_num_threads()
    if args.threads is not None:
        if args.threads < 1:
            print("dalle-demo: error: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        report = run_demo(config, args.out_dir, args.device, progress=not args.quiet)
    finally:
        torch.set_num_threads(previous_threads)
    print(format_report(report))
    targets = report["targets"]
    print(f"target (both >= {targets['seen_both_match']:.0%} seen, >= {targets['heldout_both_match']:.0%} held out): "
          + ("met" if targets["met"] else "NOT met"))  # fmt: skip
    print(f"wrote {args.out_dir}/grid.png and {args.out_dir}/report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
