"""`dalle-convert`: a `vae.pt` / `dalle.pt` of the original DALLE-pytorch scripts -> a model folder.

    dalle-convert dalle.pt ./dalle-model             # a DALLE trained with a VAE of train_vae.py
    dalle-convert vae.pt ./vae-model
    dalle-convert dalle.pt ./dalle-model --taming    # a DALLE trained on a VQGAN (or --openai_* paths)
    dalle-generate --dalle_path ./dalle-model --text '...'

The file is read without running code from it (`dalle_pytorch.convert.original`), and the folder gives the
same outputs as the original model. The tools also take such a file directly wherever they take a model
path (converting it in memory each time); converting once is faster.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dalle_pytorch.cli.common import add_vae_args, load_vae, run_main
from dalle_pytorch.cli.flags import add_arg
from dalle_pytorch.cli.runs import run_contents
from dalle_pytorch.convert.original import load_original, read_original

PROG = "dalle-convert"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Convert a checkpoint of the original DALLE-pytorch.")
    parser.add_argument("checkpoint", help="vae.pt or dalle.pt of the original scripts (or its NAME-ds-cp folder)")
    parser.add_argument("output_dir", help="the model folder to write (must not exist yet, or be empty)")
    add_vae_args(parser)
    add_arg(parser, "--overwrite", action="store_true", help="replace output_dir if it holds a model already")
    return parser


def run(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        if run_contents(out):
            raise ValueError(f"{out} holds a training run; give a new folder")
        raise ValueError(f"{out} is not empty; give a new folder (or --overwrite to replace a model folder)")
    saved = read_original(args.checkpoint)
    given_vae = any(getattr(args, flag) for flag in ("vae_path", "taming", "openai_encoder_path"))
    vae = load_vae(args) if given_vae or ("vae_params" in saved and not saved["vae_params"]) else None
    model = load_original(args.checkpoint, vae=vae)
    path = model.save_pretrained(out)
    dropped = [key for key in ("opt_state", "scheduler_state") if saved.get(key) is not None]
    note = f" ({' and '.join(dropped)} not carried over: train on with --dalle_path/--vae_path)" if dropped else ""
    print(f"{PROG}: wrote {type(model).__name__} to {path}{note}")
    return path


def main(argv: list[str] | None = None) -> None:
    run_main(PROG, run, argv)


if __name__ == "__main__":
    main()
