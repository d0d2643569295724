"""The two containers of `torch.save` files, read around the restricted unpickler of `safe_pickle`.

- zip format (PyTorch >= 1.6): `archive/data.pkl` + `archive/data/<key>`; storages memory-mapped so unused
  tensors (e.g. optimizer states) are never read. Each storage must have exactly the size its tensors declare,
  checked before anything is decompressed, and compressed entries may expand at most `MAX_COMPRESSION_RATIO`
  times.
- legacy format: magic number, protocol, system info, pickle, storage keys, then raw storages; every storage
  the pickle declares must be filled from the file exactly.

Format reference (file layout facts only): https://github.com/pytorch/pytorch/blob/main/torch/serialization.py
"""

from __future__ import annotations

import io
import mmap
import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from dalle_pytorch.io.safe_pickle import (
    CheckpointFormatError,
    Storage,
    StorageType,
    describe,
    unpickle_restricted,
)

__all__ = ["MAX_COMPRESSION_RATIO", "load_torch_file"]

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

# Compressed zip entries may expand at most this many times (torch.save stores entries uncompressed; a
# deflated entry of zeros can reach ~1000x, the size of a zip bomb). Raise it to read re-zipped files.
MAX_COMPRESSION_RATIO = 50


class _BoundedReader:
    """A file object that never reads past `end`, so a length in the pickle can only claim what is there."""

    def __init__(self, file: Any, end: int) -> None:
        self._file, self._end = file, end

    def _left(self) -> int:
        return max(0, self._end - self._file.tell())

    def read(self, size: int = -1) -> bytes:
        left = self._left()
        return self._file.read(left if size is None or size < 0 or size > left else size)

    def readline(self, size: int = -1) -> bytes:
        left = self._left()
        return self._file.readline(left if size is None or size < 0 or size > left else size)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)
        return self._file.readinto(view[: self._left()])


def _storage_dtype(storage_type: Any) -> torch.dtype:
    if isinstance(storage_type, StorageType):
        return storage_type.dtype
    if isinstance(storage_type, torch.dtype):
        return storage_type
    raise CheckpointFormatError(f"unknown storage type {describe(storage_type)}")


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _storage_bytes(pid: tuple, path: Path) -> tuple[torch.dtype, int]:
    """dtype and byte size of the storage a persistent id declares (checked to be a sane int)."""
    _, storage_type, _key, _location, numel = pid[:5]
    dtype = _storage_dtype(storage_type)
    if type(numel) is not int or numel < 0:
        raise CheckpointFormatError(f"{path}: invalid storage size {describe(numel)}")
    return dtype, numel * _element_size(dtype)


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
        byteorder = archive.NameToInfo.get(prefix + "byteorder")
        if byteorder is not None and _read_zip_member(archive, byteorder, path) != b"little":
            raise CheckpointFormatError(f"{path} was written on a big-endian machine; not supported")
        file_size = os.fstat(raw.fileno()).st_size
        mapped = mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_COPY) if file_size else None
        storages: dict[str, Storage] = {}

        def load_storage(pid: tuple) -> Storage:
            key = pid[2]
            if not isinstance(key, str):
                raise CheckpointFormatError(f"{path}: storage key should be a string, got {describe(key)}")
            if key not in storages:
                dtype, nbytes = _storage_bytes(pid, path)
                flat = _read_zip_storage(archive, mapped, f"{prefix}data/{key}", dtype, nbytes, path)
                storages[key] = Storage(flat)
            return storages[key]

        data = _read_zip_member(archive, archive.getinfo(pickles[0]), path)
        return unpickle_restricted(io.BytesIO(data), load_storage, path)


def _read_zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> bytes:
    """An entry's bytes, refusing before decompressing when it would expand more than allowed."""
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
        raise CheckpointFormatError(
            f"{path}: entry {info.filename} expands from {info.compress_size} to {info.file_size} bytes, more "
            f"than {MAX_COMPRESSION_RATIO}x (a zip bomb?); see dalle_pytorch.io.torch_files.MAX_COMPRESSION_RATIO"
        )
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as error:
        raise CheckpointFormatError(f"{path}: entry {info.filename} is unreadable: {error}") from error


def _read_zip_storage(
    archive: zipfile.ZipFile, mapped: mmap.mmap | None, name: str, dtype: torch.dtype, nbytes: int, path: Path
) -> torch.Tensor:
    try:
        info = archive.getinfo(name)
    except KeyError as error:
        raise CheckpointFormatError(f"{path}: storage {name} is missing from the archive") from error
    # The size the pickle declares and the size the archive declares must agree before anything is read.
    if info.file_size != nbytes:
        raise CheckpointFormatError(
            f"{path}: storage {name} holds {info.file_size} bytes, but its tensors declare {nbytes} bytes"
        )
    if info.compress_type == zipfile.ZIP_STORED and mapped is not None:
        # Local header: 30 fixed bytes, then the file name and an extra field whose lengths it records.
        header = mapped[info.header_offset : info.header_offset + 30]
        if len(header) == 30:
            name_length, extra_length = struct.unpack("<HH", header[26:30])
            start = info.header_offset + 30 + name_length + extra_length
            if start + nbytes <= len(mapped) and start % _element_size(dtype) == 0:
                return torch.frombuffer(mapped, dtype=dtype, count=nbytes // _element_size(dtype), offset=start)
    data = _read_zip_member(archive, info, path)
    if len(data) != nbytes:
        raise CheckpointFormatError(f"{path}: storage {name} is truncated")
    return torch.frombuffer(bytearray(data), dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)


def _load_legacy(path: Path) -> Any:
    with open(path, "rb") as raw:
        file_size = os.fstat(raw.fileno()).st_size
        file = _BoundedReader(raw, file_size)

        def no_storage(pid: tuple) -> Storage:
            raise CheckpointFormatError("unexpected storage in the file header")

        magic = unpickle_restricted(file, no_storage, path)
        if magic != _LEGACY_MAGIC_NUMBER:
            raise CheckpointFormatError(f"{path} is not a PyTorch checkpoint (bad magic number)")
        if unpickle_restricted(file, no_storage, path) != _LEGACY_PROTOCOL_VERSION:
            raise CheckpointFormatError(f"{path} uses an unsupported legacy protocol version")
        system_info = unpickle_restricted(file, no_storage, path)
        if isinstance(system_info, dict) and system_info.get("little_endian") is False:
            raise CheckpointFormatError(f"{path} was written on a big-endian machine; not supported")

        storages: dict[str, Storage] = {}
        declared = 0

        def load_storage(pid: tuple) -> Storage:
            nonlocal declared
            key = pid[2]
            if not isinstance(key, str):
                raise CheckpointFormatError(f"{path}: storage key should be a string, got {describe(key)}")
            if key not in storages:  # filled below: the raw bytes follow the pickle
                dtype, nbytes = _storage_bytes(pid, path)
                # All storages follow in this file: claims beyond its size are a truncated or forged file.
                declared += nbytes
                if declared > file_size:
                    raise CheckpointFormatError(f"{path}: storages declare more bytes than the file holds")
                storages[key] = Storage(torch.empty(nbytes // _element_size(dtype), dtype=dtype))
            view_metadata = pid[5] if len(pid) > 5 else None
            if view_metadata is not None:  # (view_key, offset, size) of a storage slice, torch < 1.x
                if not (isinstance(view_metadata, tuple) and len(view_metadata) == 3):
                    raise CheckpointFormatError(f"{path}: invalid storage view {describe(view_metadata)}")
                _view_key, offset, size = view_metadata
                flat = storages[key].flat
                if type(offset) is not int or type(size) is not int or not 0 <= offset <= offset + size <= len(flat):
                    raise CheckpointFormatError(f"{path}: storage view {describe(view_metadata)} is out of range")
                return Storage(flat[offset : offset + size])
            return storages[key]

        result = unpickle_restricted(file, load_storage, path)
        keys = unpickle_restricted(file, no_storage, path)
        if not isinstance(keys, list):
            raise CheckpointFormatError(f"{path} has no storage key list: not a PyTorch checkpoint")
        filled: set[str] = set()
        for key in keys:
            storage = storages.get(key) if isinstance(key, str) else None
            if storage is None:
                raise CheckpointFormatError(f"{path} lists storage {describe(key)} that no tensor uses")
            if key in filled:
                raise CheckpointFormatError(f"{path} lists storage {describe(key)} twice")
            header = file.read(8)
            expected_bytes = storage.flat.numel() * storage.flat.element_size()
            data = file.read(expected_bytes) if len(header) == 8 else b""
            if len(data) != expected_bytes or struct.unpack("<q", header)[0] != storage.flat.numel():
                raise CheckpointFormatError(f"{path} is truncated (storage {describe(key)} incomplete)")
            if expected_bytes:
                storage.flat.copy_(torch.frombuffer(bytearray(data), dtype=storage.flat.dtype))
            filled.add(key)
        # A storage the pickle uses but the key list never fills would hand out uninitialised memory.
        unfilled = sorted(set(storages) - filled)
        if unfilled:
            raise CheckpointFormatError(
                f"{path}: storage {describe(unfilled[0])} is used by a tensor but its data is not in the file"
                f"{f' ({len(unfilled)} storages missing)' if len(unfilled) > 1 else ''}"
            )
        return result


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
