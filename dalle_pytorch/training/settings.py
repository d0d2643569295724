"""Settings of a training run (the command-line tools' shared flags) and the learning-rate schedule.

Mixed precision: https://pytorch.org/docs/stable/amp.html (fp16 with loss scaling, bf16 without).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LR_SCHEDULES = ("constant", "exponential", "cosine")


@dataclass
class TrainingSettings:
    """What the training tools share; field names are the command-line flags."""

    output_dir: str | Path
    batch_size: int = 4
    epochs: int | None = 1  # None: no limit on passes over the data (then max_steps ends the run)
    max_steps: int | None = None
    ga_steps: int = 1  # micro-batches accumulated per optimizer step
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    clip_grad_norm: float | None = None
    lr_schedule: str = "constant"
    lr_decay_rate: float = 0.98  # exponential: factor per lr_decay_every steps
    lr_decay_every: int = 1000
    lr_min: float = 0.0
    warmup_steps: int = 0
    precision: str = "fp32"
    seed: int = 42
    save_every_n_steps: int = 1000
    save_checkpoints: bool = True  # False: train in memory only (the caller saves the model itself)
    keep_n_checkpoints: int | None = None
    log_every_n_steps: int = 10
    sample_every_n_steps: int = 500
    max_nan_steps: int = 10  # consecutive skipped steps before stopping
    log_sample_ids: bool = False
    progress: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "dalle_pytorch"
    wandb_name: str | None = None
    wandb_entity: str | None = None
    deepspeed: bool = False
    zero_stage: int = 2
    deepspeed_config: str | None = None  # a DeepSpeed JSON config merged over the one made from these flags
    powersgd: bool = False
    powersgd_rank: int = 1
    powersgd_start_iter: int = 10
    find_unused_parameters: bool = False
    ema_decay: float | None = None  # keep an exponential moving average of the weights (e.g. 0.999); None: off
    compile: bool | str = False  # torch.compile the training forward; a string names the backend (True: inductor)
    run_config: dict[str, Any] = field(default_factory=dict)  # shown in W&B

    def __post_init__(self) -> None:
        positive = (
            "batch_size",
            "ga_steps",
            "save_every_n_steps",
            "log_every_n_steps",
            "sample_every_n_steps",
            "max_nan_steps",
            "lr_decay_every",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs is None and self.max_steps is None:
            raise ValueError("give epochs or max_steps (or both): with neither the run would never end")
        for name in ("epochs", "max_steps", "keep_n_checkpoints"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or not given), got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.learning_rate <= 0 or self.lr_min < 0 or self.warmup_steps < 0:
            raise ValueError("learning_rate must be > 0, lr_min and warmup_steps >= 0")
        if len(self.adam_betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) (or not given), got {self.ema_decay}")
        if self.ema_decay is not None and self.deepspeed and self.zero_stage >= 3:
            raise ValueError("ema_decay does not work with DeepSpeed ZeRO stage 3 (the weights are partitioned)")
        if not isinstance(self.compile, bool | str) or self.compile == "":
            raise TypeError(f"compile must be a bool or a backend name such as 'inductor', got {self.compile!r}")
        if self.compile and self.deepspeed:
            raise ValueError("compile does not work together with deepspeed (DeepSpeed wraps the model itself)")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be > 0, got {self.clip_grad_norm}")

    @property
    def compile_backend(self) -> str | None:
        """The torch.compile backend to train with, or None for eager."""
        if self.compile is True:
            return "inductor"
        return self.compile or None

    @classmethod
    def from_args(cls, args: Any, **overrides: Any) -> TrainingSettings:
        """Settings from an argparse namespace holding (some of) the fields."""
        names = {f.name for f in fields(cls)}
        values = {name: getattr(args, name) for name in names if hasattr(args, name)}
        return cls(**{**values, **overrides})


def lr_factor_fn(settings: TrainingSettings, total_steps: int | None) -> Callable[[int], float]:
    """Step -> learning-rate multiplier: linear warmup, then the schedule, never below lr_min."""
    if settings.lr_schedule == "cosine" and total_steps is None:
        raise ValueError("--lr_schedule cosine needs a known number of steps: give --max_steps")
    floor = settings.lr_min / settings.learning_rate

    def factor(step: int) -> float:
        warmup = min(1.0, (step + 1) / settings.warmup_steps) if settings.warmup_steps else 1.0
        if settings.lr_schedule == "exponential":
            decay = settings.lr_decay_rate ** (step / settings.lr_decay_every)
        elif settings.lr_schedule == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1.0)))
        else:
            decay = 1.0
        return warmup * max(decay, floor)

    return factor
