"""More than one process: torchrun-launched DDP, PowerSGD gradient compression, DeepSpeed ZeRO.

Launch with torchrun (https://pytorch.org/docs/stable/elastic/run.html), which sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without WORLD_SIZE > 1 everything runs in one process.
- DDP (https://pytorch.org/docs/stable/notes/ddp.html): every rank holds the whole model and gradients
  are averaged, so the weights stay identical and any rank's copy is a complete checkpoint.
- PowerSGD (Vogels et al. 2019, https://arxiv.org/abs/1905.13727), which the DALL-E paper
  (https://arxiv.org/abs/2102.12092, section 2.5) used to compress gradients: PyTorch's DDP hook.
- DeepSpeed ZeRO (https://www.deepspeed.ai/tutorials/zero/) when the `deepspeed` package is installed
  (`install_deepspeed.sh`); ZeRO-3 parameters are gathered before rank 0 saves them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: `rank` of `world_size` processes, `local_rank` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, logs and progress bars."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> this rank's CUDA device when CUDA is present, else the CPU; other names as torch spells
    them ('cpu', 'cuda', 'cuda:1', 'mps')."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device: unknown device {name!r} (try auto, cpu, cuda, cuda:0, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {name!r} was asked for but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device: {name!r} was asked for but MPS is not available")
    return device


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_distributed(device: str = "auto", backend: str | None = None) -> DistributedContext:
    """Joins the process group described by torchrun's environment variables (one process if none).

    The backend is NCCL on CUDA and gloo otherwise, unless `backend` says.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistributedContext(device=resolve_device(device, 0))
    rank = _env_int("RANK", -1)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE={world_size}), got {os.environ.get('RANK')!r}")
    local_rank = _env_int("LOCAL_RANK", rank)
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group(
            backend or ("nccl" if resolved.type == "cuda" else "gloo"),
            init_method="env://",
            rank=rank,
            world_size=world_size,
        )
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistributedContext) -> None:
    if ctx.is_distributed:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """The sum over ranks of `values` (a copy; on this rank's device for the collective)."""
    if not ctx.is_distributed:
        return values.clone()
    reduced = values.to(ctx.device, copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.cpu()


def gather_strided(local: torch.Tensor, total: int, ctx: DistributedContext) -> torch.Tensor:
    """Rows this rank computed for items rank, rank + world_size, ... -> all `total` rows in item order, on
    every rank (on the CPU)."""
    if not ctx.is_distributed:
        return local.cpu()
    per_rank = -(-total // ctx.world_size)
    padded = torch.zeros((per_rank, *local.shape[1:]), dtype=local.dtype, device=ctx.device)
    padded[: len(local)] = local
    gathered = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, padded)
    result = torch.empty((total, *local.shape[1:]), dtype=local.dtype)
    for rank, rows in enumerate(gathered):
        result[rank :: ctx.world_size] = rows[: len(range(rank, total, ctx.world_size))].cpu()
    return result


def wrap_ddp(
    model: nn.Module,
    ctx: DistributedContext,
    *,
    powersgd: bool = False,
    powersgd_rank: int = 1,
    powersgd_start_iter: int = 10,
    find_unused_parameters: bool = False,
) -> nn.Module:
    """`model` wrapped in DistributedDataParallel (rank 0's weights are broadcast to all), with PowerSGD
    registered when asked; `model` itself when there is one process."""
    if not ctx.is_distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )
    if powersgd:
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        # plain all-reduce for the first iterations lets error feedback start from a good state (see the hook's docs)
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=powersgd_rank, start_powerSGD_iter=max(2, powersgd_start_iter)
        )
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    return ddp


def no_sync(model: nn.Module, skip_sync: bool):
    """DDP's `no_sync` while accumulating gradients (no all-reduce until the last micro-batch); `model` may be
    a DDP module compiled by torch.compile."""
    model = getattr(model, "_orig_mod", model)
    if skip_sync and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper or DeepSpeed engine."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


# -------------------------------------------------------------------------------------------- DeepSpeed


def require_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as error:
        raise ImportError(
            "--deepspeed needs the deepspeed package: run ./install_deepspeed.sh (or pip install deepspeed)"
        ) from error
    return deepspeed


def deepspeed_config(
    *, batch_size: int, ga_steps: int, clip_grad_norm: float | None, precision: str, zero_stage: int
) -> dict[str, Any]:
    """A DeepSpeed config (https://www.deepspeed.ai/docs/config-json/) matching the tools' own flags."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": ga_steps,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }
    if clip_grad_norm is not None:
        config["gradient_clipping"] = clip_grad_norm
    return config


def deepspeed_initialize(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, config: dict[str, Any]
) -> Any:
    """A DeepSpeed engine owning `model`, `optimizer` and `scheduler`."""
    deepspeed = require_deepspeed()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def gathered_parameters(engine: Any):
    """Context in which a ZeRO-3 engine's parameters are whole on every rank (a no-op for other stages)."""
    if engine is None or engine.zero_optimization_stage() < 3:
        return contextlib.nullcontext()
    deepspeed = require_deepspeed()
    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
