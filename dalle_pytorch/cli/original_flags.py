"""Flags of the original DALLE-pytorch scripts that this library spells differently or does without.

Each keeps working when it has an equivalent (`--amp`, `--distributed_backend deepspeed|dummy`) and
otherwise stops at parse time with a message naming the replacement, so a command from an old shell
history never silently trains something else.
"""

from __future__ import annotations

import argparse
from typing import Any

HOROVOD = (
    "--distributed_backend horovod: Horovod is not supported; launch several processes with torchrun "
    "(PyTorch DDP, the default: torchrun --nproc_per_node N $(which dalle-train) ...) or add --deepspeed"
)
LR_DECAY = (
    "--lr_decay (the original's ReduceLROnPlateau on the epoch loss) is not available; use --lr_schedule "
    "exponential with --lr_decay_rate/--lr_decay_every, or --lr_schedule cosine with --max_steps"
)
FLOPS_PROFILER = (
    "--flops_profiler is not a flag here; with --deepspeed, give --deepspeed_config FILE holding "
    '{"flops_profiler": {"enabled": true, "profile_step": 200}}'
)


class _Replaced(argparse.Action):
    """A flag that ends parsing with `message` (which names its replacement)."""

    def __init__(self, option_strings: list[str], dest: str, message: str = "", **kwargs: Any):
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.message = message

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option=None):
        parser.error(self.message)


class _Backend(argparse.Action):
    """--distributed_backend deepspeed -> --deepspeed; dummy -> one process as usual; horovod -> an error."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option=None):
        if values == "horovod":
            parser.error(HOROVOD)
        if values == "deepspeed":
            namespace.deepspeed = True


def add_original_training_flags(parser: argparse.ArgumentParser) -> None:
    """The original scripts' training flags, mapped or refused with their replacement."""
    group = parser.add_argument_group("flags of the original DALLE-pytorch scripts")
    group.add_argument(
        "--amp", dest="precision", action="store_const", const="fp16", help="the original's AMP: --precision fp16"
    )
    group.add_argument(
        "--lr_decay", "--lr-decay", action=_Replaced, message=LR_DECAY, help="not available: " + LR_DECAY
    )
    group.add_argument(
        "--flops_profiler", "--flops-profiler", action=_Replaced, message=FLOPS_PROFILER, help=FLOPS_PROFILER
    )
    group.add_argument(
        "--distributed_backend",
        "--distributed-backend",
        "--distr_backend",
        "--distr-backend",
        choices=["deepspeed", "horovod", "dummy"],
        action=_Backend,
        dest="_distributed_backend",
        default=argparse.SUPPRESS,
        help="deepspeed: same as --deepspeed; dummy: one process; horovod: not supported (use torchrun or --deepspeed)",
    )
