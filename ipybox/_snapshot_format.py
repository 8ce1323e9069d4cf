"""A snapshot on disk: its files, the user's key, sealing and verifying. The host never unpickles.

    <snapshot>/manifest.json   format, id, created, ipybox version, image {tag, id}, container options
                               (limits; env NAMES only), files {name: {size, sha256}}, kernels [...]
    <snapshot>/manifest.hmac   hex HMAC-SHA256 of manifest.json's bytes with the user's key
    <snapshot>/files.tar       /app, as the resource server sends it (binds and the temp directory left out)
    <snapshot>/kernels/<n>.pkl one pickle per kernel, in the order of the clients

A snapshot is written into `<name>.partial-<random>` next to its final name and renamed when complete, so
a crash leaves no half snapshot under the name. The key: 32 random bytes (hex) in
`$XDG_CONFIG_HOME/ipybox/snapshot.key` (default `~/.config/ipybox/snapshot.key`; `IPYBOX_SNAPSHOT_KEY_FILE`
overrides), directory 0700, file 0600 created with O_EXCL, refused when another user owns it or others may
read it. Verification: `verify_manifest` (HMAC, format, every file's size: microseconds), then
`verify_files` (SHA-256 of every file), both before anything of the snapshot reaches a sandbox; uploads
hash again what they send (`HashedFile`) and are checked before the namespace is loaded, so a file changed
in between is caught too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Generator
from pathlib import Path, PurePosixPath
from typing import Any

from ipybox._errors import SnapshotError

FORMAT = 1
MAX_MANIFEST = 4 << 20
MANIFEST = "manifest.json"
SEAL = "manifest.hmac"
FILES = "files.tar"
PARTIAL = ".partial-"
_CHUNK = 1 << 20
_KEY_OPTION = "IPYBOX_SNAPSHOT_KEY_FILE"


def key_path() -> Path:
    if explicit := os.environ.get("IPYBOX_SNAPSHOT_KEY_FILE"):
        return Path(explicit)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "ipybox" / "snapshot.key"


def default_directory() -> Path:
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "ipybox" / "snapshots"


def load_key(create: bool) -> bytes:
    """The user's snapshot key; made on first use when `create`."""
    path = key_path()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if not create:
            raise SnapshotError(
                f"no snapshot key at {path}: snapshots are verified with the key of the user who made them, "
                "and this user has made none here",
                option="IPYBOX_SNAPSHOT_KEY_FILE",
            ) from None
        return _new_key(path)
    except OSError as exc:
        raise SnapshotError(
            f"the snapshot key {path} cannot be read: {exc}", option="IPYBOX_SNAPSHOT_KEY_FILE"
        ) from exc
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise SnapshotError(
                f"the snapshot key {path} must be a regular file of yours with mode 0600 (it signs your "
                f"snapshots); it is owned by uid {info.st_uid} with mode {info.st_mode & 0o7777:04o}",
                option="IPYBOX_SNAPSHOT_KEY_FILE",
            )
        text = file.read(200).decode(errors="replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 32:
        raise SnapshotError(f"the snapshot key {path} is not 32 bytes of hex", option="IPYBOX_SNAPSHOT_KEY_FILE")
    return key


def _new_key(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:  # another process made it meanwhile
        return load_key(create=False)
    with os.fdopen(fd, "w") as file:
        file.write(key.hex() + "\n")
    return key


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(4 * _CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def new_partial(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if final.exists():
        raise SnapshotError(f"{final} exists already; snapshots are never overwritten (delete it first)")
    partial = final.with_name(final.name + PARTIAL + secrets.token_hex(4))
    (partial / "kernels").mkdir(parents=True, mode=0o700)
    return partial


def seal(partial: Path, final: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash the files in `partial`, write the manifest and its HMAC, rename `partial` to `final`."""
    key = load_key(create=True)
    manifest["files"] = {
        p.relative_to(partial).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(partial.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, SEAL)
    }
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    (partial / MANIFEST).write_bytes(data)
    (partial / SEAL).write_text(hmac.new(key, data, hashlib.sha256).hexdigest() + "\n")
    try:
        os.rename(partial, final)
    except OSError as exc:
        raise SnapshotError(f"{final} could not be put in place: {exc}") from exc
    return manifest


def verify_manifest(snapshot: Path) -> dict[str, Any]:
    """The manifest, after its HMAC, format and every file's presence and size are checked."""
    try:
        with (snapshot / MANIFEST).open("rb") as file:
            data = file.read(MAX_MANIFEST + 1)
        mac = (snapshot / SEAL).read_text(errors="replace").strip()
    except FileNotFoundError as exc:
        name = Path(str(exc.filename)).name
        raise SnapshotError(f"{snapshot} is not a complete snapshot: {name} is missing") from None
    except OSError as exc:
        raise SnapshotError(f"{snapshot} cannot be read: {exc}") from exc
    if len(data) > MAX_MANIFEST:
        raise SnapshotError(f"{snapshot}: {MANIFEST} is larger than {MAX_MANIFEST} bytes; not a snapshot of ipybox")
    key = load_key(create=False)
    if not hmac.compare_digest(hmac.new(key, data, hashlib.sha256).hexdigest(), mac):
        raise SnapshotError(
            f"{snapshot} fails its integrity check: {MANIFEST} was changed, or the snapshot was made with another "
            f"key (another user or machine: {key_path()}). Nothing of it was restored"
        )
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise SnapshotError(f"{snapshot}: {MANIFEST} is not JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise SnapshotError(f"{snapshot}: snapshot format {found!r}; this ipybox reads format {FORMAT}")
    for name, meta in manifest.get("files", {}).items():
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts or name in (MANIFEST, SEAL):
            raise SnapshotError(f"{snapshot}: bad file name {name!r} in the manifest")
        try:
            size = (snapshot / name).stat().st_size
        except FileNotFoundError:
            raise SnapshotError(f"{snapshot}: {name} is missing") from None
        if size != meta["size"]:
            raise SnapshotError(
                f"{snapshot}: {name} has {size} bytes, the manifest says {meta['size']} (truncated or replaced?)"
            )
    return manifest


def verify_files(snapshot: Path, manifest: dict[str, Any]) -> None:
    """SHA-256 of every file against the manifest (run in a worker thread: seconds for GBs)."""
    for name, meta in manifest["files"].items():
        if sha256_file(snapshot / name) != meta["sha256"]:
            raise _changed(snapshot, name)


def _changed(snapshot: Path, name: str) -> SnapshotError:
    return SnapshotError(f"{snapshot}: {name} does not match its checksum: it was changed after the snapshot")


class HashedFile:
    """A snapshot file read in chunks for an upload, hashed on the way; `check()` once it was sent."""

    def __init__(self, snapshot: Path, name: str, manifest: dict[str, Any]) -> None:
        self.snapshot = snapshot
        self.name = name
        self.meta = manifest["files"][name]
        self._digest = hashlib.sha256()
        self._sent = 0

    @property
    def size(self) -> int:
        return int(self.meta["size"])

    def chunks(self) -> Generator[bytes, None, None]:
        with (self.snapshot / self.name).open("rb") as file:
            while chunk := file.read(_CHUNK):
                self._digest.update(chunk)
                self._sent += len(chunk)
                yield chunk

    def check(self) -> None:
        if self._sent != self.size or self._digest.hexdigest() != self.meta["sha256"]:
            raise _changed(self.snapshot, self.name)
