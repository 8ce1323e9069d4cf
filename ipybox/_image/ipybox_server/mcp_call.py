"""MCP connections in ipybox's own interpreter (mcp 2.x), for the tool service (`tools`) and the generator.

`connect` opens an initialized `mcp.Client` for normalized server params (stdio, streamable HTTP or
SSE); `result_dict` is what the tool service answers for a `CallToolResult`:
`{"is_error": bool, "text": str, "structured": <JSON value or null>}`, `text` being the content's text
blocks joined by newlines and `structured` its structured content.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import IO, Any

# Relative, unlike the other modules here: the host's ToolHost imports this module too (as
# ipybox._image.ipybox_server.mcp_call), so that both ends connect and render results the same way.
from . import mcp_params

# The SDK gives a stdio server only HOME, LOGNAME, PATH, SHELL, TERM and USER: these are passed too, so
# that servers reach HTTPS hosts through the image's CA bundle and decode text as the image does.
PASSED_ENV = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "LANG")


def leaf_exception(exc: BaseException) -> BaseException:
    """The single exception inside (nested) exception groups, as raised by anyio task groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def stderr_tail(errlog: IO[bytes], limit: int = 2000) -> str:
    """The last `limit` characters a stdio server wrote to stderr."""
    try:
        errlog.seek(0)
        return errlog.read().decode("utf-8", "replace")[-limit:].strip()
    except (OSError, ValueError):
        return ""


def stdio_env(params: dict[str, Any], environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment given to a stdio server on top of the SDK's defaults: PASSED_ENV, then `env`."""
    environ = os.environ if environ is None else environ  # type: ignore[assignment]
    assert environ is not None
    inherited = {name: environ[name] for name in PASSED_ENV if name in environ}
    return {**inherited, **params.get("env", {})}


@asynccontextmanager
async def connect(
    server_params: dict[str, Any], errlog: IO[bytes] | None = None, read_timeout: float | None = None
) -> AsyncIterator[Any]:
    """An initialized `mcp.Client` for `server_params` (validated here, see `mcp_params`).

    `errlog` receives a stdio server's stderr.
    """
    from mcp import Client
    from mcp.client.sse import sse_client
    from mcp.client.stdio import StdioServerParameters, stdio_client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    params = mcp_params.normalize(server_params)
    async with AsyncExitStack() as stack:
        if errlog is None:
            errlog = stack.enter_context(tempfile.TemporaryFile())
        transport: Any
        if params["type"] == mcp_params.STDIO:
            stdio = StdioServerParameters(
                command=params["command"], args=params["args"], env=stdio_env(params), cwd=params.get("cwd")
            )
            transport = stdio_client(stdio, errlog=errlog)  # type: ignore[arg-type]
        elif params["type"] == mcp_params.SSE:
            transport = sse_client(params["url"], headers=params.get("headers"))
        else:
            http_client = await stack.enter_async_context(create_mcp_http_client(headers=params.get("headers")))
            transport = streamable_http_client(params["url"], http_client=http_client)
        client = await stack.enter_async_context(Client(transport, read_timeout_seconds=read_timeout))
        yield client


def content_text(result: Any) -> str:
    """The text of a tool result's content blocks, one block per line."""
    parts = []
    for block in result.content:
        if block.type == "text":
            parts.append(block.text)
        elif block.type == "resource" and getattr(block.resource, "text", None) is not None:
            parts.append(block.resource.text)
        else:
            parts.append(f"[{block.type} content not shown]")
    return "\n".join(parts)


def result_dict(result: Any) -> dict[str, Any]:
    """A `CallToolResult` as the helper sends it: `{"is_error", "text", "structured"}`."""
    return {
        "is_error": bool(result.is_error),
        "text": content_text(result),
        "structured": result.structured_content,
    }
