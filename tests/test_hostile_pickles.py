"""Hostile torch.save files: nothing a file does outlives its load, memory stays bounded, errors stay short."""

import io
import pickle
import pickletools
import time
import tracemalloc
import zipfile

import pytest
import torch

from dalle_pytorch.io import safe_pickle, torch_files
from dalle_pytorch.io.safe_pickle import CheckpointFormatError
from dalle_pytorch.io.torch_files import load_torch_file


def _binunicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


def _zip_checkpoint(path, data_pkl: bytes, entries=None, compress=zipfile.ZIP_STORED) -> None:
    """A zip in torch.save's layout with a hand-written data.pkl and storage entries."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        for name, data in (entries or {}).items():
            archive.writestr(f"archive/data/{name}", data, compress_type=compress)


def _tensor_pickle(numel: int) -> bytes:
    """data.pkl of a 1-d float tensor of `numel` elements in storage '0' (as torch.save writes it)."""
    buffer = io.BytesIO()
    torch.save(torch.zeros(numel), buffer)
    with zipfile.ZipFile(buffer) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        return archive.read(name)


def test_build_cannot_change_the_objects_later_loads_use(tmp_path):
    # The file sets `dtype = float16` on the object standing for torch.FloatStorage, then returns {}.
    hostile = b"\x80\x02ctorch\nFloatStorage\n}" + _binunicode("dtype") + b"ctorch\nfloat16\nsb0}."
    _zip_checkpoint(tmp_path / "hostile.pt", hostile)
    clean = tmp_path / "clean.pt"
    torch.save({"w": torch.arange(4.0)}, clean)

    with pytest.raises(CheckpointFormatError, match="refused"):
        load_torch_file(tmp_path / "hostile.pt")
    loaded = load_torch_file(clean)  # in the same process, after the hostile file

    assert loaded["w"].dtype == torch.float32
    torch.testing.assert_close(loaded["w"], torch.arange(4.0))


def test_build_on_an_allowed_function_is_refused(tmp_path):
    hostile = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}" + _binunicode("marker") + b"K\x01sb."
    _zip_checkpoint(tmp_path / "hostile.pt", hostile)
    with pytest.raises(CheckpointFormatError, match="refused"):
        load_torch_file(tmp_path / "hostile.pt")
    from torch import _utils  # noqa: F401 -- only to show the real function is untouched as well

    assert not hasattr(safe_pickle._rebuild_tensor, "marker")


def test_build_still_restores_state_dict_metadata(tmp_path):
    module = torch.nn.Linear(2, 3)
    torch.save(module.state_dict(), tmp_path / "sd.pt")
    loaded = load_torch_file(tmp_path / "sd.pt")
    assert loaded._metadata[""]["version"] == module.state_dict()._metadata[""]["version"]
    torch.testing.assert_close(loaded["weight"], module.weight.detach())


def _legacy_parts(path) -> tuple[list[bytes], bytes]:
    """The five pickles of a legacy torch.save file and the raw storage bytes after them."""
    data = path.read_bytes()
    parts, offset = [], 0
    for _ in range(5):
        stream = io.BytesIO(data[offset:])
        for _opcode, _arg, _position in pickletools.genops(stream):
            pass
        end = offset + stream.tell()
        parts.append(data[offset:end])
        offset = end
    return parts, data[offset:]


def test_legacy_storage_never_filled_is_an_error(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.full((1000,), 7.0)}, path, _use_new_zipfile_serialization=False)
    parts, _ = _legacy_parts(path)
    # Same pickles, but the key list is empty (padding keeps the file as long): the tensor is never filled.
    path.write_bytes(b"".join(parts[:4]) + pickle.dumps([], protocol=2) + bytes(8192))

    with pytest.raises(CheckpointFormatError, match="not in the file"):
        load_torch_file(path)


def test_legacy_storage_listed_twice_is_an_error(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(4)}, path, _use_new_zipfile_serialization=False)
    parts, raw = _legacy_parts(path)
    keys = pickle.loads(parts[4])
    path.write_bytes(b"".join(parts[:4]) + pickle.dumps(keys * 2, protocol=2) + raw + raw)
    with pytest.raises(CheckpointFormatError, match="twice"):
        load_torch_file(path)


def test_deflated_storage_larger_than_declared_is_refused_before_decompressing(tmp_path):
    # The pickle declares 4 floats (16 bytes); the entry inflates to 16 MB of zeros (~16 KB deflated).
    path = tmp_path / "bomb.pt"
    _zip_checkpoint(path, _tensor_pickle(4), {"0": bytes(16 * 2**20)}, compress=zipfile.ZIP_DEFLATED)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointFormatError, match="declare 16 bytes"):
            load_torch_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20


def test_deflated_storage_beyond_the_compression_ratio_is_refused(tmp_path):
    # Sizes agree (4M floats), but 16 MB from ~16 KB is a zip bomb's ratio.
    path = tmp_path / "bomb.pt"
    _zip_checkpoint(path, _tensor_pickle(4 * 2**20), {"0": bytes(16 * 2**20)}, compress=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointFormatError, match="MAX_COMPRESSION_RATIO"):
        load_torch_file(path)


def test_deflated_storage_within_the_ratio_loads(tmp_path, monkeypatch):
    values = torch.randn(256)
    path = tmp_path / "deflated.pt"
    _zip_checkpoint(path, _tensor_pickle(256), {"0": values.numpy().tobytes()}, compress=zipfile.ZIP_DEFLATED)
    torch.testing.assert_close(load_torch_file(path), values)


def test_error_message_of_shared_references_is_short_and_fast(tmp_path):
    # 24 levels of [x, x]: a few hundred bytes of pickle, a repr of 2**24 leaves. It is handed to the
    # tensor rebuild function as a size, whose error message must not print it.
    nested = []
    for _ in range(24):
        nested = [nested, nested]
    arguments = pickle.dumps((None, 0, nested, (1,), False, None), protocol=2)[2:-1]  # no header, no STOP
    hostile = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n" + arguments + b"R."
    assert len(hostile) < 1000
    _zip_checkpoint(tmp_path / "memo.pt", hostile)

    started = time.perf_counter()
    with pytest.raises(CheckpointFormatError) as caught:
        load_torch_file(tmp_path / "memo.pt")
    assert time.perf_counter() - started < 2.0
    assert len(str(caught.value)) < 600


def test_huge_length_in_a_legacy_pickle_reads_only_what_is_there(tmp_path):
    # A BINBYTES8 opcode claiming 2**40 bytes after a valid legacy header.
    path = tmp_path / "legacy.pt"
    header = b"".join(pickle.dumps(x, protocol=2) for x in (torch_files._LEGACY_MAGIC_NUMBER, 1001, {}))
    path.write_bytes(header + b"\x80\x04\x8e" + (2**40).to_bytes(8, "little") + b"abc")
    with pytest.raises(CheckpointFormatError):
        load_torch_file(path)


def test_nan_weights_are_refused_by_strict_loading():
    module = torch.nn.Linear(2, 2)
    tensors = {"weight": torch.full((2, 2), float("nan")), "bias": torch.zeros(2)}
    with pytest.raises(CheckpointFormatError, match="weight holds NaN"):
        safe_pickle.load_tensors_strict(module, tensors, "file.pt")
