"""Directory archives: tar streams out of /app, and guarded extraction into it.

Only regular files and directories travel. Writing (`iter_tar`) walks the tree through directory file
descriptors opened with O_NOFOLLOW, so a symlink is never followed (not even one swapped in while the
walk runs); symlinks, devices, FIFOs and sockets are left out, and a hard-linked file travels as an
ordinary copy of its content (no link entries are ever written). Members are named relative to the
archived directory, which itself has no entry.

Reading (`extract_tar`) checks every member before anything is written: names must be relative and free
of `..` and NUL; links, devices and FIFOs are rejected; member count, expanded size and the size of
extended (PAX / GNU long name) headers are capped. Members go into a staging directory inside the
target, created here; only a complete, valid archive is then moved into place (renames, no copies),
so a rejected or aborted upload leaves nothing behind. All file-system calls below the target use
`dir_fd` + O_NOFOLLOW, so links that sandbox code plants during an upload cannot redirect a write.

Reading holds one member at a time: tarfile's list of members is emptied as the stream goes, and what
would make tarfile hold more is refused: global PAX headers (tarfile copies them into every following
member), more than MAX_HEADER_CHAIN extended headers or MAX_HEADER_BYTES of them before one member (a
chain is held in memory whole), and sparse members (their maps can be as long as the archive). ipybox
writes none of these.

The host applies the same rules to directory downloads (`ipybox/resource/_archive.py` imports this
module), reaching the target through `ipybox/resource/_beneath.py` and calling `extract_into`.
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
import secrets
import shutil
import stat
import tarfile
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import IO, Any

CHUNK_SIZE = 1 << 20
MAX_MEMBERS = 100_000
MAX_BYTES = 10 << 30
# The extended (PAX, GNU long-name) headers before one member, together: tarfile reads them into memory,
# where PAX records take up to 15 times their size (a dict entry per record).
MAX_HEADER_BYTES = 256 << 10
MAX_HEADER_CHAIN = 4  # extended headers before one member (tarfile reads a chain recursively)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in after the type check must not block the open.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_EXTENDED_HEADER_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, *tarfile.GNU_TYPES[:2])
# Work in progress of uploads: a staging directory per directory upload, a temp file per file upload.
# Downloads leave both out.
_STAGING_PREFIX = ".ipybox-staging-"
TEMP_SUFFIX = ".ipybox-tmp"
# A symlink (never followed), a socket, or an entry gone since the listing.
_SKIPPED_OPEN_ERRORS = (errno.ELOOP, errno.ENOENT, errno.ENXIO, errno.ENOTDIR)


class UnsafeArchiveError(ValueError):
    """An archive member broke a rule; nothing of the archive was kept."""


class ArchiveTooLargeError(UnsafeArchiveError):
    """The archive has more members or more bytes than allowed."""


class ArchiveConflictError(OSError):
    """A member's type clashes with what exists at its place in the target (file vs. directory, link)."""


# -- writing ---------------------------------------------------------------------------------------


def iter_tar(
    root_fd: int,
    chunk_size: int = CHUNK_SIZE,
    *,
    exclude_mounts: bool = False,
    exclude: frozenset[str] = frozenset(),
) -> Generator[bytes, None, None]:
    """The tar archive of the directory open as `root_fd`, in chunks of about `chunk_size` bytes.

    `exclude_mounts`: leave out every entry on another file system than `root_fd`'s (mount points, such
    as binds under /app, with everything below them). `exclude`: member names (relative, `a/b`) left out
    with everything below them. The caller keeps ownership of `root_fd`. Closing the generator early
    closes every descriptor it opened.
    """
    pending: list[bytes] = []
    pending_size = 0
    device = os.fstat(root_fd).st_dev if exclude_mounts else None
    for name, fd, st in _walk(root_fd, "", device, exclude):
        info = tarfile.TarInfo(name)
        info.mode = stat.S_IMODE(st.st_mode) & 0o755
        info.mtime = int(st.st_mtime)
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
        else:
            info.size = st.st_size
        pending.append(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        pending_size += len(pending[-1])
        remaining = info.size
        while remaining:
            data = os.read(fd, min(chunk_size, remaining))
            if not data:
                raise OSError(f"{name} shrank while it was archived")
            pending.append(data)
            pending_size += len(data)
            remaining -= len(data)
            if pending_size >= chunk_size:
                yield b"".join(pending)
                pending, pending_size = [], 0
        if info.size % tarfile.BLOCKSIZE:
            pending.append(tarfile.NUL * (tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE))
            pending_size += len(pending[-1])
    pending.append(tarfile.NUL * (2 * tarfile.BLOCKSIZE))  # end of archive
    yield b"".join(pending)


def _walk(
    dir_fd: int, prefix: str, device: int | None = None, exclude: frozenset[str] = frozenset()
) -> Iterator[tuple[str, int, os.stat_result]]:
    """(name, open fd, stat) of every directory and regular file below `dir_fd`, parents first; entries
    on a device other than `device` (when given) and names in `exclude` are left out, subtrees included."""
    with os.scandir(dir_fd) as scan:
        entries = sorted((entry.name, entry.is_dir(follow_symlinks=False)) for entry in scan)
    for entry_name, is_dir in entries:
        if entry_name.startswith(_STAGING_PREFIX) if is_dir else entry_name.endswith(TEMP_SUFFIX):
            continue
        if exclude and prefix + entry_name in exclude:
            continue
        try:
            fd = os.open(entry_name, _DIR_FLAGS if is_dir else _READ_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in _SKIPPED_OPEN_ERRORS:
                continue
            raise
        try:
            st = os.fstat(fd)
            name = prefix + entry_name
            if device is not None and st.st_dev != device:
                continue  # a mount point (a bind): another file system, left out with what is below it
            if stat.S_ISDIR(st.st_mode):
                yield name, fd, st
                yield from _walk(fd, name + "/", device, exclude)
            elif stat.S_ISREG(st.st_mode):
                yield name, fd, st
        finally:
            os.close(fd)


# -- reading ---------------------------------------------------------------------------------------


class _GuardedTarInfo(tarfile.TarInfo):
    """Refuses the headers that make tarfile hold memory out of proportion (see the module)."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.XGLTYPE:
            raise UnsafeArchiveError(
                f"the archive has a global PAX header (at byte {self.offset}); ipybox never writes one, and "
                "tarfile would copy it into every following member"
            )
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise UnsafeArchiveError(f"member {self.name!r} is a GNU sparse file; ipybox never writes one")
        if self.type in _EXTENDED_HEADER_TYPES:
            # The chain of extended headers before one member, counted on the TarFile (reset below).
            count, size = getattr(tarfile_, "_ipybox_header_chain", (0, 0))
            count, size = count + 1, size + self.size
            if count > MAX_HEADER_CHAIN:
                raise UnsafeArchiveError(f"more than {MAX_HEADER_CHAIN} extended tar headers precede one member")
            if size > MAX_HEADER_BYTES:
                raise ArchiveTooLargeError(
                    f"the extended tar headers of one member take {size} bytes, more than {MAX_HEADER_BYTES}"
                )
            tarfile_._ipybox_header_chain = (count, size)  # type: ignore[attr-defined]
        else:
            tarfile_._ipybox_header_chain = (0, 0)  # type: ignore[attr-defined]
        return super()._proc_member(tarfile_)  # type: ignore[misc,no-any-return]

    # PAX headers of GNU sparse files (formats 0.0, 0.1 and 1.0; 1.0 reads its map from the data).
    def _proc_gnusparse_00(self, next_: tarfile.TarInfo, *args: Any) -> None:
        raise UnsafeArchiveError(f"member {next_.name!r} is a GNU sparse file; ipybox never writes one")

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00


def member_parts(name: str) -> list[str]:
    """The path components of a member name; refuses absolute names, `..` and NUL."""
    if "\x00" in name:
        raise UnsafeArchiveError(f"member name {name!r} contains a NUL byte")
    if name.startswith("/"):
        raise UnsafeArchiveError(f"member name {name!r} is absolute")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"member name {name!r} contains '..'")
    return parts


def extract_tar(
    fileobj: IO[bytes],
    target: Path,
    *,
    drop_special: bool = False,
    max_members: int = MAX_MEMBERS,
    max_bytes: int = MAX_BYTES,
) -> tuple[int, int]:
    """Extract the uncompressed tar stream `fileobj` into the directory `target`, all or nothing.

    `target` (and its parents) is created if missing; existing entries are merged with: a member file
    replaces a file of the same name, a member directory is merged into a directory. Links, devices and
    FIFOs are rejected, or skipped with `drop_special`. Returns (files, bytes) extracted.

    Raises:
        UnsafeArchiveError: a member broke a rule (ArchiveTooLargeError for the caps).
        ArchiveConflictError: a member clashes with an existing entry of another type.
        tarfile.TarError: the stream is not a valid tar archive.
    """
    created: list[Path] = []
    for parent in reversed([target, *target.parents]):
        if not parent.exists():
            created.append(parent)
    target.mkdir(parents=True, exist_ok=True)
    target_fd = os.open(target, _DIR_FLAGS)
    try:
        return extract_into(
            fileobj, target_fd, target, drop_special=drop_special, max_members=max_members, max_bytes=max_bytes
        )
    except BaseException:
        for path in reversed(created):  # directories this call made, if still empty
            try:
                path.rmdir()
            except OSError:
                break
        raise
    finally:
        os.close(target_fd)


def extract_into(
    fileobj: IO[bytes],
    target_fd: int,
    target: Path,
    *,
    drop_special: bool = False,
    max_members: int = MAX_MEMBERS,
    max_bytes: int = MAX_BYTES,
) -> tuple[int, int]:
    """`extract_tar` into the open directory `target_fd` (named `target` in checks and messages).

    The caller keeps ownership of `target_fd`; everything below it is reached through descriptors.
    """
    staging_name = _STAGING_PREFIX + secrets.token_hex(8)
    os.mkdir(staging_name, 0o700, dir_fd=target_fd)
    staging_fd = os.open(staging_name, _DIR_FLAGS, dir_fd=target_fd)
    try:
        counts = _extract_members(fileobj, staging_fd, target / staging_name, drop_special, max_members, max_bytes)
        _check_merge(staging_fd, target_fd, "")
        _merge(staging_fd, target_fd)
    finally:
        os.close(staging_fd)
        shutil.rmtree(staging_name, dir_fd=target_fd)
    return counts


def _extract_members(
    fileobj: IO[bytes], staging_fd: int, staging: Path, drop_special: bool, max_members: int, max_bytes: int
) -> tuple[int, int]:
    members = files = total = 0
    with tarfile.open(fileobj=fileobj, mode="r|", bufsize=CHUNK_SIZE, tarinfo=_GuardedTarInfo) as tar:
        # Not `for member in tar`: tarfile keeps every member in `tar.members`, emptied here as we go.
        while (member := tar.next()) is not None:
            tar.members.clear()
            members += 1
            if members > max_members:
                raise ArchiveTooLargeError(f"archive has more than {max_members} members")
            parts = member_parts(member.name)
            if not (member.isreg() or member.isdir()):
                if drop_special:
                    continue
                raise UnsafeArchiveError(f"member {member.name!r} is a link or special file; only files travel")
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: the stdlib's rules on top of ours
                try:
                    tarfile.data_filter(member, str(staging))
                except tarfile.FilterError as exc:
                    raise UnsafeArchiveError(f"member {member.name!r}: {exc}") from exc
            if member.isdir():
                if parts:
                    os.close(_open_dir(staging_fd, parts, mode=(member.mode & 0o755) | 0o700))
                continue
            if not parts:
                raise UnsafeArchiveError(f"file member {member.name!r} has no name")
            total += member.size
            if total > max_bytes:
                raise ArchiveTooLargeError(f"archive expands to more than {max_bytes} bytes")
            source = tar.extractfile(member)
            assert source is not None
            _write_member(source, staging_fd, parts, member)
            files += 1
    return files, total


def _open_dir(root_fd: int, parts: list[str], mode: int | None = None) -> int:
    """Open (creating as needed) the directory `parts` below `root_fd`, never through a link."""
    fd = os.dup(root_fd)
    try:
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            try:
                os.mkdir(part, 0o700, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise UnsafeArchiveError(f"{'/'.join(parts[: index + 1])!r} is both a file and a directory") from exc
            os.close(fd)
            fd = child
            if last and mode is not None:
                os.fchmod(fd, mode)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _write_member(source: IO[bytes], staging_fd: int, parts: list[str], member: tarfile.TarInfo) -> None:
    parent_fd = _open_dir(staging_fd, parts[:-1])
    try:
        try:
            fd = os.open(parts[-1], _CREATE_FLAGS, 0o600, dir_fd=parent_fd)
        except OSError as exc:
            raise UnsafeArchiveError(f"member {member.name!r} appears twice or clashes with a directory") from exc
        with open(fd, "wb", buffering=0, closefd=True) as out:
            remaining = member.size
            while remaining:
                data = source.read(min(CHUNK_SIZE, remaining))
                if not data:
                    raise tarfile.ReadError(f"archive ends inside member {member.name!r}")
                view = memoryview(data)
                while view:
                    view = view[out.write(view) or 0 :]
                remaining -= len(data)
            os.fchmod(fd, (member.mode & 0o755) | 0o600)
            os.utime(fd, (member.mtime, member.mtime))
    finally:
        os.close(parent_fd)


def _check_merge(src_fd: int, dst_fd: int, prefix: str) -> None:
    """Refuse the merge before anything moves if an entry clashes with the target."""
    with os.scandir(src_fd) as scan:
        entries = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in scan]
    for name, is_dir in entries:
        try:
            existing = os.lstat(name, dir_fd=dst_fd).st_mode
        except FileNotFoundError:
            continue
        if is_dir and stat.S_ISLNK(existing):
            raise ArchiveConflictError(f"{prefix + name!r} exists as a symlink; it is not followed")
        if is_dir and not stat.S_ISDIR(existing):
            raise ArchiveConflictError(f"{prefix + name!r} exists and is not a directory")
        if not is_dir and stat.S_ISDIR(existing):
            raise ArchiveConflictError(f"{prefix + name!r} exists and is a directory")
        if is_dir:
            src_child = os.open(name, _DIR_FLAGS, dir_fd=src_fd)
            try:
                dst_child = os.open(name, _DIR_FLAGS, dir_fd=dst_fd)
                try:
                    _check_merge(src_child, dst_child, prefix + name + "/")
                finally:
                    os.close(dst_child)
            finally:
                os.close(src_child)


def _merge(src_fd: int, dst_fd: int) -> None:
    """Move the staged entries into the target: whole new subtrees by one rename, files by replace."""
    with os.scandir(src_fd) as scan:
        entries = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in scan]
    for name, is_dir in entries:
        if is_dir:
            try:
                os.lstat(name, dir_fd=dst_fd)
            except FileNotFoundError:
                os.rename(name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
                continue
            src_child = os.open(name, _DIR_FLAGS, dir_fd=src_fd)
            try:
                try:
                    dst_child = os.open(name, _DIR_FLAGS, dir_fd=dst_fd)
                except OSError as exc:
                    raise ArchiveConflictError(f"{name!r} changed into a non-directory during the upload") from exc
                try:
                    _merge(src_child, dst_child)
                finally:
                    os.close(dst_child)
            finally:
                os.close(src_child)
        else:
            # rename() replaces a symlink itself, never what it points to.
            os.replace(name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)


# -- reading an asyncio stream from a worker thread --------------------------------------------------


class AsyncStreamFile(io.RawIOBase):
    """A blocking file object over an asyncio stream (aiohttp's StreamReader), for tarfile in a worker
    thread: each read is run on the event loop and waited for. Both ends of a directory transfer use it."""

    def __init__(self, content: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.content = content
        self._loop = loop

    def readable(self) -> bool:
        return True

    async def _read(self, size: int) -> bytes:
        chunks: list[bytes] = []
        missing = size
        while missing > 0:
            chunk = await self.content.read(missing)
            if not chunk:
                break
            chunks.append(chunk)
            missing -= len(chunk)
        return b"".join(chunks)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = CHUNK_SIZE
        return asyncio.run_coroutine_threadsafe(self._read(size), self._loop).result()

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def write_all(fd: int, chunks: list[bytes]) -> None:
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]


async def write_stream(content: Any, fd: int) -> int:
    """Copy an asyncio stream (aiohttp's StreamReader) to `fd` in about CHUNK_SIZE batches; return
    the byte count. One write runs in a worker thread while the next batch arrives, so network and disk
    overlap. Whenever this returns or raises, no write is in flight: the caller may close `fd`."""
    size = 0
    writing: asyncio.Future[None] | None = None
    try:
        batch: list[bytes] = []
        batch_size = 0
        while True:
            chunk = await content.readany()
            if chunk:
                batch.append(chunk)
                batch_size += len(chunk)
            if batch_size >= CHUNK_SIZE or (not chunk and batch):
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(asyncio.to_thread(write_all, fd, batch))
                size += batch_size
                batch, batch_size = [], 0
            if not chunk:
                break
        if writing is not None:
            await writing
        return size
    except BaseException:
        if writing is not None:
            await asyncio.wait([writing])  # the thread uses the fd until it returns
        raise
