"""Reading `torch.save` files without running code from them.

A `torch.save` file is a pickle: a small program that names Python callables (`GLOBAL` opcodes) and calls
them. `torch.load(weights_only=False)` imports and calls whatever the file names, and since PyTorch 2.6 the
default `weights_only=True` refuses whole pickled modules such as OpenAI's released dVAE. This module reads
both kinds with a restricted unpickler:

- tensors are rebuilt by our own functions from the raw storage bytes (never by torch's `_rebuild_*`);
- plain containers (dict, list, tuple, set, OrderedDict) and scalars are rebuilt as usual;
- every other class or function named in the file becomes an inert `PickledObject` record holding the
  arguments and state the pickle gives it. Nothing is imported and no code named in the file is called.

Both container formats are read: the zip format (PyTorch >= 1.6; `archive/data.pkl` + `archive/data/<key>`,
storages memory-mapped so unused tensors, e.g. optimizer states, are never read) and the legacy format
(magic number, protocol, system info, pickle, storage keys, then raw storages).
Format references: https://docs.python.org/3/library/pickle.html#restricting-globals and
https://github.com/pytorch/pytorch/blob/main/torch/serialization.py (file layout facts only).
"""

from __future__ import annotations

import collections
import io
import mmap
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CheckpointFormatError",
    "PickledObject",
    "load_torch_file",
    "pickled_module_tensors",
    "load_tensors_strict",
]

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

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


class _Storage:
    """A flat tensor standing for one torch storage (all tensors viewing it share its memory)."""

    def __init__(self, flat: torch.Tensor) -> None:
        self.flat = flat


class _StorageType:
    """Marker for a `torch.<X>Storage` class named in the file: only says which dtype the bytes hold."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _as_shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(isinstance(v, int) for v in value):
        raise CheckpointFormatError(f"tensor {what} must be a tuple of ints, got {value!r}")
    return tuple(value)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_ignored: Any) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise CheckpointFormatError(f"tensor data must come from a storage record, got {storage!r}")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise CheckpointFormatError(f"tensor storage offset must be an int >= 0, got {storage_offset!r}")
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
    if isinstance(storage, _Storage) and isinstance(dtype, torch.dtype) and storage.flat.dtype != dtype:
        storage = _Storage(storage.flat.view(dtype))  # an untyped (byte) storage viewed as `dtype`
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, *_ignored: Any) -> Any:
    return data  # a Parameter is only a tensor to us; requires_grad and hooks are dropped


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if func in _TENSOR_REBUILDERS and isinstance(args, tuple):
        return func(*args)
    raise CheckpointFormatError(f"unsupported tensor rebuild function {func!r}")


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
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
    **{("torch", name): dtype for name, dtype in _DTYPES_BY_NAME.items()},
}
_PYTHON2_MODULE_NAMES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose `find_class` never imports: allowed names map to data, all else to records."""

    def __init__(self, file: io.BufferedIOBase, load_storage: Callable[[tuple], _Storage]) -> None:
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
        raise CheckpointFormatError(f"unsupported persistent id {repr(pid)[:200]}")


def _storage_dtype(storage_type: Any) -> torch.dtype:
    if isinstance(storage_type, _StorageType):
        return storage_type.dtype
    if isinstance(storage_type, torch.dtype):
        return storage_type
    raise CheckpointFormatError(f"unknown storage type {storage_type!r}")


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _load_zip(path: Path) -> Any:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise CheckpointFormatError(f"{path} is truncated or not a PyTorch zip checkpoint: {error}") from error
    with archive, open(path, "rb") as raw:
        pickles = [name for name in archive.namelist() if name.endswith("data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointFormatError(f"{path} holds no single '<archive>/data.pkl': not a torch.save file")
        prefix = pickles[0].removesuffix("data.pkl")
        if prefix + "byteorder" in archive.namelist() and archive.read(prefix + "byteorder") != b"little":
            raise CheckpointFormatError(f"{path} was written on a big-endian machine; not supported")
        file_size = os.fstat(raw.fileno()).st_size
        mapped = mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_COPY) if file_size else None
        storages: dict[str, _Storage] = {}

        def load_storage(pid: tuple) -> _Storage:
            _, storage_type, key, _location, numel = pid[:5]
            if key not in storages:
                dtype = _storage_dtype(storage_type)
                flat = _read_zip_storage(archive, mapped, f"{prefix}data/{key}", dtype, numel)
                storages[key] = _Storage(flat)
            return storages[key]

        return _unpickle(io.BytesIO(archive.read(pickles[0])), load_storage, path)


def _read_zip_storage(
    archive: zipfile.ZipFile, mapped: mmap.mmap | None, name: str, dtype: torch.dtype, numel: Any
) -> torch.Tensor:
    try:
        info = archive.getinfo(name)
    except KeyError as error:
        raise CheckpointFormatError(f"storage {name} is missing from the archive") from error
    nbytes = info.file_size
    if not isinstance(numel, int) or nbytes % _element_size(dtype) or nbytes // _element_size(dtype) < numel:
        raise CheckpointFormatError(f"storage {name} holds {nbytes} bytes, too few for {numel} x {dtype}")
    if info.compress_type == zipfile.ZIP_STORED and mapped is not None:
        # Local header: 30 fixed bytes, then the file name and an extra field whose lengths it records.
        header = mapped[info.header_offset : info.header_offset + 30]
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_length + extra_length
        if start + nbytes <= len(mapped) and start % _element_size(dtype) == 0:
            return torch.frombuffer(mapped, dtype=dtype, count=nbytes // _element_size(dtype), offset=start)
    return torch.frombuffer(bytearray(archive.read(name)), dtype=dtype)


def _load_legacy(path: Path) -> Any:
    with open(path, "rb") as file:

        def no_storage(pid: tuple) -> _Storage:
            raise CheckpointFormatError("unexpected storage in the file header")

        magic = _unpickle(file, no_storage, path)
        if magic != _LEGACY_MAGIC_NUMBER:
            raise CheckpointFormatError(f"{path} is not a PyTorch checkpoint (bad magic number)")
        if _unpickle(file, no_storage, path) != _LEGACY_PROTOCOL_VERSION:
            raise CheckpointFormatError(f"{path} uses an unsupported legacy protocol version")
        system_info = _unpickle(file, no_storage, path)
        if isinstance(system_info, dict) and system_info.get("little_endian") is False:
            raise CheckpointFormatError(f"{path} was written on a big-endian machine; not supported")

        storages: dict[str, _Storage] = {}
        file_size = os.fstat(file.fileno()).st_size

        def load_storage(pid: tuple) -> _Storage:
            _, storage_type, key, _location, numel = pid[:5]
            dtype = _storage_dtype(storage_type)
            # The bytes follow in the same file: a larger claim is a truncated or forged file.
            if not isinstance(numel, int) or numel < 0 or numel * _element_size(dtype) > file_size:
                raise CheckpointFormatError(f"{path}: invalid storage size {numel!r} (truncated file?)")
            if key not in storages:  # filled in below: the raw bytes follow the pickle
                storages[key] = _Storage(torch.empty(numel, dtype=dtype))
            view_metadata = pid[5] if len(pid) > 5 else None
            if view_metadata is not None:  # (view_key, offset, size) of a storage slice, torch < 1.x
                _view_key, offset, size = view_metadata
                return _Storage(storages[key].flat[offset : offset + size])
            return storages[key]

        result = _unpickle(file, load_storage, path)
        keys = _unpickle(file, no_storage, path)
        if not isinstance(keys, list):
            raise CheckpointFormatError(f"{path} has no storage key list: not a PyTorch checkpoint")
        for key in keys:
            storage = storages.get(key)
            if storage is None:
                raise CheckpointFormatError(f"{path} lists storage {key!r} that no tensor uses")
            header = file.read(8)
            expected_bytes = storage.flat.numel() * storage.flat.element_size()
            data = file.read(expected_bytes) if len(header) == 8 else b""
            if len(data) != expected_bytes or struct.unpack("<q", header)[0] != storage.flat.numel():
                raise CheckpointFormatError(f"{path} is truncated (storage {key!r} incomplete)")
            storage.flat.copy_(torch.frombuffer(bytearray(data), dtype=storage.flat.dtype))
        return result


def _unpickle(file: io.BufferedIOBase, load_storage: Callable[[tuple], _Storage], path: Path) -> Any:
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
        RuntimeError,
    ) as error:
        raise CheckpointFormatError(f"{path} is truncated or not a PyTorch checkpoint: {error}") from error


def load_torch_file(path: str | os.PathLike) -> Any:
    """Read a `torch.save` file (zip or legacy format) without importing or calling anything it names.

    Returns the saved object with tensors rebuilt (CPU, zip storages memory-mapped copy-on-write), plain
    containers as usual, and every other object as an inert `PickledObject` record.
    Raises `CheckpointFormatError` (a ValueError) for truncated files or files that are not checkpoints.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    with open(path, "rb") as file:
        head = file.read(4)
    if head.startswith(b"PK\x03\x04"):
        return _load_zip(path)
    if head[:1] == b"\x80":  # a pickle protocol opcode: the legacy format starts with a pickled int
        return _load_legacy(path)
    raise CheckpointFormatError(f"{path} is not a PyTorch checkpoint (starts with {head!r})")


def pickled_module_tensors(record: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The persistent parameters and buffers of a pickled `nn.Module` record, keyed like `state_dict()`."""
    state = record.state if isinstance(record, PickledObject) else None
    if not isinstance(state, Mapping) or "_parameters" not in state or "_modules" not in state:
        raise CheckpointFormatError(f"{prefix or 'the file'} is not a pickled torch.nn.Module ({record!r})")
    tensors: dict[str, torch.Tensor] = {}
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    named = list(state["_parameters"].items()) + [
        (name, buffer) for name, buffer in state.get("_buffers", {}).items() if name not in non_persistent
    ]
    for name, tensor in named:
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointFormatError(f"{prefix}{name} should be a tensor, found {tensor!r}")
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
    module.load_state_dict(dict(tensors), strict=True)
