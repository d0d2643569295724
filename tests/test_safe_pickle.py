"""The restricted unpickler: tensors and containers come back, nothing named in a file is imported or run."""

import hashlib
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict

import pytest
import torch
from torch import nn

from dalle_pytorch.io.safe_pickle import (
    CheckpointFormatError,
    PickledObject,
    load_tensors_strict,
    pickled_module_tensors,
)
from dalle_pytorch.io.torch_files import load_torch_file

FORMATS = {"zip": {}, "legacy": {"_use_new_zipfile_serialization": False}}


class RunsShellCommand:
    """Unpickling this with the standard pickle module runs `command` through os.system."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _marker_command(marker) -> str:
    return f"touch {marker}"


def test_plain_pickle_would_run_the_payload(tmp_path):
    # Shows the payload used below is live: the standard unpickler runs it (in a child process).
    marker = tmp_path / "ran"
    payload = pickle.dumps(RunsShellCommand(_marker_command(marker)), protocol=2)
    subprocess.run(
        [sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"], input=payload, check=True
    )
    assert marker.exists()


@pytest.mark.parametrize("file_format", FORMATS)
def test_reduce_to_os_system_is_not_run(tmp_path, file_format):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save(
        {"weight": torch.ones(2), "payload": RunsShellCommand(_marker_command(marker))}, path, **FORMATS[file_format]
    )

    loaded = load_torch_file(path)

    assert not marker.exists()
    torch.testing.assert_close(loaded["weight"], torch.ones(2))
    record = loaded["payload"]
    assert isinstance(record, PickledObject)
    assert record.pickled_name == "system" and record.pickled_module in ("posix", "os", "nt")
    assert record.args == (_marker_command(marker),)


def test_raw_pickle_payload_inside_zip_checkpoint_is_inert(tmp_path):
    # The same payload as a bare pickle protocol 4 stream (STACK_GLOBAL) stored in a torch zip archive.
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"x": 1}, path)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    data_pkl = next(name for name in members if name.endswith("data.pkl"))
    members[data_pkl] = pickle.dumps([RunsShellCommand(_marker_command(marker))], protocol=4)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)

    loaded = load_torch_file(path)

    assert not marker.exists()
    assert isinstance(loaded[0], PickledObject) and loaded[0].pickled_name == "system"


def test_modules_named_in_the_file_are_not_imported(tmp_path):
    # `this` prints the Zen of Python when imported: a visible side effect the loader must not cause.
    assert "this" not in sys.modules
    # Hand-written protocol-2 pickle of the list [this.d, not_a_real_module_xyz.Thing()]
    raw_pickle = b"\x80\x02]q\x00(cthis\nd\nq\x01cnot_a_real_module_xyz\nThing\nq\x02)\x81q\x03e."
    path = tmp_path / "names.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", raw_pickle)

    loaded = load_torch_file(path)

    assert "this" not in sys.modules and "not_a_real_module_xyz" not in sys.modules
    assert loaded[0].pickled_module == "this" and loaded[0].pickled_name == "d"
    assert isinstance(loaded[1], PickledObject)
    assert loaded[1].qualified_name() == "not_a_real_module_xyz.Thing"


@pytest.mark.parametrize("file_format", FORMATS)
def test_tensors_and_containers_round_trip(tmp_path, file_format):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    saved = {
        "float": base,
        "strided_view": base[1:, ::2],  # shares base's storage, non-contiguous
        "half": torch.randn(3, dtype=torch.float16),
        "bfloat16": torch.randn(3, dtype=torch.bfloat16),
        "long": torch.tensor([1, -2, 3]),
        "bool": torch.tensor([True, False]),
        "parameter": nn.Parameter(torch.randn(2, 2)),
        "ordered": OrderedDict(b=1, a=[1.5, "x", None]),
        "tuple": (1, 2),
        "set": {1, 2},
        "bytes": b"\x00\xff",
        "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "data.pt"
    torch.save(saved, path, **FORMATS[file_format])

    loaded = load_torch_file(path)

    for key in ("float", "strided_view", "half", "bfloat16", "long", "bool", "scalar"):
        assert loaded[key].dtype == saved[key].dtype
        assert torch.equal(loaded[key], saved[key]), key
    assert torch.equal(loaded["parameter"], saved["parameter"].detach())
    assert loaded["ordered"] == saved["ordered"] and isinstance(loaded["ordered"], OrderedDict)
    assert loaded["tuple"] == (1, 2) and loaded["set"] == {1, 2} and loaded["bytes"] == b"\x00\xff"
    # Views of one storage still share memory after loading.
    loaded["float"][1, 0] = -1.0
    assert loaded["strided_view"][0, 0] == -1.0


def test_loaded_tensors_do_not_write_back_to_the_file(tmp_path):
    path = tmp_path / "data.pt"
    torch.save({"w": torch.zeros(1000)}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_torch_file(path)
    loaded["w"].fill_(7.0)
    del loaded
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.ReLU())
        self.register_buffer("scratch", torch.ones(4), persistent=False)
        self.register_buffer("kept", torch.full((2,), 5.0))


@pytest.mark.parametrize("file_format", FORMATS)
def test_pickled_module_yields_its_state_dict(tmp_path, file_format):
    net = TinyNet()
    path = tmp_path / "net.pt"
    torch.save(net, path, **FORMATS[file_format])

    record = load_torch_file(path)
    tensors = pickled_module_tensors(record)

    assert isinstance(record, PickledObject) and record.pickled_name == "TinyNet"
    expected = net.state_dict()
    assert set(tensors) == set(expected)  # includes BatchNorm statistics, excludes the non-persistent buffer
    for key, value in expected.items():
        assert torch.equal(tensors[key], value), key


def test_pickled_module_tensors_rejects_non_modules():
    with pytest.raises(CheckpointFormatError, match="not a pickled torch.nn.Module"):
        pickled_module_tensors({"weight": torch.ones(1)})


@pytest.mark.parametrize("file_format", FORMATS)
def test_truncated_file_is_a_clear_error(tmp_path, file_format):
    path = tmp_path / "full.pt"
    torch.save({"w": torch.randn(4096)}, path, **FORMATS[file_format])
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        load_torch_file(truncated)


def test_not_a_checkpoint(tmp_path):
    html = tmp_path / "page.pt"
    html.write_text("<html>Access denied</html>")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        load_torch_file(html)
    with pytest.raises(FileNotFoundError):
        load_torch_file(tmp_path / "missing.pt")
    zip_without_pickle = tmp_path / "other.zip"
    with zipfile.ZipFile(zip_without_pickle, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointFormatError, match="data.pkl"):
        load_torch_file(zip_without_pickle)


def test_load_tensors_strict_checks_keys_and_shapes():
    model = nn.Linear(3, 2)
    good = {"weight": torch.randn(2, 3), "bias": torch.randn(2)}
    load_tensors_strict(model, good, "good.pt")
    assert torch.equal(model.weight.detach(), good["weight"])

    with pytest.raises(CheckpointFormatError, match=r"missing keys \['bias'\]"):
        load_tensors_strict(model, {"weight": good["weight"]}, "f.pt")
    with pytest.raises(CheckpointFormatError, match=r"unexpected keys \['extra'\]"):
        load_tensors_strict(model, {**good, "extra": torch.ones(1)}, "f.pt")
    with pytest.raises(CheckpointFormatError, match=r"weight has shape \(3, 2\), expected \(2, 3\)"):
        load_tensors_strict(model, {**good, "weight": torch.randn(3, 2)}, "f.pt")
