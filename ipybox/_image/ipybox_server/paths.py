"""Turns a client-supplied relative path into a path inside /app, or refuses it.

The checks (in order): no NUL byte; not absolute; no `..` part, also not after one more round of
percent-decoding (encoded traversal such as `%2e%2e%2f`); no name longer than NAME_MAX bytes and no path
longer than PATH_MAX (the kernel would refuse them with ENAMETOOLONG); and, after resolving symlinks,
still inside the real /app (a symlink in the sandbox cannot point a request elsewhere). Refusals are HTTP 400 with
a JSON error and nothing touched.

The server runs as the sandbox user, so these checks do not guard privileges the sandbox lacks;
they make the API mean what it says (paths under /app) and keep a host client's request from being
steered by links that sandbox code planted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

from aiohttp import web

APP_ROOT = Path(os.environ.get("IPYBOX_APP_ROOT", "/app"))
# Linux limits: one file name, and a whole path (with its terminating NUL) as the kernel takes it.
NAME_MAX = 255
PATH_MAX = 4096


def bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


def not_found(message: str) -> web.HTTPNotFound:
    return web.HTTPNotFound(text=json.dumps({"error": message}), content_type="application/json")


def resolve(relpath: str, *, allow_root: bool = False, root: Path | None = None) -> Path:
    """The absolute, symlink-free path of `relpath` under /app.

    Raises:
        web.HTTPBadRequest: the path is refused (see module docstring).
    """
    root = (root or APP_ROOT).resolve()
    if "\x00" in relpath or "\x00" in unquote(relpath):
        raise bad_request("path contains a NUL byte")
    for candidate in (relpath, unquote(relpath)):
        pure = PurePosixPath(candidate)
        if pure.is_absolute():
            raise bad_request(f"path {relpath!r} must be relative to /app")
        if ".." in pure.parts:
            raise bad_request(f"path {relpath!r} must not contain '..'")
    parts = PurePosixPath(relpath).parts
    if not parts and not allow_root:
        raise bad_request("path is empty")
    try:
        for part in parts:
            if len(os.fsencode(part)) > NAME_MAX:
                raise bad_request(f"path {relpath!r}: the name {part!r} is longer than {NAME_MAX} bytes")
        if len(os.fsencode(root.joinpath(*parts))) >= PATH_MAX:
            raise bad_request(f"path {relpath!r} is longer than {PATH_MAX - 1} bytes under /app")
    except UnicodeEncodeError:
        raise bad_request(f"path {relpath!r} cannot be encoded as a file name") from None
    target = Path(os.path.realpath(root.joinpath(*parts)))
    if os.path.commonpath([root, target]) != str(root):
        raise bad_request(f"path {relpath!r} leads outside /app (through a symlink)")
    if target == root and not allow_root:
        raise bad_request("path names /app itself")
    return target
