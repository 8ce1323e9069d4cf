"""An MCP stdio server for the host-side tool tests (ToolHost): it runs on the host, never in a sandbox.

`python host_server.py` (only the `mcp` SDK). Its tools report what a sandbox must never see directly
(the marker passed in its environment: only a hash of it), its own pid (so that a test can kill it),
and can sleep or exit in the middle of a call.
"""

from __future__ import annotations

import asyncio
import hashlib
import os

from mcp.server.mcpserver import MCPServer

MARKER_ENV = "IPYBOX_HOST_MARKER"

server = MCPServer("ipybox-host-test")


@server.tool()
def marker_sha256() -> str:
    """The SHA-256 of the marker in this server's environment ('' when there is none)."""
    marker = os.environ.get(MARKER_ENV, "")
    return hashlib.sha256(marker.encode()).hexdigest() if marker else ""


@server.tool()
def pid() -> int:
    """This server's process id."""
    return os.getpid()


@server.tool()
async def sleep(seconds: float) -> str:
    """Answer after `seconds`."""
    await asyncio.sleep(seconds)
    return f"slept {seconds}"


@server.tool()
def exit_now() -> str:
    """Exit the server in the middle of the call."""
    os._exit(3)


@server.tool()
def add(a: int, b: int) -> int:
    """The sum (a structured result)."""
    return a + b


if __name__ == "__main__":
    server.run("stdio")
