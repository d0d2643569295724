"""Atomic filesystem writes: a file or a whole directory appears complete or not at all.

Everything is written to a hidden temporary sibling (`.NAME.tmp-<12 hex>`), made durable with fsync, and
renamed into place, so a crash or `kill -9` at any point leaves the previous version readable. A directory
replaces an existing one in one atomic step with Linux `renameat2(RENAME_EXCHANGE)`
(https://man7.org/linux/man-pages/man2/rename.2.html); elsewhere with two renames, and a crash between
them leaves the previous version as a `.NAME.old-<hex>` sibling that `interrupted_backups` finds.
One process writes a given path at a time.
"""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write_dir", "atomic_write_file", "interrupted_backups", "replace_directory", "temp_sibling"]

PathLike = str | os.PathLike


def temp_sibling(path: Path, tag: str) -> Path:
    """A fresh hidden path beside `path`: `.NAME.{tag}-<12 hex digits>` (e.g. tmp, old)."""
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}")


def interrupted_backups(path: Path) -> list[Path]:
    """The `.NAME.old-*` siblings a crash between the two renames of `replace_directory` leaves behind."""
    return [Path(found) for found in glob.glob(str(path.parent / f".{glob.escape(path.name)}.old-*"))]


def atomic_write_file(path: Path, write: Callable[[Path], None]) -> None:
    """Calls `write(tmp)` to write a temporary sibling file, fsyncs it and renames it to `path`.

    If `write` raises, the temporary file is removed and `path` keeps its previous content.
    """
    tmp = temp_sibling(path, "tmp")
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_dir(path: Path, fill: Callable[[Path], None]) -> Path:
    """Calls `fill(tmp)` on a new temporary sibling directory, fsyncs it, then swaps it in for `path`.

    Any previous directory at `path` is replaced as a whole (a symlink is followed). If `fill` raises, the
    temporary directory is removed and `path` is untouched. Leftovers of earlier interrupted writes of
    `path` are removed after a success. Returns the path written.
    """
    if path.is_symlink():
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path, "tmp")
    try:
        tmp.mkdir()
        fill(tmp)
        for folder, _, files in os.walk(tmp):
            for name in files:
                _fsync_file(os.path.join(folder, name))
            _fsync_dir(folder)
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for tag in ("tmp", "old"):  # leftovers of earlier interrupted saves of this path
        for leftover in glob.glob(str(path.parent / f".{glob.escape(path.name)}.{tag}-*")):
            shutil.rmtree(leftover, ignore_errors=True)
    return path


def replace_directory(new: Path, path: Path) -> None:
    """Moves directory `new` to `path`, deleting what was at `path`; atomic where renameat2 exists."""
    if not path.exists():
        os.replace(new, path)
    elif _exchange_directories(new, path):  # one atomic step: `new` now holds the old directory
        shutil.rmtree(new)
    else:
        # Two renames; a crash between them leaves only the backup, which `interrupted_backups` finds.
        backup = temp_sibling(path, "old")
        os.replace(path, backup)
        try:
            os.replace(new, path)
        except BaseException:
            os.replace(backup, path)
            raise
        shutil.rmtree(backup)
    _fsync_dir(path.parent)


def _exchange_directories(a: Path, b: Path) -> bool:
    """Atomically swaps two paths with Linux renameat2(RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _fsync_file(path: PathLike) -> None:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def _fsync_dir(path: PathLike) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
