"""Hostile training data: huge, special or binary files are skipped and counted, never read without limit."""

import io
import os
import struct
import tarfile
import threading
import tracemalloc
import warnings
import zlib

import pytest

from dalle_pytorch.data import limits
from dalle_pytorch.data.text_image import NoUsableSampleError, TextImageDataset
from tests.test_data import ByteTokenizer, caption_of, image_bytes, write

TEXT_LEN = 24


def _dataset(folder, **kwargs) -> TextImageDataset:
    kwargs = {"text_len": TEXT_LEN, "image_size": 8, "tokenizer": ByteTokenizer(), **kwargs}
    return TextImageDataset(folder, **kwargs)


def _read_all(dataset) -> list[str]:
    """Captions of every sample `dataset[i]` returns (a bad sample is replaced by the next good one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sorted({caption_of(dataset[i][0]) for i in range(len(dataset))})


def _good_and_bad(tmp_path, bad_caption=None):
    write(tmp_path / "good.png", image_bytes())
    write(tmp_path / "good.txt", "a good caption")
    write(tmp_path / "bad.png", image_bytes())
    if bad_caption is not None:
        write(tmp_path / "bad.txt", bad_caption)


def _in_thread(call, timeout=10.0):
    """Runs `call` in a daemon thread; returns its result, or fails if it hangs (e.g. opening a FIFO)."""
    outcome = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as error:  # reported in the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "reading the dataset hung"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_caption_symlinked_to_dev_zero_is_skipped(tmp_path):
    _good_and_bad(tmp_path)
    os.symlink("/dev/zero", tmp_path / "bad.txt")
    dataset = _dataset(tmp_path)
    assert _in_thread(lambda: _read_all(dataset)) == ["a good caption"]
    assert dataset.skipped["not a regular file"] == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_caption_is_skipped_without_hanging(tmp_path):
    _good_and_bad(tmp_path)
    os.mkfifo(tmp_path / "bad.txt")
    dataset = _dataset(tmp_path)
    assert _in_thread(lambda: _read_all(dataset)) == ["a good caption"]
    assert dataset.skipped["not a regular file"] == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_image_is_skipped_without_hanging(tmp_path):
    write(tmp_path / "good.png", image_bytes())
    write(tmp_path / "good.txt", "a good caption")
    os.mkfifo(tmp_path / "bad.png")
    write(tmp_path / "bad.txt", "caption of a fifo")
    dataset = _dataset(tmp_path)
    assert _in_thread(lambda: _read_all(dataset)) == ["a good caption"]
    assert dataset.skipped["not a regular file"] == 1


def test_caption_over_the_size_cap_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_CAPTION_BYTES", 1000)
    _good_and_bad(tmp_path, bad_caption="word " * 400)
    dataset = _dataset(tmp_path, truncate_captions=True)
    assert _read_all(dataset) == ["a good caption"]
    assert dataset.skipped["caption too large"] == 1


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (grayscale) and whose pixel data is cut short."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(bytes(width + 1) * 4)  # four rows of the declared width
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def test_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path):
    # 12000 x 12000 would decode to 144 MB (gray) and stays under Pillow's own bomb limit.
    _good_and_bad(tmp_path, bad_caption="a huge image")
    write(tmp_path / "bad.png", _png_header_only(12000, 12000))
    dataset = _dataset(tmp_path)
    tracemalloc.start()
    try:
        assert _read_all(dataset) == ["a good caption"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert dataset.skipped["image too large"] == 1
    assert peak < 20 * 2**20


def test_pixel_limit_can_be_raised(tmp_path, monkeypatch):
    _good_and_bad(tmp_path, bad_caption="a small image")
    monkeypatch.setattr(limits, "MAX_IMAGE_PIXELS", 100)  # image_bytes() is 20 x 12: every image refused
    dataset = _dataset(tmp_path)
    with warnings.catch_warnings(), pytest.raises(NoUsableSampleError):
        warnings.simplefilter("ignore")
        dataset[0]
    monkeypatch.setattr(limits, "MAX_IMAGE_PIXELS", 20 * 12)
    assert _read_all(_dataset(tmp_path)) == ["a good caption", "a small image"]


def test_binary_caption_is_a_counted_bad_sample(tmp_path):
    _good_and_bad(tmp_path, bad_caption=os.urandom(3000))
    dataset = _dataset(tmp_path, truncate_captions=True)
    assert _read_all(dataset) == ["a good caption"]
    assert dataset.skipped["binary caption"] == 1


def test_over_long_caption_is_a_counted_bad_sample(tmp_path):
    _good_and_bad(tmp_path, bad_caption="x" * (TEXT_LEN + 1))
    dataset = _dataset(tmp_path)
    assert _read_all(dataset) == ["a good caption"]
    assert dataset.skipped["caption too long"] == 1


def test_check_fails_before_training_when_no_sample_is_usable(tmp_path):
    for name in ("a", "b"):
        write(tmp_path / f"{name}.png", image_bytes())
        write(tmp_path / f"{name}.txt", "y" * (TEXT_LEN + 1))
    dataset = _dataset(tmp_path)
    with warnings.catch_warnings(), pytest.raises(NoUsableSampleError, match="truncate_captions"):
        warnings.simplefilter("ignore")
        dataset.check()
    assert dataset.skipped["caption too long"] == 2
    assert isinstance(NoUsableSampleError("x"), ValueError)  # the CLIs report ValueErrors in one line


def test_check_counts_bad_samples_and_passes_with_good_ones(tmp_path):
    _good_and_bad(tmp_path, bad_caption="\n")
    dataset = _dataset(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert dataset.check() == {"empty caption": 1}


def _gz_shard(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_member_over_the_cap_is_skipped_without_reading_it(tmp_path):
    pytest.importorskip("webdataset")
    from dalle_pytorch.data.webdata import TextImageWebDataset

    # 32 MB of caption compresses to a few KB: the whole shard is far smaller than what it expands to.
    members = {"big.png": image_bytes(), "big.txt": b"a " * (16 * 2**20), "ok.png": image_bytes(), "ok.txt": b"fine"}
    _gz_shard(tmp_path / "shard.tar.gz", members)
    assert (tmp_path / "shard.tar.gz").stat().st_size < 100_000
    dataset = TextImageWebDataset(
        tmp_path / "shard.tar.gz", text_len=TEXT_LEN, image_size=8, tokenizer=ByteTokenizer(), shuffle_buffer=0
    )
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            captions = [caption_of(tokens) for tokens, _ in dataset]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert captions == ["fine"]
    assert dataset.skipped["member too large"] == 1
    assert peak < 8 * 2**20


def test_webdataset_over_long_caption_is_skipped_and_counted(tmp_path):
    pytest.importorskip("webdataset")
    from dalle_pytorch.data.webdata import TextImageWebDataset

    members = {"a.png": image_bytes(), "a.txt": b"z" * (TEXT_LEN + 1), "b.png": image_bytes(), "b.txt": b"fine"}
    _gz_shard(tmp_path / "shard.tar.gz", members)
    dataset = TextImageWebDataset(
        tmp_path / "shard.tar.gz", text_len=TEXT_LEN, image_size=8, tokenizer=ByteTokenizer(), shuffle_buffer=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [caption_of(tokens) for tokens, _ in dataset] == ["fine"]
    assert dataset.skipped["caption too long"] == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_tokenizer_training_skips_fifos_and_devices(tmp_path):
    from dalle_pytorch.text.tokenizer_training import read_caption_folder

    write(tmp_path / "a.txt", "one caption")
    os.mkfifo(tmp_path / "b.txt")
    os.symlink("/dev/zero", tmp_path / "c.txt")
    assert _in_thread(lambda: list(read_caption_folder(tmp_path))) == ["one caption"]
