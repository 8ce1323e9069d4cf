"""MCP client generation requests of ResourceClient (server side: `ipybox_server.mcp_sources`)."""

from __future__ import annotations

from typing import Any

from ipybox.resource._http import Link, client_timeout, raise_for_response, transfer

GENERATE_RESPONSE_TIMEOUT = 300.0
"""The least time generation may take before its answer: above the server's own limit
(`ipybox_server.mcp_sources.GENERATE_TIMEOUT`, 240 s, which answers 422 naming the cause); a unit test
keeps it so. The inactivity timeout alone would end a slow but working generation as a stall."""


def _check_names(relpath: str, server_name: str) -> None:
    if not isinstance(relpath, str):
        raise TypeError("relpath must be a string")
    if not isinstance(server_name, str):
        raise TypeError("server_name must be a string")


async def generate_mcp_sources(link: Link, relpath: str, server_name: str, server_params: dict[str, Any]) -> list[str]:
    _check_names(relpath, server_name)
    if not isinstance(server_params, dict):
        raise TypeError("server_params must be a dict")
    action = f"generating MCP sources for server {server_name!r}"
    body = {"relpath": relpath, "server_name": server_name, "server_params": server_params}
    inactivity = link.inactivity_timeout
    read_timeout = None if inactivity is None else max(inactivity, GENERATE_RESPONSE_TIMEOUT)
    async with transfer(link, action, read_timeout):
        timeout = client_timeout(inactivity, read_timeout)
        async with link.session.post("/mcp/sources", json=body, timeout=timeout) as response:
            await raise_for_response(response, action)
            answer: dict[str, Any] = await response.json()
            modules: list[str] = answer["modules"]
            return modules


async def get_mcp_sources(link: Link, relpath: str, server_name: str) -> dict[str, str]:
    _check_names(relpath, server_name)
    action = f"getting the MCP sources of server {server_name!r}"
    async with transfer(link, action):
        async with link.session.get(
            "/mcp/sources", params={"relpath": relpath, "server_name": server_name}
        ) as response:
            await raise_for_response(response, action)
            sources: dict[str, str] = await response.json()
            return sources
