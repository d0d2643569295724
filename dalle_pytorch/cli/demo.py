"""`dalle-demo`: train DALLE from scratch on the built-in shapes dataset and show that it understood the text.

    dalle-demo                      # about 5 minutes on 2 CPU cores
    dalle-demo --fast               # about 2 minutes
    dalle-demo --steps dalle=3000 --cond_scale 3
    dalle-demo --model dalle2         # DALL-E 2 instead: CLIP, a diffusion prior and a latent decoder
    dalle-demo --model both --fast    # DALLE, DALLE2 and CLIP-guided VAE codes, judged side by side
    dalle-demo --decode-precision fp32,bf16,int8   # also generate with bf16 and int8 weights, judged beside fp32
    dalle-demo --precision bf16       # train with bf16 autocast (compare with the fp32 run's report)

Writes grid.png, report.json, tokenizer.json and the trained models into --out_dir and prints, per prompt,
how often the samples show the colour and the shape that the prompt asked for. See `dalle_pytorch.demo.pipeline`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Sequence

import torch

from dalle_pytorch.demo.comparison import format_comparison
from dalle_pytorch.demo.pipeline import DEFAULT_CONFIG, FAST_CONFIG, MODELS, run_demo
from dalle_pytorch.demo.report import format_report
from dalle_pytorch.models.precision import DECODING_PRECISIONS

STEP_KEYS = {
    "vae": "vae_steps",
    "dalle": "dalle_steps",
    "clip": "clip_steps",
    "classifier": "classifier_steps",
    "dalle2_clip": "dalle2_clip_steps",
    "prior": "dalle2_prior_steps",
    "decoder": "dalle2_decoder_steps",
    "clip_guided": "clip_guided_steps",
}


def _flag(name: str) -> list[str]:
    """'--out_dir' -> ['--out_dir', '--out-dir']: underscores as in the other tools, dashes accepted."""
    dashed = "--" + name[2:].replace("_", "-")
    return [name] if dashed == name else [name, dashed]


def _step_override(text: str) -> tuple[str, int]:
    key, _, value = text.partition("=")
    if key not in STEP_KEYS or not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected KEY=N with KEY in {sorted(STEP_KEYS)} and N >= 0, got {text!r}")
    return STEP_KEYS[key], int(value)


def _precisions(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names or any(name not in DECODING_PRECISIONS for name in names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names out of {DECODING_PRECISIONS}, got {text!r}")
    return names


def default_threads(torch_default: int, cpu_count: int | None, load_average: float | None) -> int:
    """Torch threads for a run without --threads: torch's default, but no more than the cores idle right now.

    A parallel op waits for all of its threads, so a thread whose core another program holds stalls the
    others: on a 2-core machine shared with other jobs, 2 threads made the demo several times slower than 1.
    Idle cores are estimated as ``cpu_count - load_average`` (the 1-minute load), rounded; at least 1. Without
    a load average (e.g. on Windows) torch's default is kept.
    """
    if torch_default < 1:
        raise ValueError(f"torch_default must be >= 1, got {torch_default}")
    if cpu_count is None or load_average is None:
        return torch_default
    idle_cores = math.floor(cpu_count - load_average + 0.5)
    return max(1, min(torch_default, idle_cores))


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dalle-demo", description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        choices=MODELS,
        default="dalle",
        help="dalle (default): VAE + DALLE; dalle2: CLIP + diffusion prior + decoder in the VAE's latents; both: "
        "DALLE, DALLE2 and CLIP-guided optimisation of the VAE's codes, judged side by side",
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
    parser.add_argument(
        *_flag("--decode_precision"),
        dest="decode_precision",
        type=_precisions,
        metavar="P[,P...]",
        help="after generating with the trained model, generate and judge again with each of these decoding "
        "precisions (fp32, bf16, int8; e.g. fp32,bf16,int8), reported side by side",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        help="training precision of the models: fp32 (default), or bf16 / fp16 autocast as in the training tools",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads for this run (default: torch's choice, at most the cores idle at the start; "
        "--threads 1 makes a run bitwise reproducible)",
    )
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
    flags = ("train_images", "samples", "clip_candidates", "cond_scale", "temperature", "filter_thres", "precision")
    for flag in flags:
        if getattr(args, flag) is not None:
            overrides[renamed.get(flag, flag)] = getattr(args, flag)
    if args.decode_precision is not None:
        if args.model != "dalle":
            print("dalle-demo: error: --decode_precision needs --model dalle", file=sys.stderr)
            return 2
        overrides["decode_precisions"] = args.decode_precision
    try:
        config = dataclasses.replace(config, seed=args.seed, **overrides)
    except (TypeError, ValueError) as error:
        print(f"dalle-demo: error: {error}", file=sys.stderr)
        return 2
    previous_threads = torch.get_num_threads()
    if args.threads is not None and args.threads < 1:
        print("dalle-demo: error: --threads must be >= 1", file=sys.stderr)
        return 2
    threads = args.threads
    if threads is None:
        load_average = _load_average()
        threads = default_threads(previous_threads, os.cpu_count(), load_average)
        if threads < previous_threads:
            print(f"dalle-demo: using {threads} of {previous_threads} torch threads: the load average is "
                  f"{load_average:.1f} on {os.cpu_count()} CPUs (choose with --threads)")  # fmt: skip
    torch.set_num_threads(threads)
    try:
        report = run_demo(config, args.out_dir, args.device, progress=not args.quiet, model=args.model)
    finally:
        torch.set_num_threads(previous_threads)
    if args.model != "dalle":
        print(format_comparison(report))
        print(f"wrote {args.out_dir}/grid.png and {args.out_dir}/report.json")
        return 0
    print(format_report(report))
    targets = report["targets"]
    print(f"target (both >= {targets['seen_both_match']:.0%} seen, >= {targets['heldout_both_match']:.0%} held out): "
          + ("met" if targets["met"] else "NOT met"))  # fmt: skip
    print(f"wrote {args.out_dir}/grid.png and {args.out_dir}/report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
