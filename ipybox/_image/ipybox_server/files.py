"""File and directory endpoints of the resource server. Paths are relative to /app (see paths.py).

    PUT    /files/{relpath}        body: the file's bytes       -> 200 {"size": n}
    GET    /files/{relpath}        -> 200 the file's bytes (sendfile)
    DELETE /files/{relpath}        -> 200 {}
    PUT    /directories/{relpath}  body: an uncompressed tar    -> 200 {"files": n, "size": n}
    GET    /directories/{relpath}  -> 200 an uncompressed tar of the directory's contents
           ?exclude_mounts=true    leave out mount points below it (binds under /app) and their contents
           &exclude=a/b            leave out this entry (relative to the directory) and what is below it;
                                   repeatable (snapshots leave out their own temp directory)

An empty directory relpath means /app itself. Errors are JSON `{"error": ...}`: 400 a refused path or
archive, 404 nothing of the requested kind there (a directory where a file is asked for counts as
missing), 409 a write that clashes with an existing entry of another type, 413 an archive over a cap.

Bodies stream in both directions in chunks of CHUNK_SIZE; disk I/O runs in worker threads, because
this loop also serves the kernel gateway. Writes are atomic: a file upload goes to a temp file in the
target's directory that replaces the target only once the whole body arrived; a directory upload is
staged (archive.py). A failed or aborted upload leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import secrets
import stat
import tarfile
from pathlib import Path

from aiohttp import web

from ipybox_server import archive
from ipybox_server.paths import bad_request, not_found, resolve

CHUNK_SIZE = archive.CHUNK_SIZE
_OPEN_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_OPEN_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A temp file is named `.<name>.<12 hex digits>.ipybox-tmp`; room for that within NAME_MAX (255).
_TEMP_NAME_BYTES = 255 - len(f"..{'0' * 12}{archive.TEMP_SUFFIX}")


def conflict(message: str) -> web.HTTPConflict:
    return web.HTTPConflict(text=json.dumps({"error": message}), content_type="application/json")


def too_large(message: str) -> web.HTTPRequestEntityTooLarge:
    # aiohttp's 413 wants the limits; the message carries them.
    return web.HTTPRequestEntityTooLarge(
        max_size=archive.MAX_BYTES, actual_size=0, text=json.dumps({"error": message}), content_type="application/json"
    )


def _relpath(request: web.Request) -> str:
    return request.match_info["relpath"]


# -- files -----------------------------------------------------------------------------------------


def _open_temp(target: Path, relpath: str) -> tuple[int, Path]:
    if target.is_dir():
        raise conflict(f"{relpath!r} is a directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise conflict(f"a parent of {relpath!r} is not a directory") from None
    temp = target.with_name(f".{_short(target.name)}.{secrets.token_hex(6)}{archive.TEMP_SUFFIX}")
    # 0o666 through the umask, as a file created by open() gets; O_EXCL + O_NOFOLLOW: a fresh file.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    return fd, temp


def _short(name: str) -> str:
    """`name` cut to at most _TEMP_NAME_BYTES bytes: with the temp file's decoration it must still fit NAME_MAX."""
    while len(os.fsencode(name)) > _TEMP_NAME_BYTES:
        name = name[:-1]
    return name


async def put_file(request: web.Request) -> web.Response:
    relpath = _relpath(request)
    target = resolve(relpath)
    fd, temp = await asyncio.to_thread(_open_temp, target, relpath)
    try:
        size = await archive.write_stream(request.content, fd)
        await asyncio.to_thread(os.replace, temp, target)
    except BaseException:
        _discard(temp)
        raise
    finally:
        os.close(fd)
    return web.json_response({"size": size})


def _discard(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _open_for_reading(target: Path, relpath: str) -> tuple[io.BufferedReader, int]:
    try:
        fd = os.open(target, _OPEN_FILE_FLAGS)
    except FileNotFoundError:
        raise not_found(f"no file {relpath!r} in /app") from None
    except NotADirectoryError:
        raise not_found(f"no file {relpath!r} in /app: a parent is not a directory") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # swapped for a link or socket after resolve()
            raise not_found(f"{relpath!r} is not a regular file") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise not_found(f"{relpath!r} is {kind}, not a file")
    os.set_blocking(fd, True)
    return open(fd, "rb"), st.st_size


async def get_file(request: web.Request) -> web.StreamResponse:
    relpath = _relpath(request)
    target = resolve(relpath)
    file, size = await asyncio.to_thread(_open_for_reading, target, relpath)
    try:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        if size:
            transport = request.transport
            if transport is None:
                raise ConnectionResetError("client went away")
            try:
                # Kernel-side copy (sendfile(2)), non-blocking on this loop.
                await asyncio.get_running_loop().sendfile(transport, file, 0, size)
            except NotImplementedError:
                while chunk := await asyncio.to_thread(file.read, CHUNK_SIZE):
                    await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        file.close()


def _delete(target: Path, relpath: str) -> None:
    try:
        mode = os.lstat(target).st_mode
        if stat.S_ISDIR(mode):
            raise not_found(f"{relpath!r} is a directory, not a file")
        target.unlink()
    except FileNotFoundError:  # also when it went away between lstat and unlink
        raise not_found(f"no file {relpath!r} in /app") from None
    except NotADirectoryError:
        raise not_found(f"no file {relpath!r} in /app: a parent is not a directory") from None


async def delete_file(request: web.Request) -> web.Response:
    relpath = _relpath(request)
    await asyncio.to_thread(_delete, resolve(relpath), relpath)
    return web.json_response({})


# -- directories -----------------------------------------------------------------------------------


async def put_directory(request: web.Request) -> web.Response:
    relpath = _relpath(request)
    target = resolve(relpath, allow_root=True)
    reader = archive.AsyncStreamFile(request.content, asyncio.get_running_loop())
    try:
        files, size = await asyncio.to_thread(archive.extract_tar, reader, target)
    except archive.ArchiveTooLargeError as exc:
        raise too_large(str(exc)) from exc
    except archive.UnsafeArchiveError as exc:
        raise bad_request(f"archive refused: {exc}") from exc
    except archive.ArchiveConflictError as exc:
        raise conflict(str(exc)) from exc
    except (FileExistsError, NotADirectoryError) as exc:
        raise conflict(f"{relpath!r} or a parent is not a directory") from exc
    except tarfile.TarError as exc:
        raise bad_request(f"not a valid tar archive: {exc}") from exc
    except OverflowError as exc:  # os.utime of a member's mtime beyond time_t
        raise bad_request(f"archive refused: a member's time is out of range ({exc})") from exc
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise bad_request(f"archive refused: a member name is longer than 255 bytes: {exc.filename!r}") from exc
        raise
    return web.json_response({"files": files, "size": size})


def _open_directory(target: Path, relpath: str) -> int:
    try:
        return os.open(target, _OPEN_DIR_FLAGS)
    except FileNotFoundError:
        raise not_found(f"no directory {relpath!r} in /app") from None
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise not_found(f"{relpath!r} is not a directory") from None
        raise


_MAX_EXCLUDES = 64


def _archive_options(request: web.Request) -> tuple[bool, frozenset[str]]:
    """`exclude_mounts` and `exclude` of GET /directories/ (see the module), checked."""
    flag = request.query.get("exclude_mounts", "false")
    if flag not in ("true", "false"):
        raise bad_request(f"exclude_mounts must be 'true' or 'false', not {flag[:100]!r}")
    excludes = request.query.getall("exclude", [])
    if len(excludes) > _MAX_EXCLUDES:
        raise bad_request(f"at most {_MAX_EXCLUDES} exclude parameters")
    # Only compared with member names: a name no member has (`..`, absolute, NUL) leaves nothing out.
    names = {"/".join(part for part in value.split("/") if part not in ("", ".")) for value in excludes}
    return flag == "true", frozenset(names)


async def get_directory(request: web.Request) -> web.StreamResponse:
    relpath = _relpath(request)
    target = resolve(relpath, allow_root=True)
    exclude_mounts, exclude = _archive_options(request)
    root_fd = await asyncio.to_thread(_open_directory, target, relpath)
    chunks = archive.iter_tar(root_fd, CHUNK_SIZE, exclude_mounts=exclude_mounts, exclude=exclude)
    try:
        response = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        await asyncio.to_thread(chunks.close)
        os.close(root_fd)


# `(?s:...)`: a relpath may contain any character, a newline too (`.` alone stops at one, and such a
# path would be a "no route" 404 instead of a file).
_FILE = "{relpath:(?s:.+)}"
_DIRECTORY = "{relpath:(?s:.*)}"


def add_routes(app: web.Application) -> None:
    app.router.add_put(f"/files/{_FILE}", put_file)
    app.router.add_get(f"/files/{_FILE}", get_file)
    app.router.add_delete(f"/files/{_FILE}", delete_file)
    app.router.add_put(f"/directories/{_DIRECTORY}", put_directory)
    app.router.add_get(f"/directories/{_DIRECTORY}", get_directory)
