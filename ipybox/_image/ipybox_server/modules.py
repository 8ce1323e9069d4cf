"""Module sources endpoint: `GET /modules?name=a&name=b.c` -> `{"a": "<source>", "b.c": "<source>"}`.

Modules are looked up on the kernel's search path (`/app` first, then the sandbox's environment)
without importing anything: importing would run sandbox-controlled code in the server process.
All or nothing: an unknown module, or one without Python source, is a 404 naming it.
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import json
import sys
from pathlib import Path

from aiohttp import web

from ipybox_server.paths import APP_ROOT

MAX_NAMES = 100


def _search_path() -> list[str]:
    # The server runs isolated (-I: no PYTHONPATH, no cwd); kernels also see /app.
    return [str(APP_ROOT), *sys.path]


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
