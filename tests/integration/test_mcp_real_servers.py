"""Generated MCP clients against real servers of both SDK generations, started the ways users start them.

- ipybox 0.6's own FastMCP test server, unchanged, as `python server.py` (the user environment's mcp 1.x);
- a server written for both generations, run by the user environment's `python` (mcp 1.x) and by
  `uvx --with mcp==2.3.0 python` (mcp 2.x, next to the user environment);
- `uvx mcp-server-time==2026.10.19` (PyPI) and `npx -y @modelcontextprotocol/server-everything@2026.8.31`
  (npm), fetched from the registries inside the container.

The uvx and npx servers keep one process for 20 calls (the tool service's session, `GET /tools/servers`).

Return values (docs/mcp-generation.md): text for tools without an output schema, the typed value for
tools with one (unwrapped for `-> str`/`-> int` tools), `ToolError` for an error result.
Needs the two-environment image (uv, uvx, npx, mcp 1.x in the user environment).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from ipybox import ExecutionClient, ExecutionContainer, ResourceClient

# ipybox 0.6's tests/mcp_server.py (its FastMCP stdio server), unchanged.
SERVER_06 = '''import asyncio
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from mcp.server.fastmcp import FastMCP

STDIO_SERVER_PATH = Path(__file__)


async def tool_1(s: str) -> str:
    """
    This is tool 1.

    Args:
        s: A string
    """
    return f"You passed to tool 1: {s}"


async def tool_2(s: str) -> str:
    """
    This is tool 2.
    """
    return f"You passed to tool 2: {s}"


def create_server(**kwargs) -> FastMCP:
    server = FastMCP("Test MCP Server", **kwargs)
    server.add_tool(tool_1, name="tool-1")
    server.add_tool(tool_2)
    return server


def main():
    create_server().run(transport="stdio")


if __name__ == "__main__":
    main()
'''

# One server for both SDK generations: FastMCP (mcp 1.x) was renamed MCPServer (mcp 2.x).
SERVER_BOTH = '''import sys

from pydantic import BaseModel

try:
    from mcp.server.mcpserver import MCPServer as Server
    from mcp.server.mcpserver.exceptions import ToolError
except ImportError:
    from mcp.server.fastmcp import FastMCP as Server
    from mcp.server.fastmcp.exceptions import ToolError

import mcp

server = Server("both")


class Forecast(BaseModel):
    city: str
    temperatures: list[float]


def echo(s: str) -> str:
    """Echo a string."""
    return f"echo: {s}"


def add(a: int, b: int) -> int:
    return a + b


def forecast(city: str) -> Forecast:
    return Forecast(city=city, temperatures=[1.5, 2.5])


def fail(reason: str) -> str:
    raise ToolError(f"failed on purpose: {reason}")


def plain(s: str) -> str:
    return f"plain: {s}"


def generation() -> str:
    import importlib.metadata

    return importlib.metadata.version("mcp")


for fn in (echo, add, forecast, fail, generation):
    server.add_tool(fn)
server.add_tool(plain, structured_output=False)

if __name__ == "__main__":
    server.run("stdio")
'''

RETURN_VALUES = """
from mcpreal.{name} import ToolError, add, echo, fail, forecast, generation, plain
print(repr(echo.echo(echo.Params(s='hi'))))
print(repr(add.add(add.Params(a=2, b=3))))
result = forecast.forecast(forecast.Params(city='Vienna'))
print(type(result).__name__, result.city, result.temperatures)
print(repr(plain.plain(plain.Params(s='hi'))))
try:
    fail.fail(fail.Params(reason='42'))
except ToolError as exc:
    print('ToolError', exc)
print(generation.generation(generation.Params()).split('.')[0])
"""


@pytest.fixture(scope="module")
async def resource(shared_container: ExecutionContainer) -> AsyncIterator[ResourceClient]:
    async with ExecutionClient(port=shared_container.executor_port) as client:
        await client.execute(
            f"open('/app/srv06.py', 'w').write({SERVER_06!r})\nopen('/app/srv_both.py', 'w').write({SERVER_BOTH!r})"
        )
    async with ResourceClient(port=shared_container.resource_port) as resource:
        yield resource


async def test_ipybox_06_fastmcp_server_runs_unchanged(resource: ResourceClient, client: ExecutionClient) -> None:
    params = {"command": "python", "args": ["/app/srv06.py"]}
    assert await resource.generate_mcp_sources("mcpreal", "srv06", params) == ["tool_1", "tool_2"]
    source = (await resource.get_mcp_sources("mcpreal", "srv06"))["tool_1"]
    assert "def tool_1(params: Params) -> str:" in source
    result = await client.execute(
        "from mcpreal.srv06 import tool_1, tool_2\n"
        "print(tool_1.tool_1(tool_1.Params(s='hi')))\n"
        "print(tool_2.tool_2(tool_2.Params(s='there')))"
    )
    assert (result.text or "").splitlines() == ["You passed to tool 1: hi", "You passed to tool 2: there"]


@pytest.mark.parametrize(
    ("name", "command", "generation"),
    [
        ("both1", ["python", "/app/srv_both.py"], "1"),
        ("both2", ["uvx", "--with", "mcp==2.3.0", "python", "/app/srv_both.py"], "2"),
    ],
)
async def test_return_values(
    resource: ResourceClient, client: ExecutionClient, name: str, command: list[str], generation: str
) -> None:
    params = {"command": command[0], "args": command[1:]}
    modules = await resource.generate_mcp_sources("mcpreal", name, params)
    assert modules == ["add", "echo", "fail", "forecast", "generation", "plain"]
    sources = await resource.get_mcp_sources("mcpreal", name)
    assert "def echo(params: Params) -> str:" in sources["echo"]
    assert "def add(params: Params) -> int:" in sources["add"]
    assert "def forecast(params: Params) -> Result:" in sources["forecast"]
    result = await client.execute(RETURN_VALUES.format(name=name), timeout=120)
    lines = (result.text or "").splitlines()
    assert lines[:4] == [
        "'echo: hi'",  # text, as ipybox 0.6 returned it (not '{"result": "echo: hi"}')
        "5",  # the typed value of a `-> int` tool
        "Result Vienna [1.5, 2.5]",  # structured content as the generated Result model
        "'plain: hi'",  # no output schema: the text
    ]
    assert lines[4].startswith("ToolError ") and lines[4].endswith("failed on purpose: 42")
    assert lines[5] == generation  # the server ran with this SDK generation


async def test_uvx_server(resource: ResourceClient, client: ExecutionClient) -> None:
    params = {"command": "uvx", "args": ["mcp-server-time==2026.10.19"]}
    modules = await resource.generate_mcp_sources("mcpreal", "timesrv", params)
    assert "get_current_time" in modules
    result = await client.execute(
        "from mcpreal.timesrv import ToolError, get_current_time as g\n"
        "now = g.get_current_time(g.Params(timezone='UTC'))\n"
        "print(type(now).__name__, now.timezone)\n"
        "try:\n"
        "    g.get_current_time(g.Params(timezone='Mars/Olympus'))\n"
        "except ToolError as exc:\n"
        "    print('ToolError', exc)",
        timeout=120,
    )
    lines = (result.text or "").splitlines()
    assert lines[0] == "Result UTC"  # the tool declares an output schema: a typed value
    assert lines[1].startswith("ToolError ") and "Mars/Olympus" in lines[1]
    await _same_process_for_20_calls(
        resource,
        client,
        "timesrv",
        "all(g.get_current_time(g.Params(timezone='UTC')).timezone == 'UTC' for _ in range(20))",
    )


async def test_npx_server(resource: ResourceClient, client: ExecutionClient) -> None:
    params = {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-everything@2026.8.31"]}
    modules = await resource.generate_mcp_sources("mcpreal", "everything", params)
    assert "echo" in modules and "get_sum" in modules
    result = await client.execute(
        "from mcpreal.everything import echo\nprint(echo.echo(echo.Params(message='hi')))", timeout=120
    )
    assert result.text == "Echo: hi"
    await _same_process_for_20_calls(
        resource, client, "everything", "all(echo.echo(echo.Params(message=str(i))) == f'Echo: {i}' for i in range(20))"
    )


async def _same_process_for_20_calls(resource: ResourceClient, client: ExecutionClient, name: str, calls: str) -> None:
    """The tool service keeps the server running between calls (issue 15): 20 more, one process."""

    async def described() -> dict[str, Any]:
        async with resource._connected().session.get("/tools/servers") as response:
            assert response.status == 200
            servers: dict[str, Any] = (await response.json())["servers"]
            return servers[name]

    before = await described()
    assert isinstance(before["pid"], int)
    result = await client.execute(f"print({calls})", timeout=120)
    assert result.text == "True"
    after = await described()
    assert (after["pid"], after["starts"], after["calls"]) == (before["pid"], before["starts"], before["calls"] + 20)
