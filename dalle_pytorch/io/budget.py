"""Building a model from a file's config without letting the config allocate more than the file explains.

A config comes from the same untrusted folder as the weights. `depth = 10**6` or `n_blk_per_group = 100000`
would build (and randomly initialise) a model far larger than the weights stored beside it before any shape
check could fail. `build_within_budget` runs the constructor while counting the elements torch's factory
functions allocate, checking each request *before* it is allocated, and stops as soon as the model grows
past what the stored tensors explain.

Counting uses a `TorchFunctionMode` (https://pytorch.org/docs/stable/notes/extending.html#extending-all-torch-api-with-modes),
which sees every `torch.empty(...)` that `nn.Linear`, `nn.Conv2d`, `nn.Embedding`, ... call for their
parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["ModelSizeError", "build_within_budget", "parameter_budget"]

T = TypeVar("T")

# Parameters are created with torch.empty (then initialised in place); masks, tables and other buffers with
# the other factories. Tied weights are built twice and stored once, hence the factor 2 for parameters.
_PARAMETER_FACTORIES = (torch.empty, torch.empty_strided)
_SIZE_FACTORIES = (torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn)
PARAMETER_SLACK = 2**20  # elements: small models may have a few parameters beyond the stored ones
BUFFER_SLACK = 2**26  # elements (256 MB of float32): attention masks and position tables of long sequences


class ModelSizeError(ValueError):
    """A config describes a model much larger than the weights stored with it."""


def parameter_budget(stored_elements: int) -> tuple[int, int]:
    """(parameter elements, all allocated elements) a model with `stored_elements` stored may allocate."""
    return 2 * stored_elements + PARAMETER_SLACK, 8 * stored_elements + BUFFER_SLACK


def _as_int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | torch.SymInt) and not isinstance(value, bool) else None


def _numel_of_size(size: Any) -> int | None:
    if isinstance(size, int | torch.SymInt) and not isinstance(size, bool):
        size = (size,)
    if not isinstance(size, tuple | list | torch.Size):
        return None
    dims = [_as_int(d) for d in size]
    if any(d is None for d in dims):
        return None
    return math.prod(max(d, 0) for d in dims)


def _requested_elements(func: Any, args: tuple, kwargs: dict) -> int | None:
    """Elements a factory call will allocate, from its arguments (None when not a known factory)."""
    if func in _SIZE_FACTORIES:
        size = kwargs.get("size", args[0] if len(args) == 1 else args)
        return _numel_of_size(size)
    if func in (torch.full, torch.empty_strided):
        return _numel_of_size(kwargs.get("size", args[0] if args else None))
    if func is torch.arange:
        numbers = [float(a) for a in args if isinstance(a, int | float) and not isinstance(a, bool)]
        if not numbers or len(numbers) != len(args):
            return None
        start, end, step = ([0.0, *numbers, 1.0] if len(numbers) == 1 else [*numbers, 1.0])[:3]
        return max(0, math.ceil((end - start) / step)) if step and math.isfinite(end - start) else None
    if func is torch.eye:
        rows = _as_int(args[0]) if args else None
        cols = _as_int(args[1]) if len(args) > 1 else rows
        return rows * cols if rows is not None and cols is not None else None
    return None


class _Budget(TorchFunctionMode):
    def __init__(self, parameters: int, total: int, source: str) -> None:
        super().__init__()
        self.parameter_limit, self.total_limit, self.source = parameters, total, source
        self.parameters = self.total = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        requested = _requested_elements(func, args, kwargs)
        if requested is not None:
            self._charge(func, requested)
        return func(*args, **kwargs)

    def _charge(self, func: Any, elements: int) -> None:
        self.total += elements
        if func in _PARAMETER_FACTORIES:
            self.parameters += elements
        if self.parameters > self.parameter_limit or self.total > self.total_limit:
            raise ModelSizeError(
                f"{self.source} describes a model larger than the weights stored with it (it asks for more "
                f"than {self.parameter_limit:,} parameter elements); the config is corrupt or does not belong "
                "to these weights"
            )


def build_within_budget(build: Callable[[], T], stored_elements: int, source: str) -> T:
    """`build()`, stopped with ModelSizeError as soon as it allocates more than `stored_elements` explain
    (see `parameter_budget`); `source` names the config in the message."""
    parameters, total = parameter_budget(stored_elements)
    with _Budget(parameters, total, source):
        return build()
