"""Size limits for reading training data, and opening sample files safely.

Training folders and shards are often collected from the web, so a sample file may be huge, a decompression
bomb, a symlink to `/dev/zero` or a FIFO. Each limit turns such a file into one skipped, counted sample
instead of exhausted memory or a hung run. They are module attributes read at every use, so a program can
raise one before building its dataset, e.g. `dalle_pytorch.data.limits.MAX_IMAGE_PIXELS = 20_000 ** 2`.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

from dalle_pytorch.text.captions import BadSampleError

MAX_CAPTION_BYTES = 2**20  # a caption file (or WebDataset caption member); real ones are a few KB
MAX_IMAGE_BYTES = 2**27  # an image file or WebDataset image member (128 MB)
MAX_IMAGE_PIXELS = 2**26  # width * height of a decoded image (~8192 x 8192): 192 MB as RGB


def open_regular_file(path: str | os.PathLike) -> BinaryIO:
    """Open a sample file for reading, refusing anything but a regular file (FIFOs, devices, sockets).

    Opened non-blocking first, so a FIFO without a writer cannot hang the open itself, then checked with
    `fstat` on the open descriptor (no race with a rename between the check and the open).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    descriptor = os.open(path, flags)
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise BadSampleError("not a regular file", f"{path} is a {_file_kind(mode)}, not a regular file")
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def read_capped(path: str | os.PathLike, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; BadSampleError(f"{what} too large") otherwise."""
    with open_regular_file(path) as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        detail = f"{path} is larger than {limit} bytes (see dalle_pytorch.data.limits)"
        raise BadSampleError(f"{what} too large", detail)
    return data


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISFIFO: "FIFO", stat.S_ISCHR: "character device", stat.S_ISBLK: "block device"}
    kinds.update({stat.S_ISSOCK: "socket", stat.S_ISDIR: "directory"})
    for test, name in kinds.items():
        if test(mode):
            return name
    return "special file"
