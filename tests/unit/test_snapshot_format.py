"""The snapshot format without containers: key handling, sealing, every kind of damage found, the
archive's exclusions, and the kernel-side capture's refusals (run on this interpreter)."""

from __future__ import annotations

import io
import json
import os
import socket
import tarfile
import threading
from pathlib import Path

import pytest

from ipybox import _snapshot_format as fmt
from ipybox._errors import IpyboxError, SnapshotError
from ipybox._image.ipybox_server import archive
from ipybox.snapshot import Snapshot, list_snapshots


@pytest.fixture(autouse=True)
def _key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPYBOX_SNAPSHOT_KEY_FILE", str(tmp_path / "key" / "snapshot.key"))


def _make(root: Path, name: str = "s") -> Path:
    final = root / name
    partial = fmt.new_partial(final)
    (partial / fmt.FILES).write_bytes(os.urandom(10_000))
    (partial / "kernels" / "0.pkl").write_bytes(os.urandom(5_000))
    fmt.seal(
        partial,
        final,
        {"format": fmt.FORMAT, "id": name, "created": "2026-01-01", "kernels": [{"file": "kernels/0.pkl"}]},
    )
    return final


def test_seal_and_verify(tmp_path: Path) -> None:
    snap = _make(tmp_path)
    assert not list(tmp_path.glob("*.partial-*"))
    manifest = fmt.verify_manifest(snap)
    fmt.verify_files(snap, manifest)
    assert set(manifest["files"]) == {"files.tar", "kernels/0.pkl"}
    key = Path(os.environ["IPYBOX_SNAPSHOT_KEY_FILE"])
    assert key.stat().st_mode & 0o777 == 0o600
    loaded = Snapshot.load(snap)
    assert loaded.size == 15_000 and loaded.id == "s"
    assert [s.path for s in list_snapshots(tmp_path)] == [snap]


def test_existing_target_is_never_overwritten(tmp_path: Path) -> None:
    snap = _make(tmp_path)
    with pytest.raises(SnapshotError, match="exists already"):
        fmt.new_partial(snap)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[100] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: _flip(s / "kernels" / "0.pkl"), "does not match its checksum"),
        (lambda s: _flip(s / "files.tar"), "does not match its checksum"),
        (lambda s: (s / "files.tar").write_bytes((s / "files.tar").read_bytes()[:-1]), "truncated"),
        (
            lambda s: (s / "manifest.json").write_text((s / "manifest.json").read_text().replace("2026", "2027")),
            "integrity",
        ),
        (lambda s: (s / "manifest.hmac").unlink(), "manifest.hmac is missing"),
        (lambda s: (s / "manifest.json").unlink(), "manifest.json is missing"),
        (lambda s: (s / "kernels" / "0.pkl").unlink(), "kernels/0.pkl is missing"),
        (lambda s: (s / "manifest.hmac").write_text("00" * 32), "integrity"),
    ],
)
def test_damage_is_found(tmp_path: Path, damage: object, message: str) -> None:
    snap = _make(tmp_path)
    damage(snap)  # type: ignore[operator]
    with pytest.raises(SnapshotError, match=message) as info:
        fmt.verify_files(snap, fmt.verify_manifest(snap))
    assert isinstance(info.value, IpyboxError)


def test_another_key_fails_like_an_edit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snap = _make(tmp_path)
    monkeypatch.setenv("IPYBOX_SNAPSHOT_KEY_FILE", str(tmp_path / "other.key"))
    fmt.load_key(create=True)
    with pytest.raises(SnapshotError, match="another key"):
        fmt.verify_manifest(snap)


def test_manifest_names_cannot_leave_the_snapshot(tmp_path: Path) -> None:
    snap = _make(tmp_path)
    manifest = json.loads((snap / "manifest.json").read_text())
    manifest["files"]["../outside"] = {"size": 1, "sha256": "0"}
    partial = tmp_path / "t.partial-x"
    snap.rename(partial)
    (partial / "manifest.json").unlink()
    (partial / "manifest.hmac").unlink()
    data = json.dumps(manifest).encode()
    import hashlib
    import hmac

    (partial / "manifest.json").write_bytes(data)
    (partial / "manifest.hmac").write_text(hmac.new(fmt.load_key(False), data, hashlib.sha256).hexdigest())
    with pytest.raises(SnapshotError, match="bad file name"):
        fmt.verify_manifest(partial)


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    fmt.load_key(create=True)
    os.chmod(os.environ["IPYBOX_SNAPSHOT_KEY_FILE"], 0o644)
    with pytest.raises(SnapshotError, match="mode 0600"):
        fmt.load_key(create=False)


def test_a_missing_key_is_not_made_on_verify(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="no snapshot key"):
        fmt.load_key(create=False)
    assert not Path(os.environ["IPYBOX_SNAPSHOT_KEY_FILE"]).exists()


def test_hashed_file_catches_a_change_after_verification(tmp_path: Path) -> None:
    snap = _make(tmp_path)
    manifest = fmt.verify_manifest(snap)
    fmt.verify_files(snap, manifest)
    _flip(snap / "files.tar")  # between the check and the upload
    hashed = fmt.HashedFile(snap, "files.tar", manifest)
    assert sum(len(chunk) for chunk in hashed.chunks()) == 10_000
    with pytest.raises(SnapshotError, match="checksum"):
        hashed.check()


def _tar_names(root: Path, **options: object) -> list[str]:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        data = b"".join(archive.iter_tar(fd, **options))  # type: ignore[arg-type]
    finally:
        os.close(fd)
    return tarfile.open(fileobj=io.BytesIO(data)).getnames()


def test_archive_excludes_names_with_their_subtrees(tmp_path: Path) -> None:
    (tmp_path / ".ipybox-snapshot-1" / "deep").mkdir(parents=True)
    (tmp_path / ".ipybox-snapshot-1" / "deep" / "0.pkl").write_text("x")
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "a.txt").write_text("a")
    (tmp_path / "keep" / "b.txt").write_text("b")
    names = _tar_names(tmp_path, exclude=frozenset({".ipybox-snapshot-1", "keep/b.txt"}))
    assert names == ["keep", "keep/a.txt"]
    assert ".ipybox-snapshot-1/deep/0.pkl" in _tar_names(tmp_path)


def test_archive_on_one_file_system_keeps_everything_there(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("f")
    # Mount points need a mount; the integration test covers binds. Same device: nothing left out.
    assert _tar_names(tmp_path, exclude_mounts=True) == ["d", "d/f"]


def test_kernel_side_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    # As the kernel imports it: the top-level package `ipybox_server` (its vendored cloudpickle).
    monkeypatch.syspath_prepend(str(Path(archive.__file__).parent.parent))
    from ipybox_server import namespace

    with socket.socket() as sock, open(os.devnull) as file:
        assert "open connection" in (namespace._refused(sock) or "")
        assert "open file" in (namespace._refused(file) or "")
    assert "closed file" in (namespace._refused(file) or "")
    assert "running frame" in (namespace._refused(i for i in range(2)) or "")
    assert "thread" in (namespace._refused(threading.Thread(target=print)) or "")
    assert "lock" in (namespace._refused(threading.Lock()) or "")
    assert "lock" in (namespace._refused(threading.RLock()) or "")
    assert namespace._refused([1, 2]) is None
