"""Reading `torch.save` files without running code from them.

A `torch.save` file is a pickle: a small program that names Python callables (`GLOBAL` opcodes) and calls
them. `torch.load(weights_only=False)` imports and calls whatever the file names, and since PyTorch 2.6 the
default `weights_only=True` refuses whole pickled modules such as OpenAI's released dVAE. This module reads
both kinds with a restricted unpickler:

- tensors are rebuilt by our own functions from the raw storage bytes (never by torch's `_rebuild_*`);
- plain containers (dict, list, tuple, set, OrderedDict) and scalars are rebuilt as usual;
- every other class or function named in the file becomes an inert `PickledObject` record holding the
  arguments and state the pickle gives it. Nothing is imported and no code named in the file is called.

Nothing a file does outlives its own load: the `BUILD` opcode (set an object's state) applies only to the
records and `OrderedDict`s this load created, never to the objects standing for allowed names. Memory and
time are bounded by the file: storages must have exactly the size their tensors declare, and error messages
show at most a short summary of values taken from the file.

The containers around the pickle (zip and legacy formats) are read by `dalle_pytorch.io.torch_files`.
Format references: https://docs.python.org/3/library/pickle.html#restricting-globals and
https://github.com/pytorch/pytorch/blob/main/torch/serialization.py (file layout facts only).
"""

from __future__ import annotations

import collections
import pickle
import reprlib
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CheckpointFormatError",
    "describe",
    "PickledObject",
    "unpickle_restricted",
    "pickled_module_tensors",
    "load_tensors_strict",
]

# Storage classes named in torch.save files (`torch.FloatStorage`, ...) and the element type they hold.
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}
_DTYPES_BY_NAME = {str(dtype).removeprefix("torch."): dtype for dtype in _STORAGE_DTYPES.values()}

_SUMMARY = reprlib.Repr()
_SUMMARY.maxlevel, _SUMMARY.maxstring, _SUMMARY.maxother = 3, 60, 60
_SUMMARY.maxlist = _SUMMARY.maxtuple = _SUMMARY.maxdict = _SUMMARY.maxset = _SUMMARY.maxfrozenset = 4


def describe(value: Any, limit: int = 200) -> str:
    """A short summary of a value read from a file, for error messages.

    Never a full `repr()`: a few hundred bytes of pickle can describe a structure whose repr is gigabytes.
    """
    try:
        text = _SUMMARY.repr(value)
    except Exception:  # a record's repr cannot fail, but nothing here may turn one error into another
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class CheckpointFormatError(ValueError):
    """The file is truncated, is not a PyTorch checkpoint, or does not hold the expected tensors."""


class PickledObject:
    """Inert stand-in for an object of a class named in a pickle.

    It records what the pickle hands over (constructor `args`/`kwargs`, the `state` of a BUILD, items of
    APPENDS/SETITEMS) and never runs code. `pickled_module` and `pickled_name` tell which class the file
    named, e.g. `dall_e.encoder` / `Encoder`.
    """

    pickled_module: str = ""
    pickled_name: str = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledObject:
        record = object.__new__(cls)
        record.args, record.kwargs = args, kwargs
        record.state = None
        record.list_items, record.dict_items = [], []
        return record

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # everything was recorded in __new__; REDUCE calls both

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:
        self.list_items.append(item)

    def extend(self, items: Any) -> None:
        self.list_items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.dict_items.append((key, value))

    @classmethod
    def qualified_name(cls) -> str:
        return f"{cls.pickled_module}.{cls.pickled_name}"

    def __repr__(self) -> str:
        return f"PickledObject({self.qualified_name()})"


class Storage:
    """A flat tensor standing for one torch storage (all tensors viewing it share its memory)."""

    def __init__(self, flat: torch.Tensor) -> None:
        self.flat = flat


class StorageType:
    """Marker for a `torch.<X>Storage` class named in the file: only says which dtype the bytes hold.

    Shared by every load, so it is immutable (and `BUILD` never reaches it anyway).
    """

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype) -> None:
        object.__setattr__(self, "dtype", dtype)

    def __setattr__(self, name: str, value: Any) -> None:
        raise CheckpointFormatError("a storage type cannot be modified")

    def __delattr__(self, name: str) -> None:
        raise CheckpointFormatError("a storage type cannot be modified")


def _as_shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(isinstance(v, int) for v in value):
        raise CheckpointFormatError(f"tensor {what} must be a tuple of ints, got {describe(value)}")
    return tuple(value)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_ignored: Any) -> torch.Tensor:
    if not isinstance(storage, Storage):
        raise CheckpointFormatError(f"tensor data must come from a storage record, got {describe(storage)}")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise CheckpointFormatError(f"tensor storage offset must be an int >= 0, got {describe(storage_offset)}")
    size, stride = _as_shape(size, "size"), _as_shape(stride, "stride")
    if len(size) != len(stride) or any(s < 0 for s in size + stride):
        raise CheckpointFormatError(f"invalid tensor size {size} / stride {stride}")
    if all(s > 0 for s in size):
        last = storage_offset + sum((n - 1) * st for n, st in zip(size, stride))
        if last >= storage.flat.numel():
            raise CheckpointFormatError("tensor reaches past the end of its storage (truncated file?)")
    return torch.as_strided(storage.flat, size, stride, storage_offset)


def _rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    *_ignored: Any,
) -> torch.Tensor:
    if isinstance(storage, Storage) and isinstance(dtype, torch.dtype) and storage.flat.dtype != dtype:
        storage = Storage(storage.flat.view(dtype))  # an untyped (byte) storage viewed as `dtype`
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, *_ignored: Any) -> Any:
    return data  # a Parameter is only a tensor to us; requires_grad and hooks are dropped


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if func in _TENSOR_REBUILDERS and isinstance(args, tuple):
        return func(*args)
    raise CheckpointFormatError(f"unsupported tensor rebuild function {describe(func)}")


def _latin1_encode(text: Any, encoding: Any = "latin1") -> bytes:
    # Protocol-2 pickles written by Python 3 store `bytes` as `_codecs.encode(str, "latin1")`.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointFormatError("only latin1-encoded bytes are supported")
    return text.encode("latin1")


_TENSOR_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v3)

# The only names resolved to something other than an inert record. All are data, plain containers or our
# own validating functions; none is code taken from the file.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("torch", "Size"): torch.Size,
    ("_codecs", "encode"): _latin1_encode,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    **{("torch", name): StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
    **{("torch", name): dtype for name, dtype in _DTYPES_BY_NAME.items()},
}
_PYTHON2_MODULE_NAMES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _RestrictedUnpickler(pickle._Unpickler):
    """Unpickler whose `find_class` never imports: allowed names map to data, all else to records.

    The pure-Python unpickler, because its opcode table can be changed: `BUILD` is restricted (see
    `_load_build`), which the C unpickler does not allow.
    """

    def __init__(self, file: Any, load_storage: Callable[[tuple], Storage]) -> None:
        super().__init__(file)
        self._load_storage = load_storage
        self._record_classes: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = _PYTHON2_MODULE_NAMES.get(module, module)
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[module, name]
        key = (module, name)
        if key not in self._record_classes:
            # A fresh subclass per name, so NEWOBJ (which needs a type) works and records stay distinct.
            self._record_classes[key] = type(
                name.rpartition(".")[2] or "PickledObject",
                (PickledObject,),
                {"pickled_module": module, "pickled_name": name, "__module__": __name__},
            )
        return self._record_classes[key]

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            return self._load_storage(pid)
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            # Legacy files store (class, source file, source text) beside each module class; the class
            # (already an inert record class) is all torch.load uses, and we never look at the source.
            return pid[1]
        raise CheckpointFormatError(f"unsupported persistent id {describe(pid)}")

    def _load_build(self) -> None:
        # BUILD sets the state of the object below it on the stack. Only objects this load created may get
        # one: an inert record, or an OrderedDict (torch state dicts carry a `_metadata` attribute). On
        # anything else (the objects standing for allowed names are shared by every load) it is refused.
        state = self.stack.pop()
        target = self.stack[-1]
        if isinstance(target, PickledObject):
            target.state = state
        elif type(target) is collections.OrderedDict and isinstance(state, dict):
            for key, value in state.items():
                if type(key) is not str or key.startswith("__"):
                    raise CheckpointFormatError(f"invalid attribute name {describe(key)} for an OrderedDict")
                setattr(target, key, value)
        else:
            raise CheckpointFormatError(f"the file tries to set the state of a {type(target).__name__}; refused")

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = _load_build


def unpickle_restricted(file: Any, load_storage: Callable[[tuple], Storage], path: Path) -> Any:
    try:
        return _RestrictedUnpickler(file, load_storage).load()
    except CheckpointFormatError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        TypeError,
        ValueError,
        AttributeError,
        IndexError,
        KeyError,
        struct.error,
        RuntimeError,  # also RecursionError: deeply nested containers
        MemoryError,
        OverflowError,
    ) as error:
        detail = str(error)
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        raise CheckpointFormatError(f"{path} is truncated or not a PyTorch checkpoint: {detail}") from None


def pickled_module_tensors(record: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The persistent parameters and buffers of a pickled `nn.Module` record, keyed like `state_dict()`."""
    state = record.state if isinstance(record, PickledObject) else None
    if not isinstance(state, Mapping) or "_parameters" not in state or "_modules" not in state:
        raise CheckpointFormatError(f"{prefix or 'the file'} is not a pickled torch.nn.Module ({describe(record)})")
    tensors: dict[str, torch.Tensor] = {}
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    named = list(state["_parameters"].items()) + [
        (name, buffer) for name, buffer in state.get("_buffers", {}).items() if name not in non_persistent
    ]
    for name, tensor in named:
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointFormatError(f"{prefix}{describe(name)} should be a tensor, found {describe(tensor)}")
        tensors[prefix + name] = tensor
    for name, child in state["_modules"].items():
        if child is not None:
            tensors.update(pickled_module_tensors(child, f"{prefix}{name}."))
    return tensors


def load_tensors_strict(module: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy `tensors` into `module`, requiring exactly its state-dict keys with exactly its shapes."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointFormatError(
            f"{source} does not match the model: missing keys {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}"
        )
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointFormatError(
                f"{source}: {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
            )
        if not tensor.dtype.is_floating_point:
            raise CheckpointFormatError(f"{source}: {key} has dtype {tensor.dtype}, expected floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointFormatError(f"{source}: {key} holds NaN or infinite values")
    module.load_state_dict(dict(tensors), strict=True)
