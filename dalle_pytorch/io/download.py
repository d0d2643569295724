"""Verified, resumable downloads of released weight files into a local cache.

`download(url, destination, sha256)` writes to `<destination>.part`, resumes a partial file with an HTTP
`Range` request when the server supports it (RFC 9110, section 14), and renames the file into place only
after its size and SHA-256 match. A wrong checksum deletes the partial file. Nothing here runs at import.

Released files whose SHA-256 this library does not know are fetched on trust on first use
(`fetch_released_file`): downloaded the same way, checked for size and structure (the caller's `verify`, e.g.
reading it with the restricted unpickler and checking its keys), and their SHA-256 is recorded beside them
(`<file>.sha256`) and printed; every later load checks the file against that record. Safety does not rest
on the hash (nothing in these files is executed, and a file that is not the expected model fails its
checks); the record catches a file that changed on disk. A hash pinned by the caller, by the environment
variable `pin_variable(file)` names, or recorded in this library is enforced before the file is used.

Environment variables:
- `DALLE_PYTORCH_CACHE`: cache directory (default `$XDG_CACHE_HOME/dalle_pytorch`, i.e.
  `~/.cache/dalle_pytorch`).
- `DALLE_PYTORCH_OFFLINE=1`: never touch the network; missing files raise a `DownloadError` saying which
  file to put where.
- `DALLE_PYTORCH_BASE_URL`: a mirror; released files are then fetched from `<base>/<cache file name>`.
- `DALLE_PYTORCH_SHA256_<CACHE NAME>` (e.g. `DALLE_PYTORCH_SHA256_OPENAI_DVAE_ENCODER_PKL`): the SHA-256 a
  released file must have.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from dalle_pytorch.io.atomic import atomic_write_file

__all__ = [
    "DownloadError",
    "ReleasedFile",
    "cache_directory",
    "download",
    "fetch_released_file",
    "is_offline",
    "pin_variable",
]

CACHE_ENV = "DALLE_PYTORCH_CACHE"
OFFLINE_ENV = "DALLE_PYTORCH_OFFLINE"
BASE_URL_ENV = "DALLE_PYTORCH_BASE_URL"
PIN_ENV_PREFIX = "DALLE_PYTORCH_SHA256_"
RECORD_SUFFIX = ".sha256"

_CHUNK_BYTES = 1 << 20
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


class DownloadError(RuntimeError):
    """A file could not be downloaded or failed verification; the message says what to do instead."""


@dataclass(frozen=True)
class ReleasedFile:
    """A published weight file: where it lives, how to verify it, and its name inside the cache.

    `sha256` / `size` are None when this version of dalle_pytorch does not record them; such a file is
    never downloaded (it cannot be verified), only used when the user puts it in the cache themselves.
    """

    cache_name: str  # relative path inside the cache directory and under a mirror base URL
    url: str
    sha256: str | None
    size: int | None
    description: str


def is_offline() -> bool:
    """True when `DALLE_PYTORCH_OFFLINE` is set to a true value (1, true, yes, on)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def cache_directory(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: `cache_dir` if given, else `$DALLE_PYTORCH_CACHE`, else the user cache."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    user_cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(user_cache).expanduser() / "dalle_pytorch"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manual_instructions(url: str, destination: Path) -> str:
    return f"Download {url} yourself (e.g. on a machine with network access) and put it at {destination}."


def download(
    url: str,
    destination: str | os.PathLike,
    sha256: str,
    size: int | None = None,
    *,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download `url` to `destination`, verified against `sha256` (and `size` in bytes when given).

    The data goes to `<destination>.part` first; an interrupted download leaves that file, and the next call
    resumes it with an HTTP Range request (or starts over if the server ignores ranges). Only a complete,
    verified file is renamed to `destination`; on a checksum or size mismatch the partial file is deleted
    and `DownloadError` is raised. Returns `destination` as a Path. An existing `destination` is replaced.
    """
    if not isinstance(sha256, str) or not _SHA256_PATTERN.fullmatch(sha256.lower()):
        raise ValueError(
            f"sha256 must be the 64-hex-digit SHA-256 of the file, got {sha256!r}; refusing to download "
            f"{url} without a checksum to verify it"
        )
    if size is not None and (not isinstance(size, int) or size < 0):
        raise ValueError(f"size must be a non-negative int or None, got {size!r}")
    destination = Path(destination)
    partial = _fetch_complete(url, destination, size, progress, timeout)
    actual_sha256 = _file_sha256(partial)
    if actual_sha256 != sha256.lower():
        partial.unlink()
        raise DownloadError(
            f"SHA-256 mismatch for {url}: expected {sha256.lower()}, got {actual_sha256}; "
            f"the downloaded file was deleted"
        )
    os.replace(partial, destination)
    return destination


def _fetch_complete(url: str, destination: Path, size: int | None, progress: bool, timeout: float) -> Path:
    """`<destination>.part` holding all of `url` (resumed when a partial file is there), of `size` bytes when
    given; raises DownloadError when offline, interrupted (the partial file is kept) or of the wrong size."""
    if is_offline():
        raise DownloadError(
            f"{OFFLINE_ENV} is set, so {url} is not downloaded. " + _manual_instructions(url, destination)
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    _fetch_into(url, partial, destination, size, progress, timeout)
    actual_size = partial.stat().st_size
    if size is not None and actual_size < size:
        raise DownloadError(
            f"download of {url} stopped at {actual_size} of {size} bytes; "
            f"the partial file {partial} is kept: call again to resume"
        )
    if size is not None and actual_size != size:
        partial.unlink()
        raise DownloadError(f"{url} gave {actual_size} bytes, expected {size}; the partial file was deleted")
    return partial


def _fetch_into(url: str, partial: Path, destination: Path, size: int | None, progress: bool, timeout: float) -> None:
    """Append the missing bytes of `url` to `partial` (starting over when ranges are not honoured)."""
    offset = partial.stat().st_size if partial.exists() else 0
    if size is not None and offset > size:  # stale partial from another file version
        partial.unlink()
        offset = 0
    if size is not None and offset == size:
        return  # complete already; verification decides
    request = urllib.request.Request(url, headers={"User-Agent": "dalle-pytorch"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    # A fresh opener reads proxy settings (and no_proxy) from the environment at call time.
    opener = urllib.request.build_opener()
    try:
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # nothing left to send: the partial file may be complete
            return
        raise DownloadError(
            f"{url} answered HTTP {error.code} {error.reason}. " + _manual_instructions(url, destination)
        ) from error
    except (urllib.error.URLError, OSError) as error:
        raise DownloadError(
            f"could not reach {url} ({getattr(error, 'reason', error)}). " + _manual_instructions(url, destination)
        ) from error

    with response:
        content_range = response.headers.get("Content-Range", "")
        resumed = offset > 0 and response.status == 206 and content_range.startswith(f"bytes {offset}-")
        if response.status == 206 and not resumed:
            partial.unlink(missing_ok=True)
            raise DownloadError(
                f"{url} answered with an unexpected range ({content_range!r}); the partial "
                "file was deleted: call again to download from the start"
            )
        if not resumed:
            offset = 0  # the server sent the whole file
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None and length.isdigit() else size
        with (
            open(partial, "ab" if resumed else "wb") as file,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=destination.name,
                disable=not progress,
            ) as bar,
        ):
            try:
                for chunk in iter(lambda: response.read(_CHUNK_BYTES), b""):
                    file.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as error:
                raise DownloadError(
                    f"download of {url} was interrupted ({error}); the partial file "
                    f"{partial} is kept: call again to resume"
                ) from error
    if total is not None and partial.stat().st_size < total:
        raise DownloadError(
            f"download of {url} was interrupted at {partial.stat().st_size} of {total} "
            f"bytes; the partial file {partial} is kept: call again to resume"
        )


def pin_variable(file: ReleasedFile) -> str:
    """The environment variable that pins `file`'s SHA-256: DALLE_PYTORCH_SHA256_ + its cache name."""
    return PIN_ENV_PREFIX + re.sub(r"[^A-Z0-9]+", "_", file.cache_name.upper()).strip("_")


def _record_path(destination: Path) -> Path:
    return destination.with_name(destination.name + RECORD_SUFFIX)


def _write_record(destination: Path, digest: str) -> None:
    atomic_write_file(_record_path(destination), lambda tmp: tmp.write_text(digest + "\n", encoding="utf-8"))


def _pinned_sha256(file: ReleasedFile, sha256: str | None) -> tuple[str | None, str]:
    """(the SHA-256 the file must have or None, where that pin comes from)."""
    for value, source in ((sha256, "sha256="), (os.environ.get(pin_variable(file)), pin_variable(file))):
        if value:
            if not _SHA256_PATTERN.fullmatch(value.strip().lower()):
                raise ValueError(f"{source} must be a 64-hex-digit SHA-256, got {value!r}")
            return value.strip().lower(), source
    return file.sha256, "this version of dalle_pytorch"


def _check_cached(file: ReleasedFile, destination: Path, pinned: str | None, source: str) -> None:
    """A cached file must match its pin and the SHA-256 recorded when it arrived; a file without a record
    (put there by hand) is recorded now."""
    digest = _file_sha256(destination)
    if pinned is not None and digest != pinned:
        raise DownloadError(
            f"{destination} has SHA-256 {digest}, but {source} pins {pinned}: delete the file to download it "
            "again, or correct the pin"
        )
    record = _record_path(destination)
    recorded = record.read_text(encoding="utf-8").strip() if record.is_file() else None
    if recorded is not None and digest != recorded:
        raise DownloadError(
            f"{destination} changed since it was downloaded: its SHA-256 is {digest}, {record} recorded {recorded}; "
            "delete both files to download it again"
        )
    if recorded is None:
        _write_record(destination, digest)
        print(f"{file.description}: {destination} has SHA-256 {digest} (recorded; pin it with "
              f"{pin_variable(file)}={digest})", file=sys.stderr)  # fmt: skip


def download_unpinned(
    url: str,
    destination: str | os.PathLike,
    size: int | None = None,
    *,
    verify: Callable[[Path], object] | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> tuple[Path, str]:
    """Download `url` to `destination` without a known SHA-256 (trust on first use): resumable and atomic as
    `download`, checked for `size` and by `verify(path)` (which raises when the file is not what is expected;
    the download is then deleted). Records the SHA-256 in `<destination>.sha256`; returns (path, sha256)."""
    destination = Path(destination)
    partial = _fetch_complete(url, destination, size, progress, timeout)
    if verify is not None:
        try:
            verify(partial)
        except Exception as error:  # whatever the check raises, the file is not usable
            partial.unlink()
            raise DownloadError(f"{url} does not hold the expected file ({error}); the download was deleted") from error
    digest = _file_sha256(partial)
    _write_record(destination, digest)  # before the rename: a file in place always has its record
    os.replace(partial, destination)
    return destination, digest


def fetch_released_file(
    file: ReleasedFile,
    cache_dir: str | os.PathLike | None = None,
    *,
    argument: str,
    progress: bool = True,
    sha256: str | None = None,
    verify: Callable[[Path], object] | None = None,
) -> Path:
    """Path of `file` in the cache, downloading and verifying it first if it is not there.

    `argument` names the constructor argument a user can pass instead (used in error messages). The file
    must have the SHA-256 pinned by `sha256`, the environment variable `pin_variable(file)` or the library
    (in that order); without a pin it is trusted on first use: `verify(path)` checks its structure, and its
    SHA-256 is recorded beside it, printed, and checked on every later call.
    """
    destination = cache_directory(cache_dir) / file.cache_name
    pinned, source = _pinned_sha256(file, sha256)
    if destination.is_file():
        _check_cached(file, destination, pinned, source)
        return destination
    base_url = os.environ.get(BASE_URL_ENV)
    url = f"{base_url.rstrip('/')}/{file.cache_name}" if base_url else file.url
    alternative = f"Alternatively pass {argument}=<path to the file>."
    if is_offline():
        raise DownloadError(
            f"{file.description} is not in the cache and {OFFLINE_ENV} is set. "
            f"{_manual_instructions(url, destination)} {alternative}"
        )
    try:
        if pinned is not None:
            path = download(url, destination, pinned, file.size, progress=progress)
            _write_record(path, pinned)
            return path
        path, digest = download_unpinned(url, destination, file.size, verify=verify, progress=progress)
    except DownloadError as error:
        raise DownloadError(f"{error} {alternative}") from error
    print(
        f"{file.description}: downloaded {path}, SHA-256 {digest}; recorded beside it and checked on every "
        f"load (pin it with {pin_variable(file)}={digest})",
        file=sys.stderr,
    )
    return path
