"""MCP client generation requests of ResourceClient (placeholder until implemented)."""

from __future__ import annotations

from typing import Any

import aiohttp


async def generate_mcp_sources(
    session: aiohttp.ClientSession, relpath: str, server_name: str, server_params: dict[str, Any]
) -> list[str]:
    raise NotImplementedError


async def get_mcp_sources(session: aiohttp.ClientSession, relpath: str, server_name: str) -> dict[str, str]:
    raise NotImplementedError
