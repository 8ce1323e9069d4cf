"""MCP client generation endpoints of the resource server.

- `POST /mcp/sources` with `{"relpath": str, "server_name": str, "server_params": {...}}`: connects to
  the MCP server from inside the container, writes the package `/app/<relpath>/<server_name>/`,
  registers the server with the tool service (`tools.register`: its params stay in memory, never in
  the package) and answers `{"modules": [...]}`. 400: bad path, name or params; 422: the MCP server
  could not be reached, failed, or did not answer in time.
  With `"tools": [{"name", "description", "inputSchema", "outputSchema"}, ...]` instead of
  `server_params` (a host-side server, listed by the host): generates from that list without
  connecting anywhere and registers nothing.
- `GET /mcp/sources?relpath=...&server_name=...`: the generated tool modules' sources,
  `{"<module>": "<source>"}`; 404 when there is no generated package.

Generation runs in a subprocess (`ipybox_server.mcp_generate`): this process shares its loop with
the Kernel Gateway and must not import the `mcp` SDK or datamodel-code-generator, block on code
generation, or hang with a server that never answers.
"""

from __future__ import annotations

import asyncio
import json
import keyword
import os
import signal
import sys
from pathlib import Path, PurePosixPath
from typing import Any

from aiohttp import web

from ipybox_server import mcp_params, tools
from ipybox_server.paths import APP_ROOT, bad_request, not_found, resolve

# Above mcp_generate.LIST_TIMEOUT, so that a slow server gets that message rather than this one.
GENERATE_TIMEOUT = 240.0
MAX_SOURCE_BYTES = 10 * 1024 * 1024
MAX_TOOLS = 10_000


def unprocessable(message: str) -> web.HTTPUnprocessableEntity:
    return web.HTTPUnprocessableEntity(text=json.dumps({"error": message}), content_type="application/json")


def _check_server_name(server_name: Any) -> str:
    if not isinstance(server_name, str) or not server_name.isidentifier() or keyword.iskeyword(server_name):
        raise bad_request(f"server_name {server_name!r} must be a Python identifier (it names a package)")
    return server_name


def _check_relpath(relpath: Any) -> str:
    if not isinstance(relpath, str):
        raise bad_request("relpath must be a string")
    return relpath


def package_dir(relpath: str, server_name: str) -> Path:
    """The package directory `/app/<relpath>/<server_name>`; refuses paths outside /app."""
    base = resolve(relpath, allow_root=True)
    return resolve(str(PurePosixPath(os.path.relpath(base, APP_ROOT.resolve()), server_name)))


async def _run_generator(request_body: dict[str, Any]) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",
        "-m",
        "ipybox_server.mcp_generate",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(APP_ROOT),
        start_new_session=True,  # its own process group: a kill also reaches a stdio MCP server it started
    )
    try:
        stdout, stderr = await asyncio.wait_for(
            process.communicate(json.dumps(request_body).encode()), timeout=GENERATE_TIMEOUT
        )
    except TimeoutError as exc:
        raise unprocessable(f"generating the MCP client did not finish within {GENERATE_TIMEOUT:g} s") from exc
    finally:
        if process.returncode is None:  # timed out, or the request was cancelled
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await process.wait()
    try:
        answer: dict[str, Any] = json.loads(stdout)
    except ValueError:
        tail = stderr.decode("utf-8", "replace")[-2000:].strip()
        raise web.HTTPInternalServerError(
            text=json.dumps({"error": f"the MCP generator exited with {process.returncode}: {tail}"}),
            content_type="application/json",
        ) from None
    return answer


def _check_tools(tools_list: Any) -> list[dict[str, Any]]:
    """Tool descriptions as MCP lists them (`inputSchema`, camelCase) -> the generator's dicts."""
    if not isinstance(tools_list, list) or len(tools_list) > MAX_TOOLS:
        raise bad_request(f"tools must be a list of at most {MAX_TOOLS} tool descriptions")
    checked = []
    for index, tool in enumerate(tools_list):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            raise bad_request(f"tools[{index}] must be an object with a non-empty 'name'")
        description = tool.get("description")
        if description is not None and not isinstance(description, str):
            raise bad_request(f"tools[{index}].description must be a string")
        for key in ("inputSchema", "outputSchema"):
            if tool.get(key) is not None and not isinstance(tool[key], dict):
                raise bad_request(f"tools[{index}].{key} must be a JSON schema object")
        checked.append(
            {
                "name": tool["name"],
                "description": description,
                "input_schema": tool.get("inputSchema") or {"type": "object"},
                "output_schema": tool.get("outputSchema"),
            }
        )
    return checked


async def generate_sources(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        raise bad_request("the request body must be JSON") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    server_name = _check_server_name(body.get("server_name"))
    relpath = _check_relpath(body.get("relpath"))
    generator_request: dict[str, Any]
    if "tools" in body:
        if "server_params" in body:
            raise bad_request("give either server_params (a server to connect to) or tools (a list), not both")
        server_params = None
        generator_request = {"tools": _check_tools(body["tools"])}
    else:
        try:
            server_params = mcp_params.normalize(body.get("server_params"))
        except mcp_params.ParamsError as exc:
            raise bad_request(str(exc)) from None
        generator_request = {"server_params": server_params}
        tools.refuse_host_served(server_name)  # before the package is written, not after
    target = package_dir(relpath, server_name)
    answer = await _run_generator({"target": str(target), **generator_request})
    if "error" in answer:
        message = str(answer["error"])
        if answer.get("status") == 400:
            raise bad_request(message)
        if answer.get("status") == 422:
            raise unprocessable(message)
        raise web.HTTPInternalServerError(text=json.dumps({"error": message}), content_type="application/json")
    if server_params is not None:
        tools.register(server_name, server_params)  # the generated modules call it by name from now on
    return web.json_response({"modules": answer["modules"]})


def read_package(package: Path) -> dict[str, str]:
    if not (package / "__init__.py").is_file():
        raise not_found(f"no generated MCP package at {package}")
    sources = {}
    for path in sorted(package.glob("*.py")):
        if path.name == "__init__.py" or path.is_symlink() or not path.is_file():
            continue
        if path.stat().st_size > MAX_SOURCE_BYTES:
            continue
        sources[path.stem] = path.read_text(encoding="utf-8", errors="replace")
    return sources


async def get_sources(request: web.Request) -> web.Response:
    server_name = _check_server_name(request.query.get("server_name"))
    relpath = _check_relpath(request.query.get("relpath", ""))
    package = package_dir(relpath, server_name)
    return web.json_response(await asyncio.to_thread(read_package, package))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/mcp/sources", generate_sources)
    app.router.add_get("/mcp/sources", get_sources)
