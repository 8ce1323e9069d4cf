"""MCP client generation requests of ResourceClient and ToolHost (server side: `ipybox_server.mcp_sources`).

Server parameters are checked here first, by the rules the sandbox applies (`ipybox_server.mcp_params`,
imported from the image's source): parameters that cannot work are the caller's mistake, reported as
`InvalidServerParamsError` naming the problem and the fix before anything is sent.
"""

from __future__ import annotations

from typing import Any

from ipybox._errors import InvalidServerParamsError
from ipybox._image.ipybox_server import mcp_params
from ipybox.resource._http import Link, client_timeout, raise_for_response, transfer

GENERATE_RESPONSE_TIMEOUT = 300.0
"""The least time generation may take before its answer: above the server's own limit
(`ipybox_server.mcp_sources.GENERATE_TIMEOUT`, 240 s, which answers 422 naming the cause); a unit test
keeps it so. The inactivity timeout alone would end a slow but working generation as a stall."""


def check_server_params(params: Any, what: str = "server_params") -> dict[str, Any]:
    """`params` validated and normalized as the sandbox would; `what` names them in the message.

    Raises:
        InvalidServerParamsError: the message names the parameter, the problem and the fix.
    """
    try:
        return mcp_params.normalize(params)
    except mcp_params.ParamsError as exc:
        message = str(exc) if what == "server_params" else f"{what}: {exc}"
        raise InvalidServerParamsError(message, option="server_params") from None


def _check_names(relpath: str, server_name: str) -> None:
    if not isinstance(relpath, str):
        raise TypeError("relpath must be a string")
    if not isinstance(server_name, str):
        raise TypeError("server_name must be a string")


async def generate_mcp_sources(link: Link, relpath: str, server_name: str, server_params: dict[str, Any]) -> list[str]:
    _check_names(relpath, server_name)
    if not isinstance(server_params, dict):
        raise TypeError("server_params must be a dict")
    check_server_params(server_params)
    # As given, not normalized: the server normalizes them itself (and answers 400 if its rules differ).
    return await _generate(
        link, server_name, {"relpath": relpath, "server_name": server_name, "server_params": server_params}
    )


async def generate_mcp_sources_from_tools(
    link: Link, relpath: str, server_name: str, tools: list[dict[str, Any]]
) -> list[str]:
    """Generate `/app/<relpath>/<server_name>/` from a tool list (MCP's `Tool` fields: name, description,
    inputSchema, outputSchema): for a server the sandbox does not connect to (a ToolHost's)."""
    _check_names(relpath, server_name)
    return await _generate(link, server_name, {"relpath": relpath, "server_name": server_name, "tools": tools})


async def _generate(link: Link, server_name: str, body: dict[str, Any]) -> list[str]:
    action = f"generating MCP sources for server {server_name!r}"
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
