"""MCP servers that run on the host, served over a websocket the host opens (issue 15): skeleton,
filled in by its owner. See /tmp/issue15/SPEC.md section 4.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web


class Failed(Exception):
    """A host-side call that got no result; `kind` as the tools socket answers it."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def serves(server: str) -> bool:
    """Whether a connected host offers `server` to this sandbox."""
    return False


async def call(server: str, tool: str, arguments: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """The result dict of one call to a host-side server; raises `Failed`."""
    raise Failed(f"no host serves MCP server {server!r}", "unknown_server")


def add_routes(app: web.Application) -> None:
    """`GET /tools/host`: the host's websocket."""
