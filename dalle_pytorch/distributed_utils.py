"""Compatibility: the original project's `dalle_pytorch.distributed_utils` (Horovod / DeepSpeed backends).

Several processes are now launched with torchrun and joined by `dalle_pytorch.training.distributed`
(PyTorch DDP by default, DeepSpeed with `--deepspeed`); the training loop is `dalle_pytorch.training.trainer`.
The original's functions keep their names for scripts that call them; `backend.distribute(...)` (which
wrapped a model and optimizer for the old loop) says where that moved. Horovod is not supported.
"""

from __future__ import annotations

import argparse
from typing import Any

from dalle_pytorch.training.distributed import DistributedContext, barrier, init_distributed

BACKENDS = ("dummy", "deepspeed")
is_distributed: bool | None = None
backend: Backend | None = None


class Backend:
    """The old backend object, answered from the process group torchrun describes."""

    BACKEND_NAME = "dummy"

    def __init__(self, name: str = "dummy") -> None:
        self.BACKEND_NAME = name
        self.ctx: DistributedContext | None = None

    def initialize(self) -> None:
        self.ctx = init_distributed("auto")

    def _context(self) -> DistributedContext:
        if self.ctx is None:
            self.initialize()
        return self.ctx

    def get_world_size(self) -> int:
        return self._context().world_size

    def get_rank(self) -> int:
        return self._context().rank

    def get_local_rank(self) -> int:
        return self._context().local_rank

    def is_root_worker(self) -> bool:
        return self._context().rank == 0

    def is_local_root_worker(self) -> bool:
        return self._context().local_rank == 0

    def local_barrier(self) -> None:
        barrier(self._context())

    def distribute(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            "backend.distribute() wrapped a model for the original training loop; train with "
            "dalle_pytorch.training.trainer.Trainer (or the dalle-train tools), which wraps the model in DDP or "
            "DeepSpeed (deepspeed=True) itself"
        )

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size < self.get_world_size():
            raise ValueError(f"batch size {batch_size} can't be smaller than the number of processes")


def wrap_arg_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds `--distributed_backend` (deepspeed or dummy) and `--deepspeed` to a script's parser."""
    parser.add_argument(
        "--distributed_backend",
        "--distr_backend",
        choices=[*BACKENDS, "horovod"],
        default=None,
        help="deepspeed or dummy (Horovod is not supported: launch with torchrun)",
    )
    parser.add_argument("--deepspeed", action="store_true", help="same as --distributed_backend deepspeed")
    return parser


def set_backend_from_args(args: argparse.Namespace) -> Backend:
    """The backend `args.distributed_backend` names (dummy when none); sets the module's `backend`."""
    global backend, is_distributed
    name = getattr(args, "distributed_backend", None) or ("deepspeed" if getattr(args, "deepspeed", False) else "dummy")
    if name == "horovod":
        raise ValueError("Horovod is not supported; launch with torchrun (PyTorch DDP) or use the deepspeed backend")
    if name not in BACKENDS:
        raise ValueError(f"unknown distributed backend {name!r}; one of {list(BACKENDS)}")
    backend = Backend(name)
    is_distributed = name != "dummy"
    return backend


def require_set_backend() -> None:
    if backend is None:
        raise RuntimeError("set a backend first: distributed_utils.set_backend_from_args(args)")


def using_backend(test_backend: Any) -> bool:
    """Whether the set backend is `test_backend` (a name or a Backend)."""
    require_set_backend()
    name = test_backend if isinstance(test_backend, str) else getattr(test_backend, "BACKEND_NAME", None)
    return name == backend.BACKEND_NAME
