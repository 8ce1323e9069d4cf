"""File and directory transfers of ResourceClient (endpoints: docs/files.md).

Bodies stream both ways in chunks of CHUNK_SIZE, with disk I/O in worker threads, so memory stays
bounded whatever the size. Local writes are atomic like the server's: a download goes to a temp file
next to the target and replaces it only when complete; a directory download is staged (`_archive`).
Local writes reach the target's directory through `_beneath` (one component at a time, no symlinks)
and everything in it through that directory's descriptor: temp file, rename, clean-up. Given a `root`
(`ipybox mcp`'s allowed directory, opened once), a transfer reaches its local path from the root's
descriptor and follows no link at all, reads included; without one, an upload opens its source as
the user named it, symlinks and all.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import stat
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, TypeVar, cast
from urllib.parse import quote

from yarl import URL

from ipybox._errors import ArchiveError
from ipybox.resource import _archive, _beneath
from ipybox.resource._http import Link, raise_for_response, transfer

CHUNK_SIZE = _archive.CHUNK_SIZE
# The response buffer aiohttp may fill before it stops reading the socket (default 64 KiB).
_READ_BUFSIZE = 4 * CHUNK_SIZE
_NO_COMPRESSION = {"Accept-Encoding": "identity"}

_T = TypeVar("_T")


def _url(kind: str, relpath: str) -> URL:
    """`/<kind>/<relpath>` with relpath sent verbatim: the server, not URL normalisation, judges it.

    Without this, `..` segments would be resolved client-side (`files/../status` is `/status`).
    """
    segments = [quote(part, safe="") for part in relpath.split("/")]
    segments = [part.replace(".", "%2E") if part in (".", "..") else part for part in segments]
    return URL(f"/{kind}/" + "/".join(segments), encoded=True)


# -- files -----------------------------------------------------------------------------------------


async def upload_file(link: Link, relpath: str, local_path: Path, *, root: _beneath.Root | None = None) -> int:
    """Upload `local_path` (below `root`, if given: see the module); the number of bytes sent."""
    action = f"upload of {str(local_path)!r} to {relpath!r}"
    # FileNotFoundError (and, below a root, a refused symlink) before any request.
    file = await _to_thread_to_the_end(lambda: _open_source(local_path, root), lambda opened: opened.close())
    try:
        size = os.fstat(file.fileno()).st_size
        headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
        async with transfer(link, action) as watch:
            body = watch.body(_read_chunks(file, size, local_path))
            async with link.session.put(_url("files", relpath), data=body, headers=headers) as response:
                await raise_for_response(response, action)
        return size
    finally:
        await asyncio.to_thread(file.close)


def _open_source(local_path: Path, root: _beneath.Root | None) -> IO[bytes]:
    if root is None:
        return open(local_path, "rb", buffering=0)
    fd = _beneath.open_file(local_path, root=root)
    try:
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


async def _read_chunks(file: IO[bytes], size: int, local_path: Path) -> AsyncIterator[bytes]:
    """Exactly `size` bytes of `file`, the next chunk read while the current one is sent."""
    remaining = size
    reading: asyncio.Future[bytes] | None = None
    try:
        while remaining:
            if reading is None:
                reading = asyncio.ensure_future(asyncio.to_thread(file.read, min(CHUNK_SIZE, remaining)))
            chunk = await reading
            reading = None
            if not chunk:
                # The length was announced; sending fewer bytes must fail the upload, not shorten the file.
                raise OSError(f"{local_path} shrank during the upload")
            remaining -= len(chunk)
            if remaining:
                reading = asyncio.ensure_future(asyncio.to_thread(file.read, min(CHUNK_SIZE, remaining)))
            yield chunk
    finally:
        if reading is not None:
            await asyncio.wait([reading])


def _open_temp(local_path: Path, root: _beneath.Root | None) -> tuple[_beneath.Directory, str, int, str]:
    """The target's directory (made if missing), the target's name in it, and a fresh temp file there."""
    directory, name = _beneath.open_parent(local_path, root=root)
    try:
        try:
            st = os.stat(name, dir_fd=directory.fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            # A symlink is replaced, not followed; only one to a directory is refused, as before.
            if stat.S_ISDIR(st.st_mode) or (
                stat.S_ISLNK(st.st_mode) and os.path.isdir(os.path.join(directory.path, name))
            ):
                raise IsADirectoryError(errno.EISDIR, f"{local_path} is a directory", str(local_path))
        temp = f".{name}.{secrets.token_hex(6)}{_archive.TEMP_SUFFIX}"
        # 0o666 through the umask, like open(); O_EXCL + O_NOFOLLOW: always a fresh file of ours.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return directory, name, os.open(temp, flags, 0o666, dir_fd=directory.fd), temp
    except BaseException:
        directory.close()
        raise


def _discard_temp(directory: _beneath.Directory, fd: int, temp: str | None) -> None:
    """Close what `_open_temp` opened, and remove the temp file unless it became the target."""
    os.close(fd)
    if temp is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=directory.fd)
    directory.close()


async def _to_thread_to_the_end(func: Callable[[], _T], undo: Callable[[_T], None] | None = None) -> _T:
    """`func()` in a worker thread. If cancelled, wait for it (it uses descriptors the caller closes
    once this raises) and `undo` its result."""
    future = asyncio.ensure_future(asyncio.to_thread(func))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        if undo is not None and not future.cancelled() and future.exception() is None:
            undo(future.result())
        raise


async def download_file(link: Link, relpath: str, local_path: Path, *, root: _beneath.Root | None = None) -> int:
    """Download to `local_path` (below `root`, if given: see the module); the number of bytes written."""
    action = f"download of {relpath!r}"
    async with transfer(link, action):
        async with link.session.get(
            _url("files", relpath), headers=_NO_COMPRESSION, read_bufsize=_READ_BUFSIZE
        ) as response:
            await raise_for_response(response, action)
            directory, name, fd, temp = await _to_thread_to_the_end(
                lambda: _open_temp(local_path, root), lambda opened: _discard_temp(opened[0], opened[2], opened[3])
            )
            leftover: str | None = temp
            try:
                size = await _archive.write_stream(response.content, fd)
                # rename() replaces a symlink at the target itself, never what it points to.
                await _to_thread_to_the_end(
                    lambda: os.replace(temp, name, src_dir_fd=directory.fd, dst_dir_fd=directory.fd)
                )
                leftover = None
                return size
            finally:
                _discard_temp(directory, fd, leftover)


async def delete_file(link: Link, relpath: str) -> None:
    action = f"delete of {relpath!r}"
    async with transfer(link, action):
        async with link.session.delete(_url("files", relpath)) as response:
            await raise_for_response(response, action)


# -- directories -----------------------------------------------------------------------------------


async def upload_directory(link: Link, relpath: str, local_path: Path, *, root: _beneath.Root | None = None) -> None:
    """Upload the tree at `local_path` (below `root`, if given: see the module). Inside the tree no link
    is ever followed, with or without a root: `iter_tar` opens each entry from its parent's descriptor
    with O_NOFOLLOW and leaves links out."""
    action = f"upload of directory {str(local_path)!r} to {relpath!r}"
    try:
        root_fd = await _to_thread_to_the_end(lambda: _open_tree(local_path, root), os.close)
    except NotADirectoryError:
        raise FileNotFoundError(f"{local_path} is not a directory") from None
    try:
        async with transfer(link, action) as watch:
            body = watch.body(_tar_chunks(root_fd))
            async with link.session.put(
                _url("directories", relpath), data=body, headers={"Content-Type": "application/x-tar"}
            ) as response:
                await raise_for_response(response, action)
    finally:
        os.close(root_fd)


def _open_tree(local_path: Path, root: _beneath.Root | None) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    if root is None:
        return os.open(local_path, flags)
    with _beneath.open_directory(local_path, root=root) as directory:
        # The walk's descriptor may be O_PATH; "." reopens that very directory for reading.
        return os.open(".", flags, dir_fd=directory.fd)


async def _tar_chunks(root_fd: int) -> AsyncIterator[bytes]:
    chunks = _archive.iter_tar(root_fd, CHUNK_SIZE)
    try:
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            yield chunk
    finally:
        await asyncio.to_thread(chunks.close)


async def download_directory(link: Link, relpath: str, local_path: Path) -> None:
    action = f"download of directory {relpath!r}"
    await asyncio.to_thread(_check_directory_target, local_path)
    async with transfer(link, action):
        async with link.session.get(
            _url("directories", relpath), headers=_NO_COMPRESSION, read_bufsize=_READ_BUFSIZE
        ) as response:
            await raise_for_response(response, action)
            reader = _archive.AsyncStreamFile(response.content, asyncio.get_running_loop())
            try:
                await _in_thread_reading(
                    reader, lambda: _archive.extract_tar(cast(IO[bytes], reader), local_path, drop_special=True)
                )
            except tarfile.TarError as exc:
                raise ArchiveError(f"{action}: the sandbox sent a broken archive: {exc}") from exc


def _check_directory_target(local_path: Path) -> None:
    """Before any request: `local_path` is a directory or missing, with no symlink on the way."""
    try:
        _beneath.open_directory(local_path).close()
    except FileNotFoundError:
        pass


async def _in_thread_reading(reader: _archive.AsyncStreamFile, work: Callable[[], _T]) -> _T:
    """Run `work` (which reads `reader`) in a thread; if cancelled, stop its reads and wait for its cleanup."""
    future = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        reader.content.set_exception(ConnectionAbortedError("transfer cancelled"))
        await asyncio.wait([future])
        raise
