"""Size limits for reading training data, and reading a sample file within one.

Training folders and shards are often collected from the web, so a sample file may be huge, a decompression
bomb, a symlink to `/dev/zero` or a FIFO. Each limit turns such a file into one skipped, counted sample
instead of exhausted memory or a hung run. They are module attributes read at every use, so a program can
raise one before building its dataset, e.g. `dalle_pytorch.data.limits.MAX_IMAGE_PIXELS = 20_000 ** 2`.
"""

from __future__ import annotations

import os

from dalle_pytorch.io.files import open_regular_file
from dalle_pytorch.text.captions import BadSampleError

MAX_CAPTION_BYTES = 2**20  # a caption file (or WebDataset caption member); real ones are a few KB
MAX_IMAGE_BYTES = 2**27  # an image file or WebDataset image member (128 MB)
MAX_IMAGE_PIXELS = 2**26  # width * height of a decoded image (~8192 x 8192): 192 MB as RGB


def read_capped(path: str | os.PathLike, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; BadSampleError(f"{what} too large") otherwise
    (NotARegularFileError, an OSError, for FIFOs, devices and the like)."""
    with open_regular_file(path) as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        detail = f"{path} is larger than {limit} bytes (see dalle_pytorch.data.limits)"
        raise BadSampleError(f"{what} too large", detail)
    return data
