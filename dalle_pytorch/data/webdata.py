"""Streaming image-caption pairs from WebDataset .tar shards, for data too large for a folder.

A shard is a tar file whose members are grouped into samples by name without extension: `0001.jpg` and
`0001.txt` form one sample with keys 'jpg' and 'txt' (format: https://github.com/webdataset/webdataset).
Reading uses the `webdataset` package (optional: `pip install webdataset`); images and
captions go through the same preprocessing as the folder dataset (`dalle_pytorch.data.text_image`).

Shards may be local paths, `http(s)://` URLs or `pipe:COMMAND` URLs, all written by the user. Local shards
are opened as plain files here, so a file name never reaches a shell or a URL handler.
"""

from __future__ import annotations

import gzip
import io
import os
import random
import re
import tarfile
import warnings
import zlib
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dalle_pytorch.data import limits
from dalle_pytorch.data.text_image import (
    SAMPLE_ERRORS,
    BadSampleError,
    SkipLog,
    Tokenizer,
    captions_from_bytes,
    check_image_options,
    check_tokenizer,
    open_image,
    pick_caption,
    preprocess_image,
    reason_for,
    tokenize_caption,
)

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
REMOTE_PREFIXES = ("http://", "https://", "pipe:")
_ANY_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

Shard = Path | str  # a Path is a local file; a str is a remote URL the user wrote


def require_webdataset() -> Any:
    try:
        import webdataset
    except ImportError as error:
        raise ImportError("reading .tar shards needs the webdataset package: pip install webdataset") from error
    return webdataset


def expand_shards(urls: str | os.PathLike | list[str | os.PathLike]) -> list[Shard]:
    """Shards from a directory (its *.tar, *.tar.gz, *.tgz files, sorted), a brace pattern such as
    `data/shard-{000..009}.tar`, one path or URL, or a list of these. Local shards must exist."""
    from braceexpand import braceexpand  # installed with webdataset

    if isinstance(urls, (str, os.PathLike)):
        items = [urls]
    elif isinstance(urls, (list, tuple)):
        items = list(urls)
    else:
        raise TypeError(f"urls must be a path, a URL or a list of them, got {type(urls).__name__}")
    shards: list[Shard] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"urls must hold paths or URL strings, got {type(item).__name__}")
        item = os.fspath(item)
        if item.startswith(REMOTE_PREFIXES):
            shards.extend(braceexpand(item))
            continue
        if item.startswith("file://"):
            item = url2pathname(urlparse(item).path)
        elif _ANY_SCHEME.match(item):
            raise ValueError(
                f"urls: unsupported scheme in {item!r}; use a local path, http(s):// or an explicit "
                "'pipe:COMMAND' that writes the shard to stdout"
            )
        path = Path(item)
        if path.is_dir():
            found = [p for p in sorted(path.iterdir()) if p.name.lower().endswith(SHARD_SUFFIXES)]
            found = [p for p in found if p.is_file()]
            if not found:
                raise ValueError(f"urls: directory {item!r} holds no {'/'.join(SHARD_SUFFIXES)} shard")
            shards.extend(found)
        elif path.is_file():
            shards.append(path)
        else:
            expanded = [Path(p) for p in braceexpand(item)]
            missing = [str(p) for p in expanded if not p.is_file()]
            if missing:
                raise ValueError(f"urls: shard not found: {missing[0]!r} ({len(missing)} missing)")
            shards.extend(expanded)
    if not shards:
        raise ValueError("urls is empty: give a directory, a brace pattern or a list of shards")
    return shards


def open_shard(shard: Shard) -> Any:
    """A binary stream of a shard: local files directly, URLs through webdataset's `gopen`."""
    if isinstance(shard, Path):
        return open(shard, "rb")  # noqa: SIM115 -- the generator that yields it closes it
    return require_webdataset().gopen(shard)


class _Prepended:
    """A read-only stream: `head` (bytes already read from `stream`), then the rest of `stream`."""

    def __init__(self, head: bytes, stream: Any) -> None:
        self._head, self._stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self._head:
            return self._stream.read(size)
        if size is None or size < 0:
            data, self._head = self._head + self._stream.read(), b""
            return data
        data, self._head = self._head[:size], self._head[size:]
        return data + (self._stream.read(size - len(data)) if size > len(data) else b"")


def _bounded_decompression(stream: Any) -> tuple[Any, str]:
    """(stream, tarfile mode) for a shard stream. A gzip shard is decompressed by `gzip.GzipFile`, which
    inflates only as much as each read asks for; tarfile's own streaming decompressor inflates whole input
    blocks, which for a highly compressed member means megabytes per 10 KB read."""
    head = stream.read(2)
    joined = _Prepended(head, stream)
    if head == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=joined, mode="rb"), "r|"
    return joined, "r|*"


def _key_list(name: str, keys: str) -> list[str]:
    if not isinstance(keys, str):
        raise TypeError(f"{name} must be a string like 'jpg;png', got {type(keys).__name__}")
    parsed = [key.strip().lstrip(".").lower() for key in keys.split(";") if key.strip()]
    if not parsed:
        raise ValueError(f"{name} must name at least one extension, got {keys!r}")
    return parsed


class TextImageWebDataset(IterableDataset):
    """An iterable of `(text_tokens, image)` from tar shards, like `TextImageDataset` but streamed.

    text_tokens: LongTensor (text_len,); image: float (3 or 4 with `transparent`, image_size, image_size)
    in [0, 1]. `image_key` / `caption_key` list accepted extensions separated by ';' (first present wins).

    Each epoch the shard list is shuffled with `seed` and the epoch number (call `set_epoch` like with
    DistributedSampler; every rank must use the same seed), then split across ranks (torch.distributed
    when initialized, or `rank` / `world_size`) and across DataLoader workers; give at least
    `world_size * num_workers` shards or some readers get none. Samples are shuffled in a buffer of
    `shuffle_buffer` (0 disables), with torch's RNG like the crops, so a DataLoader with a seeded
    `generator` is reproducible (without workers: `torch.manual_seed`). `set_epoch` does not reach
    persistent workers (`persistent_workers=True`), whose shard order then stays fixed. Unreadable
    shards and bad samples are warned about once, counted in `skipped` (per process: counts made inside
    DataLoader workers stay in the workers) and skipped.
    """

    def __init__(
        self,
        urls: str | os.PathLike | list[str | os.PathLike],
        *,
        text_len: int = 256,
        image_size: int = 128,
        tokenizer: Tokenizer | None = None,
        image_key: str = "jpg;png;jpeg;webp",
        caption_key: str = "txt",
        truncate_captions: bool = False,
        resize_ratio: float = 0.75,
        transparent: bool = False,
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        require_webdataset()
        check_image_options(text_len, image_size, resize_ratio)
        if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be an int >= 0, got {shuffle_buffer!r}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (then torch.distributed decides)")
        if world_size is not None and not (
            isinstance(rank, int) and isinstance(world_size, int) and 0 <= rank < world_size
        ):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        self.shards = expand_shards(urls)
        self.image_keys = _key_list("image_key", image_key)
        self.caption_keys = _key_list("caption_key", caption_key)
        self.text_len = text_len
        self.image_size = image_size
        self.truncate_captions = truncate_captions
        self.resize_ratio = resize_ratio
        self.transparent = transparent
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_shards = shuffle_shards
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip_log = SkipLog()
        self._current_shard = "shard"
        self.tokenizer = check_tokenizer(tokenizer)

    @property
    def skipped(self) -> Counter[str]:
        """Counter of skipped shards and samples by reason (in this process)."""
        return self.skip_log.counts

    def set_epoch(self, epoch: int) -> None:
        """Choose the shard order of the coming epoch (the same on every rank)."""
        self.epoch = int(epoch)

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.world_size is not None:
            return self.rank, self.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def shards_for_this_reader(self) -> list[Shard]:
        """This rank's and this worker's share of the epoch's shard order (disjoint across readers)."""
        order = list(self.shards)
        if self.shuffle_shards:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
            order = [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]
        rank, world_size = self._rank_and_world_size()
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        mine = order[rank::world_size][worker_id::num_workers]
        if not mine:
            warnings.warn(
                f"rank {rank} worker {worker_id} reads no shard: {len(order)} shard(s) for "
                f"{world_size * num_workers} readers",
                RuntimeWarning,
                stacklevel=2,
            )
        return mine

    def __iter__(self):
        wds = require_webdataset()
        from webdataset.tariterators import group_by_keys

        streams = self._open_shards(self.shards_for_this_reader())
        samples = group_by_keys(self._members(streams), handler=self._shard_error)
        if self.shuffle_buffer > 1:
            rng = random.Random(int(torch.randint(2**62, ())))
            initial = min(self.shuffle_buffer, 100)
            samples = wds.shuffle(self.shuffle_buffer, initial=initial, rng=rng)(samples)
        for sample in samples:
            where = f"{sample.get('__url__')}:{sample.get('__key__')}"
            try:
                caption, image = self._read(sample)
                tokens = tokenize_caption(self.tokenizer, caption, self.text_len, self.truncate_captions, where)
            except SAMPLE_ERRORS as error:
                self.skip_log.record(where, reason_for(error, "image"), str(error))
                continue
            yield tokens, image

    def _members(self, streams: Any) -> Any:
        """The used members of each shard as {'fname', 'data', '__url__'}, then {} at the end of the shard.

        Like webdataset's tar expander, but a member's size is checked from its tar header before it is read
        (`limits.MAX_CAPTION_BYTES` for caption keys, `limits.MAX_IMAGE_BYTES` for the rest), members of
        other keys are never read, and an oversized member is one skipped, counted sample.
        """
        for source in streams:
            url = source["url"]
            try:
                stream, mode = _bounded_decompression(source["stream"])
                with tarfile.open(fileobj=stream, mode=mode) as archive:
                    for member in archive:
                        extension = member.name.rpartition("/")[2].partition(".")[2].lower()
                        if not member.isreg() or extension not in self.image_keys + self.caption_keys:
                            continue
                        limit = limits.MAX_CAPTION_BYTES if extension in self.caption_keys else limits.MAX_IMAGE_BYTES
                        if member.size > limit:
                            detail = f"{member.size} bytes, more than {limit} (see dalle_pytorch.data.limits)"
                            self.skip_log.record(f"{url}:{member.name}", "member too large", detail)
                            continue
                        data = archive.extractfile(member).read()
                        archive.members = []  # a streamed tar would otherwise keep every header
                        yield {"fname": member.name, "data": data, "__url__": url}
            except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
                self._shard_error(error)
            yield {}  # end of shard: members of two shards never form one sample

    def _open_shards(self, shards: list[Shard]):
        for shard in shards:
            try:
                stream = open_shard(shard)
            except OSError as error:
                self.skip_log.record(str(shard), reason_for(error, "shard"), str(error))
                continue
            # webdataset's handlers get only the exception: remember which shard is being read
            self._current_shard = str(shard)
            try:
                yield {"url": str(shard), "stream": stream}
            finally:
                try:
                    stream.close()  # for pipe: URLs this checks the command's exit status
                except OSError as error:
                    self.skip_log.record(str(shard), "unreadable shard", str(error))

    def _shard_error(self, error: Exception) -> bool:
        """webdataset handler: count the broken shard once and go on (with its next member or shard)."""
        detail = str(error.args[0]) if error.args else repr(error)
        self.skip_log.record(self._current_shard, "unreadable shard", detail)
        return True

    def _read(self, sample: dict[str, Any]) -> tuple[str, torch.Tensor]:
        """One caption and the preprocessed image of a grouped tar sample."""
        image_bytes = next((sample[key] for key in self.image_keys if key in sample), None)
        caption_bytes = next((sample[key] for key in self.caption_keys if key in sample), None)
        if caption_bytes is None:
            raise BadSampleError("missing caption", f"no {'/'.join(self.caption_keys)} entry")
        if image_bytes is None:
            raise BadSampleError("missing image", f"no {'/'.join(self.image_keys)} entry")
        captions = captions_from_bytes(caption_bytes)
        pixels = open_image(io.BytesIO(image_bytes))
        # random draws only after both files decoded, so bad samples never shift torch's RNG stream
        caption = pick_caption(captions)
        return caption, preprocess_image(pixels, self.image_size, self.resize_ratio, self.transparent)


def webdataset_loader(
    urls: str | os.PathLike | list[str | os.PathLike],
    *,
    batch_size: int,
    num_workers: int = 0,
    drop_last: bool = False,
    generator: torch.Generator | None = None,
    pin_memory: bool = False,
    **dataset_kwargs: Any,
) -> DataLoader:
    """A DataLoader of batches `(text_tokens (b, text_len), images (b, c, image_size, image_size))` over
    tar shards; `dataset_kwargs` go to `TextImageWebDataset` (text_len, image_size, tokenizer, image_key,
    caption_key, shuffle_buffer, seed, ...). Reach the dataset as `loader.dataset` for `set_epoch` and
    `skipped`. Batches are formed inside each worker, so the last batch of each worker may be short."""
    for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    dataset = TextImageWebDataset(urls, **dataset_kwargs)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        pin_memory=pin_memory,
    )
