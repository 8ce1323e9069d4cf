"""`_beneath`'s walks from a `Root`: below it only, no symlink followed, nothing but a regular file read."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from ipybox.resource import _beneath


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/{file, sub/file, fifo, link-dir -> ../outside, sub/link-file -> ../../outside/file}, outside/file."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "file").write_text("root file")
    (root / "sub" / "file").write_text("sub file")
    (outside / "file").write_text("outside")
    os.mkfifo(root / "fifo")
    (root / "link-dir").symlink_to(outside, target_is_directory=True)
    (root / "sub" / "link-file").symlink_to(outside / "file")
    return root


def _read(fd: int) -> str:
    with os.fdopen(fd, "r") as file:
        return file.read()


def test_files_below_the_root_are_read(tree: Path) -> None:
    with _beneath.Root.open(tree) as root:
        assert _read(_beneath.open_file(tree / "file", root=root)) == "root file"
        assert _read(_beneath.open_file(tree / "sub" / ".." / "sub" / "file", root=root)) == "sub file"


@pytest.mark.parametrize(("path", "link"), [("link-dir/file", "link-dir"), ("sub/link-file", "sub/link-file")])
def test_a_symlink_on_the_way_or_as_the_file_is_refused_by_name(tree: Path, path: str, link: str) -> None:
    with (
        _beneath.Root.open(tree) as root,
        pytest.raises(_beneath.SymlinkRefusedError, match=str(tree / link)) as raised,
    ):
        _beneath.open_file(tree / path, root=root)
    assert raised.value.filename == str(tree / link)


def test_only_regular_files_are_opened(tree: Path) -> None:
    opened = threading.Event()

    def open_fifo() -> None:
        with _beneath.Root.open(tree) as root, pytest.raises(OSError, match="not a regular file"):
            _beneath.open_file(tree / "fifo", root=root)
        opened.set()

    thread = threading.Thread(target=open_fifo, daemon=True)
    thread.start()
    assert opened.wait(5), "opening a FIFO blocked"
    with _beneath.Root.open(tree) as root:
        with pytest.raises(IsADirectoryError):
            _beneath.open_file(tree / "sub", root=root)
        with pytest.raises(FileNotFoundError, match="does not exist"):
            _beneath.open_file(tree / "missing", root=root)
        with pytest.raises(FileNotFoundError, match="does not exist"):
            _beneath.open_file(tree / "missing" / "file", root=root)


def test_paths_not_below_the_root_are_refused(tree: Path) -> None:
    with _beneath.Root.open(tree / "sub") as root:
        for path in (tree / "file", tree / "sub" / ".." / "file", tree / "sub-sibling" / "file"):
            with pytest.raises(ValueError, match="does not lie below"):
                _beneath.open_file(path, root=root)
        with pytest.raises(IsADirectoryError):
            _beneath.open_parent(tree / "sub", root=root)


def test_the_root_is_the_directory_opened_whatever_its_path_becomes(tree: Path, tmp_path: Path) -> None:
    with _beneath.Root.open(tree) as root:
        os.rename(tree, tmp_path / "moved")
        tree.symlink_to(tmp_path / "outside", target_is_directory=True)
        assert _read(_beneath.open_file(tree / "file", root=root)) == "root file"
        with _beneath.open_directory(tree / "new", create=True, root=root):
            pass
    assert (tmp_path / "moved" / "new").is_dir()
    assert sorted(path.name for path in (tmp_path / "outside").iterdir()) == ["file"]
