"""Run folders: which folder a training tool writes to, and which checkpoint it continues from.

A run folder (a training tool's `--output_dir`) holds one run: `step-XXXXXXXX/` checkpoints, `args.json`
and `metrics.jsonl`. The rules that keep runs apart:

- resuming continues in the run folder of the checkpoint it resumes; an explicit `--output_dir` must then
  be that same folder or an empty one (a branch of the run);
- a fresh run (or a fine-tuning run started from a model folder) needs an `--output_dir` that holds no run;
- a damaged newest checkpoint is reported and the newest intact one is used instead.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from dalle_pytorch.io.checkpoint import CONFIG_NAME
from dalle_pytorch.training.run_logging import METRICS_NAME

ARGS_NAME = "args.json"
_STEP_DIR = re.compile(r"step-\d+")

# what each training tool makes, and the flag that takes it
MODEL_FLAGS = {
    "DALLE": "--dalle_path",
    "DiscreteVAE": "--vae_path",
    "OpenAIDiscreteVAE": "--vae_path",
    "VQGanVAE": "--vae_path",
    "CLIP": "--clip_path",
    "DiffusionPrior": "--prior_path",
    "Decoder": "--decoder_path",
    "DALLE2": "--dalle2_path",
}


def run_contents(folder: Path) -> list[str]:
    """The names in `folder` that show it holds a training run (empty when it holds none)."""
    if not folder.is_dir():
        return []
    return sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.name in (ARGS_NAME, METRICS_NAME) or (_STEP_DIR.fullmatch(entry.name) and entry.is_dir())
    )


def run_tool(folder: Path) -> str | None:
    """The tool that wrote `folder/args.json` (None when unknown)."""
    try:
        return json.loads((folder / ARGS_NAME).read_text(encoding="utf-8")).get("tool")
    except (OSError, ValueError, AttributeError):
        return None


def describe_run(folder: Path) -> str:
    """'dalle-train run (args.json, step-00000002, step-00000004)'"""
    names = run_contents(folder)
    shown = ", ".join(names[:3] + (["..."] if len(names) > 4 else []) + names[3:][-1:])
    return f"{run_tool(folder) or 'training'} run ({shown})"


def run_of(checkpoint: Path) -> Path | None:
    """The run folder a checkpoint belongs to: the parent of a `step-*` folder (None for a model folder
    saved elsewhere)."""
    if _STEP_DIR.fullmatch(checkpoint.name) and (checkpoint / CONFIG_NAME).is_file():
        return checkpoint.parent
    return None


def default_output_dir(args: argparse.Namespace) -> str:
    """--output_dir as given, else the tool's default."""
    return args.output_dir if args.output_dir is not None else args._default_output_dir


def settle_output_dir(args: argparse.Namespace, prog: str, resume_from: Path | None) -> Path:
    """Sets `args.output_dir` to the folder this run writes to, or raises ValueError when that folder holds
    another run. `resume_from`: the checkpoint whose training state is resumed (None for a fresh run)."""
    given = Path(args.output_dir) if args.output_dir is not None else None
    run = run_of(resume_from) if resume_from is not None else None
    if run is not None:
        if given is None or _same(given, run):
            args.output_dir = str(run)
            return run
        if run_contents(given):
            raise ValueError(
                f"--output_dir {given} holds another {describe_run(given)}; resuming {resume_from} continues in "
                f"{run}: leave out --output_dir, or give an empty folder to continue the run there"
            )
        args.output_dir = str(given)
        return given
    target = given if given is not None else Path(args._default_output_dir)
    if run_contents(target):
        # `--resume` with no checkpoint yet restarts the same preempted run: its args.json may be there
        restarting = args.resume == "latest" and resume_from is None and run_tool(target) in (prog, None)
        restarting = restarting and not any(_STEP_DIR.fullmatch(name) for name in run_contents(target))
        if not restarting:
            raise ValueError(
                f"{target} already holds a {describe_run(target)}; continue it with --resume --output_dir "
                f"{target}, or give a new --output_dir for a new run"
            )
    args.output_dir = str(target)
    return target


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def note(prog: str, message: str) -> None:
    print(f"{prog}: note: {message}", file=sys.stderr)


def model_settings(model: Any) -> dict[str, Any]:
    """{'type': class name, 'config': constructor arguments} of a PretrainedMixin model."""
    return {"type": type(model).__name__, "config": getattr(model, "config", {})}


def record_model_settings(args: argparse.Namespace, model: Any, aliases: dict[str, str] | None = None) -> None:
    """Sets the model flags of `args` to the settings `model` really has (a resumed model comes from its
    checkpoint, whatever the flags say), so args.json tells the truth. `aliases`: flag -> config name."""
    config = getattr(model, "config", {})
    names = {**{key: key for key in config}, **(aliases or {})}
    for flag, key in names.items():
        if key not in config or not hasattr(args, flag):
            continue
        value, current = config[key], getattr(args, flag)
        if isinstance(current, str) and isinstance(value, list | tuple):
            value = ",".join(str(item) for item in value)  # a comma-separated flag such as --attn_types
        setattr(args, flag, value)
