"""Module sources endpoint: `GET /modules?name=a&name=b.c` -> `{"a": "<source>", "b.c": "<source>"}`.

Modules are looked up on the kernel's search path (`/app` first, then the user environment's, which is
not the server's own) without importing anything: importing would run sandbox-controlled code in the
server process. All or nothing: an unknown module, or one without Python source, is a 404 naming it.
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import json
import os
import subprocess
import threading
from pathlib import Path

from aiohttp import web

from ipybox_server.paths import APP_ROOT

MAX_NAMES = 100


KERNEL_PYTHON = "/opt/ipybox/user-venv/bin/python"
"""The user environment's interpreter, which kernels run (the server runs in ipybox's own)."""

_SYS_PATH_SCRIPT = "import json, sys; print(json.dumps(sys.path))"

_cache_lock = threading.Lock()
_cached: tuple[tuple[int, ...], list[str]] | None = None


def _search_path() -> list[str]:
    # Kernels see /app first (PYTHONPATH), then the user environment's sys.path.
    return [str(APP_ROOT), *_kernel_sys_path()]


def _kernel_sys_path() -> list[str]:
    """The user interpreter's sys.path (isolated, as a kernel starts), asked once and cached.

    Asked again when a directory on it changed (a `pip install` that adds a .pth entry, e.g. an editable
    install). Running the user's interpreter gives nothing away: it runs as the sandbox user, as kernels do.
    """
    global _cached
    with _cache_lock:
        if _cached is not None and _cached[0] == _mtimes(_cached[1]):
            return _cached[1]
        try:
            done = subprocess.run(
                [KERNEL_PYTHON, "-I", "-c", _SYS_PATH_SCRIPT],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
                cwd="/",
            )
            path = [str(entry) for entry in json.loads(done.stdout) if entry]
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            raise web.HTTPServiceUnavailable(
                text=json.dumps({"error": f"cannot ask the sandbox's Python for its module path: {exc}"}),
                content_type="application/json",
            ) from exc
        _cached = (_mtimes(path), path)
        return path


def _mtimes(path: list[str]) -> tuple[int, ...]:
    stamps = []
    for entry in path:
        try:
            stamps.append(os.stat(entry).st_mtime_ns)
        except OSError:
            stamps.append(-1)
    return tuple(stamps)


def find_source_file(name: str) -> Path | None:
    """The .py file of module `name` (a package's __init__.py), found without importing anything."""
    path: list[str] | None = _search_path()
    spec = None
    parts = name.split(".")
    for index in range(len(parts)):
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: index + 1]), path)
        if spec is None:
            return None
        path = list(spec.submodule_search_locations or []) or None
        if path is None and index < len(parts) - 1:
            return None  # a plain module has no submodules
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None  # namespace package, extension or built-in module: no Python source
    return Path(spec.origin)


def read_sources(names: list[str]) -> dict[str, str]:
    sources = {}
    for name in names:
        if not all(part.isidentifier() for part in name.split(".")):
            raise web.HTTPBadRequest(
                text=json.dumps({"error": f"{name!r} is not a module name"}), content_type="application/json"
            )
        path = find_source_file(name)
        if path is None:
            raise web.HTTPNotFound(
                text=json.dumps({"error": f"module {name!r} not found or has no Python source in the sandbox"}),
                content_type="application/json",
            )
        sources[name] = path.read_text(encoding="utf-8", errors="replace")
    return sources


async def get_modules(request: web.Request) -> web.Response:
    names = request.query.getall("name", [])
    if not names or len(names) > MAX_NAMES:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"give 1 to {MAX_NAMES} module names as ?name=..."}),
            content_type="application/json",
        )
    sources = await asyncio.to_thread(read_sources, names)
    return web.json_response(sources)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/modules", get_modules)
