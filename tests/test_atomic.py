"""Tests for dalle_pytorch.io.atomic on plain files and folders (checkpoint-level crash tests: test_checkpoint.py)."""

import re
import sys
from pathlib import Path

import pytest

from dalle_pytorch.io import atomic
from dalle_pytorch.io.atomic import (
    atomic_write_dir,
    atomic_write_file,
    interrupted_backups,
    replace_directory,
    temp_sibling,
)


def write_text(text: str):
    return lambda path: Path(path).write_text(text)


def fill_with(files: dict[str, str]):
    def fill(folder: Path) -> None:
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)

    return fill


def make_dir(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir()
    fill_with(files)(folder)
    return folder


def contents(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def fail_after(fill):
    def failing(folder: Path) -> None:
        fill(folder)
        raise OSError("disk full")

    return failing


def test_temp_sibling_is_a_fresh_hidden_name_beside_the_path(tmp_path):
    path = tmp_path / "model"
    a, b = temp_sibling(path, "tmp"), temp_sibling(path, "tmp")
    assert a.parent == tmp_path and a != b
    assert re.fullmatch(r"\.model\.tmp-[0-9a-f]{12}", a.name)


def test_atomic_write_file_replaces_content_and_keeps_it_on_failure(tmp_path):
    path = tmp_path / "state.bin"
    atomic_write_file(path, write_text("first"))
    atomic_write_file(path, write_text("second"))
    assert path.read_text() == "second"

    def half_write(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_file(path, half_write)
    assert path.read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]  # the temporary file is gone


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_atomic_write_dir_replaces_the_whole_directory(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange_directories", lambda a, b: False)
    path = tmp_path / "out"
    assert atomic_write_dir(path, fill_with({"a.txt": "1", "sub/b.txt": "2"})) == path
    assert contents(path) == {"a.txt": "1", "sub/b.txt": "2"}
    atomic_write_dir(path, fill_with({"c.txt": "3"}))
    assert contents(path) == {"c.txt": "3"}  # nothing of the previous directory survives
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_failed_fill_leaves_the_previous_directory_and_no_temporary(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange_directories", lambda a, b: False)
    path = tmp_path / "out"
    atomic_write_dir(path, fill_with({"a.txt": "old"}))
    with pytest.raises(OSError, match="disk full"):
        atomic_write_dir(path, fail_after(fill_with({"a.txt": "new"})))
    assert contents(path) == {"a.txt": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_write_dir_follows_a_symlink_and_refuses_a_file(tmp_path):
    real = tmp_path / "real"
    atomic_write_dir(real, fill_with({"a.txt": "1"}))
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    assert atomic_write_dir(link, fill_with({"b.txt": "2"})) == real.resolve()
    assert link.is_symlink() and contents(real) == {"b.txt": "2"}

    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        atomic_write_dir(file, fill_with({}))
    assert file.read_text() == "x"


def test_success_sweeps_leftovers_of_interrupted_writes_of_that_path_only(tmp_path):
    path = tmp_path / "out"
    leftovers = [temp_sibling(path, "tmp"), temp_sibling(path, "old")]
    other = temp_sibling(tmp_path / "other", "tmp")
    for folder in (*leftovers, other):
        folder.mkdir()
    atomic_write_dir(path, fill_with({"a.txt": "1"}))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", other.name])


def test_interrupted_backups_finds_old_siblings_of_that_name(tmp_path):
    path = tmp_path / "run[1]"  # glob metacharacters in the name are taken literally
    backup = temp_sibling(path, "old")
    for folder in (backup, temp_sibling(path, "tmp"), temp_sibling(tmp_path / "run1", "old")):
        folder.mkdir()
    assert interrupted_backups(path) == [backup]
    assert interrupted_backups(tmp_path / "none") == []


def test_replace_directory_moves_into_a_missing_path_and_replaces_an_existing_one(tmp_path):
    new, path = tmp_path / "new", tmp_path / "path"
    replace_directory(make_dir(new, {"a.txt": "1"}), path)
    assert contents(path) == {"a.txt": "1"} and not new.exists()
    replace_directory(make_dir(new, {"b.txt": "2"}), path)
    assert contents(path) == {"b.txt": "2"} and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["path"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux-only")
def test_exchange_directories_swaps_two_paths(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_dir(a, {"x.txt": "from a"}), make_dir(b, {"y.txt": "from b"})
    if not atomic._exchange_directories(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not supported by this kernel or filesystem")
    assert contents(a) == {"y.txt": "from b"} and contents(b) == {"x.txt": "from a"}
