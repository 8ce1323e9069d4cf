"""MCP client generation requests of ResourceClient (server side: `ipybox_server.mcp_sources`)."""

from __future__ import annotations

from typing import Any

import aiohttp

from ipybox.resource._http import connection_errors, raise_for_response


def _check_names(relpath: str, server_name: str) -> None:
    if not isinstance(relpath, str):
        raise TypeError("relpath must be a string")
    if not isinstance(server_name, str):
        raise TypeError("server_name must be a string")


async def generate_mcp_sources(
    session: aiohttp.ClientSession, relpath: str, server_name: str, server_params: dict[str, Any]
) -> list[str]:
    _check_names(relpath, server_name)
    if not isinstance(server_params, dict):
        raise TypeError("server_params must be a dict")
    action = f"generating MCP sources for server {server_name!r}"
    body = {"relpath": relpath, "server_name": server_name, "server_params": server_params}
    with connection_errors(action):
        async with session.post("/mcp/sources", json=body) as response:
            await raise_for_response(response, action)
            answer: dict[str, Any] = await response.json()
            modules: list[str] = answer["modules"]
            return modules


async def get_mcp_sources(session: aiohttp.ClientSession, relpath: str, server_name: str) -> dict[str, str]:
    _check_names(relpath, server_name)
    action = f"getting the MCP sources of server {server_name!r}"
    with connection_errors(action):
        async with session.get("/mcp/sources", params={"relpath": relpath, "server_name": server_name}) as response:
            await raise_for_response(response, action)
            sources: dict[str, str] = await response.json()
            return sources
