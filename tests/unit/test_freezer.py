"""ipybox._freezer on fake cgroup trees (v1 freezer, v2 unified) and the pause-log fallback."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipybox import _freezer, _tokens

CID = "f" * 64


def _proc(tmp_path: Path, pid: int, cgroup: str) -> Path:
    proc = tmp_path / "proc"
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "cgroup").write_text(cgroup)
    return proc


def test_cgroup_v1_freezer_state(tmp_path: Path) -> None:
    proc = _proc(tmp_path, 42, f"12:memory:/docker/{CID}\n4:freezer:/docker/{CID}\n1:name=systemd:/docker/{CID}\n")
    root = tmp_path / "cgroup"
    state = root / "freezer" / "docker" / CID / "freezer.state"
    state.parent.mkdir(parents=True)
    for text, frozen in (("THAWED\n", False), ("FREEZING\n", True), ("FROZEN\n", True)):
        state.write_text(text)
        assert _freezer.frozen_pid(42, proc, root) is frozen


def test_cgroup_v2_events(tmp_path: Path) -> None:
    proc = _proc(tmp_path, 7, f"0::/system.slice/docker-{CID}.scope\n")
    root = tmp_path / "cgroup"
    events = root / "system.slice" / f"docker-{CID}.scope" / "cgroup.events"
    events.parent.mkdir(parents=True)
    events.write_text("populated 1\nfrozen 0\n")
    assert _freezer.frozen_pid(7, proc, root) is False
    events.write_text("populated 1\nfrozen 1\n")
    assert _freezer.frozen_pid(7, proc, root) is True


def test_unreadable_means_unknown(tmp_path: Path) -> None:
    assert _freezer.frozen_pid(99, tmp_path / "proc", tmp_path / "cgroup") is None  # no process
    proc = _proc(tmp_path, 8, f"4:freezer:/docker/{CID}\n")
    assert _freezer.frozen_pid(8, proc, tmp_path / "cgroup") is None  # no freezer file
    proc = _proc(tmp_path / "b", 9, "1:name=systemd:/\n")
    assert _freezer.frozen_pid(9, proc, tmp_path / "cgroup") is None  # neither hierarchy


@pytest.fixture
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("IPYBOX_RUNTIME_DIR", str(tmp_path / "run"))
    return tmp_path / "run"


def test_frozen_falls_back_to_the_pause_log(runtime_dir: Path) -> None:
    # No checkable pid (a remote engine): the pauses this process made are the answer.
    _tokens.register("127.0.0.1", 6001, "t", CID)
    try:
        assert _freezer.frozen("localhost", 6001) is False
        _freezer.note_paused(CID, True)
        assert _freezer.frozen("localhost", 6001) is True
        assert _freezer.logged_paused(CID)
        _freezer.note_paused(CID, False)
        assert _freezer.frozen("localhost", 6001) is False
        assert _freezer.frozen("localhost", 6002) is False  # nothing recorded
    finally:
        _freezer.note_paused(CID, False)
        _tokens.unregister("127.0.0.1", 6001, CID)
