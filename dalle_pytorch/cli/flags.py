"""The command-line tools' flags: spellings, flags made from dataclass fields, and the training flags.

Flags are spelled with underscores as in the original DALLE-pytorch documentation (`--image_folder`);
the dashed spelling (`--image-folder`) is accepted too.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from types import NoneType, UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from dalle_pytorch.cli.original_flags import add_original_training_flags
from dalle_pytorch.training.trainer import (
    LR_SCHEDULES,
    PRECISIONS,
)

DEFAULT_SEED = 42


def spellings(name: str) -> list[str]:
    """'--image_folder' -> ['--image_folder', '--image-folder']."""
    dashed = "--" + name[2:].replace("_", "-")
    return [name] if dashed == name else [name, dashed]


def add_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, **kwargs: Any) -> None:
    """An option under both spellings, stored under the underscore name."""
    parser.add_argument(*spellings(name), dest=name[2:], **kwargs)


def add_switch(parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, default: bool, help: str) -> None:
    """`--name` turns it on, `--no_name` off."""
    parser.add_argument(
        *spellings(name),
        dest=name[2:],
        action="store_true",
        default=default,
        help=f"{help} (default: {'on' if default else 'off'})",
    )
    parser.add_argument(*spellings("--no_" + name[2:]), dest=name[2:], action="store_false", help=f"turn off {name}")


def _scalar_type(annotation: Any) -> type | None:
    """int / float / str / bool for ``T`` or ``T | None``; None for anything else."""
    if get_origin(annotation) in (Union, UnionType):
        rest = [arg for arg in get_args(annotation) if arg is not NoneType]
        annotation = rest[0] if len(rest) == 1 else None
    return annotation if annotation in (int, float, str, bool) else None


def add_option_flags(
    group: argparse.ArgumentParser | argparse._ArgumentGroup,
    options_class: type,
    *,
    flags: dict[str, str] | None = None,
    defaults: dict[str, Any] | None = None,
    parsers: dict[str, Callable[[str], Any]] | None = None,
    skip: tuple[str, ...] = (),
) -> None:
    """One flag per field of an options dataclass (``dalle_pytorch.models.options``), with the field's help
    text: ``--<field>`` (or ``flags[field]``), the field's default (or ``defaults[field]``). Booleans that
    default to on get a ``--no_<flag>`` switch; other types than int/float/str need ``parsers[field]``."""
    flags, defaults, parsers = flags or {}, defaults or {}, parsers or {}
    hints = get_type_hints(options_class)
    for f in dataclasses.fields(options_class):
        if f.name in skip:
            continue
        name = "--" + flags.get(f.name, f.name)
        default = defaults.get(f.name, f.default)
        help = f.metadata["help"]
        kind = _scalar_type(hints[f.name])
        if kind is bool:
            if default:
                add_switch(group, name, True, help)
            else:
                add_arg(group, name, action="store_true", help=help)
            continue
        parse = parsers.get(f.name, kind)
        if parse is None:
            raise TypeError(f"add_option_flags: give parsers[{f.name!r}] for the type {hints[f.name]}")
        if "default" not in help:
            help = f"{help} (default: {'not given' if default is None else default})"
        add_arg(group, name, type=parse, default=default, help=help)


def options_from_args(
    options_class: type, args: argparse.Namespace, *, flags: dict[str, str] | None = None, **values: Any
) -> Any:
    """The ``options_class`` instance the flags of :func:`add_option_flags` describe (``values`` given apart)."""
    flags = flags or {}
    for f in dataclasses.fields(options_class):
        dest = flags.get(f.name, f.name)
        if f.name not in values and hasattr(args, dest):
            values[f.name] = getattr(args, dest)
    return options_class(**values)


def add_training_args(
    parser: argparse.ArgumentParser,
    *,
    output_dir: str,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    clip_grad_norm: float | None = None,
    lr_schedule: str = "constant",
) -> None:
    """The flags of `TrainingSettings`, plus --seed, --device, --num_workers and --resume."""
    group = parser.add_argument_group("training")
    # None until the run is known: a resumed run continues in its own folder (see dalle_pytorch.cli.runs)
    parser.set_defaults(_default_output_dir=output_dir, _default_epochs=epochs)
    add_arg(
        group,
        "--output_dir",
        default=None,
        help="folder of this run: step-XXXXXXXX/ checkpoints, args.json, metrics.jsonl, samples/ (default: "
        f"{output_dir} for a new run, the resumed run's folder when resuming); never a folder holding another run",
    )
    add_arg(
        group,
        "--epochs",
        type=int,
        default=None,
        help=f"passes over the data (default: {epochs}; no limit when --max_steps is given)",
    )
    add_arg(
        group,
        "--max_steps",
        type=int,
        default=None,
        help="optimizer steps of the whole run, counted from its start (a resumed run continues to it)",
    )
    add_arg(
        group,
        "--batch_size",
        type=int,
        default=batch_size,
        help=f"samples per micro-batch on each process (default: {batch_size})",
    )
    group.add_argument(
        "--ga_steps",
        "--ga-steps",
        "--gradient_accumulation_steps",
        "--gradient-accumulation-steps",
        dest="ga_steps",
        type=int,
        default=1,
        help="micro-batches whose gradients are accumulated per optimizer step (default: 1)",
    )
    add_arg(
        group,
        "--learning_rate",
        type=float,
        default=learning_rate,
        help=f"AdamW learning rate (default: {learning_rate})",
    )
    add_arg(group, "--weight_decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    add_arg(
        group,
        "--clip_grad_norm",
        type=float,
        default=clip_grad_norm,
        help=f"clip the gradient norm to this (default: {clip_grad_norm or 'no clipping'})",
    )
    add_arg(
        group,
        "--lr_schedule",
        choices=LR_SCHEDULES,
        default=lr_schedule,
        help=f"learning-rate schedule after warmup (default: {lr_schedule})",
    )
    add_arg(
        group,
        "--lr_decay_rate",
        type=float,
        default=0.98,
        help="exponential schedule: multiply the learning rate by this every --lr_decay_every steps (default: 0.98)",
    )
    add_arg(group, "--lr_decay_every", type=int, default=1000, help="see --lr_decay_rate (default: 1000)")
    add_arg(group, "--lr_min", type=float, default=0.0, help="the schedule never goes below this learning rate")
    add_arg(group, "--warmup_steps", type=int, default=0, help="linear learning-rate warmup steps (default: 0)")
    add_arg(
        group,
        "--precision",
        choices=list(PRECISIONS),
        default="fp32",
        help="fp32; bf16 (autocast); fp16 (autocast with loss scaling) (default: fp32)",
    )
    group.add_argument("--fp16", dest="precision", action="store_const", const="fp16", help="same as --precision fp16")
    add_arg(
        group,
        "--seed",
        type=int,
        default=None,
        help=f"seed of initialisation, data order and sampling (default: {DEFAULT_SEED}, or the resumed run's)",
    )
    add_arg(group, "--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, mps")
    add_arg(group, "--num_workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    add_arg(group, "--save_every_n_steps", type=int, default=1000, help="checkpoint interval in steps (default: 1000)")
    add_arg(group, "--keep_n_checkpoints", type=int, default=None, help="keep only the newest N checkpoints")
    add_arg(
        group,
        "--ema_decay",
        type=float,
        default=None,
        help="keep a moving average of the weights with this decay (e.g. 0.999), saved as ema/ in each checkpoint",
    )
    add_arg(
        group,
        "--compile",
        nargs="?",
        const=True,
        default=False,
        metavar="BACKEND",
        help="torch.compile the training step (slow to start, faster steps); optionally a backend name "
        "(default backend: inductor)",
    )
    add_arg(
        group,
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from a checkpoint folder; without a value, the newest in --output_dir (a fresh start "
        "if there is none, so the same command restarts a preempted job)",
    )
    add_arg(
        group,
        "--max_nan_steps",
        type=int,
        default=10,
        help="stop after this many consecutive steps with a NaN/inf loss or gradient (each is skipped)",
    )

    logs = parser.add_argument_group("logging")
    add_arg(logs, "--log_every_n_steps", type=int, default=10, help="metrics interval in steps (default: 10)")
    add_arg(logs, "--sample_every_n_steps", type=int, default=500, help="sample-image interval in steps (default: 500)")
    add_arg(
        logs, "--log_sample_ids", action="store_true", help="write the dataset indices of every step to metrics.jsonl"
    )
    logs.add_argument("--no_progress", "--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_arg(logs, "--tensorboard", action="store_true", help="also log to TensorBoard in OUTPUT_DIR/tensorboard")
    add_arg(logs, "--wandb", action="store_true", help="also log to Weights & Biases")
    add_arg(logs, "--wandb_project", default="dalle_pytorch", help="W&B project (default: dalle_pytorch)")
    add_arg(logs, "--wandb_name", default=None, help="W&B run name")
    add_arg(logs, "--wandb_entity", default=None, help="W&B entity (user or team)")

    scale = parser.add_argument_group("several processes (launch with torchrun)")
    add_arg(scale, "--deepspeed", action="store_true", help="train with DeepSpeed (see install_deepspeed.sh)")
    add_arg(scale, "--zero_stage", type=int, default=2, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage (default: 2)")
    add_arg(scale, "--deepspeed_config", default=None, help="DeepSpeed JSON config merged over the generated one")
    add_arg(scale, "--powersgd", action="store_true", help="compress DDP gradients with PowerSGD")
    add_arg(scale, "--powersgd_rank", type=int, default=1, help="PowerSGD matrix approximation rank (default: 1)")
    add_arg(
        scale,
        "--powersgd_start_iter",
        type=int,
        default=10,
        help="plain all-reduce for this many steps before PowerSGD starts (default: 10)",
    )
    add_arg(scale, "--find_unused_parameters", action="store_true", help="DDP option for models with unused parameters")
    add_arg(
        scale, "--local_rank", type=int, default=None, help="set by old launchers; torchrun uses LOCAL_RANK instead"
    )
    add_original_training_flags(parser)
