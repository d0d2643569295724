"""Opening input files that may not be what their name says: a FIFO, a device or a link to `/dev/zero`
named `caption.txt` must be refused, not read forever or waited on."""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

__all__ = ["NotARegularFileError", "open_regular_file"]


class NotARegularFileError(OSError):
    """The path is a FIFO, device, socket or directory, not a regular file."""


def open_regular_file(path: str | os.PathLike) -> BinaryIO:
    """Open `path` for binary reading, refusing anything but a regular file with NotARegularFileError.

    Opened non-blocking first, so a FIFO without a writer cannot hang the open itself, then checked with
    `fstat` on the open descriptor (no race with a rename between the check and the open).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    descriptor = os.open(path, flags)
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFileError(f"{path} is a {_file_kind(mode)}, not a regular file")
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISFIFO: "FIFO", stat.S_ISCHR: "character device", stat.S_ISBLK: "block device"}
    kinds.update({stat.S_ISSOCK: "socket", stat.S_ISDIR: "directory"})
    for test, name in kinds.items():
        if test(mode):
            return name
    return "special file"
