"""MCP connections in ipybox's own interpreter (mcp 2.x): the tool-call helper and the generator's client.

`python -I -m ipybox_server.mcp_call` is the helper that kernel code talks to (see `mcp_runtime`): it
reads one JSON request per line from stdin, `{"server_params": {...}, "tool_name": str, "arguments":
{...}}`, and writes one JSON answer per line to stdout:

- `{"result": {"is_error": bool, "text": str, "structured": <JSON value or null>}}`: the server answered;
  `text` is the content's text blocks joined by newlines, `structured` its structured content.
- `{"error": str, "kind": "tool"}`: the server answered with an MCP protocol error (unknown tool, bad
  arguments, ...).
- `{"error": str, "kind": "call"}`: the server could not be started or reached, or failed.

Every call opens its own connection (for stdio servers: starts the server) and closes it afterwards.
The helper lives as long as its standard input stays open; the `mcp` SDK is imported once per helper.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import IO, Any

from ipybox_server import mcp_params

# The SDK gives a stdio server only HOME, LOGNAME, PATH, SHELL, TERM and USER: these are passed too, so
# that servers reach HTTPS hosts through the image's CA bundle and decode text as the image does.
PASSED_ENV = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "LANG")


class CallFailed(Exception):
    """A tool call that did not get a result; `kind` is "tool" (MCP protocol error) or "call"."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


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


async def call_tool_async(server_params: dict[str, Any], tool_name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Call one tool on a fresh connection; the result as `result_dict` gives it.

    Raises:
        CallFailed: no result (kind "tool": the server's MCP error; kind "call": anything else, with the
            tail of a stdio server's stderr).
    """
    from mcp.shared.exceptions import MCPError
    from mcp.types import CONNECTION_CLOSED  # the server exited: not the tool's answer

    with tempfile.TemporaryFile() as errlog:
        try:
            async with connect(server_params, errlog) as client:
                result = await client.call_tool(tool_name, arguments)
        except Exception as exc:
            leaf = leaf_exception(exc)
            if isinstance(leaf, MCPError) and leaf.error.code != CONNECTION_CLOSED:
                raise CallFailed(leaf.error.message, "tool") from leaf
            message = f"{type(leaf).__name__}: {leaf}" if str(leaf) else type(leaf).__name__
            tail = stderr_tail(errlog)
            raise CallFailed(f"{message}; server stderr: {tail}" if tail else message, "call") from exc
    return result_dict(result)


def answer(request: Any) -> dict[str, Any]:
    """The helper's answer to one request (never raises for a failed call)."""
    try:
        if not isinstance(request, dict) or not isinstance(request.get("tool_name"), str):
            raise CallFailed("malformed request to the MCP call helper", "call")
        arguments = request.get("arguments") or {}
        return {"result": asyncio.run(call_tool_async(request["server_params"], request["tool_name"], arguments))}
    except CallFailed as exc:
        return {"error": str(exc), "kind": exc.kind}
    except mcp_params.ParamsError as exc:
        return {"error": str(exc), "kind": "call"}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "kind": "call"}


def main() -> None:
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # stray prints of libraries must not corrupt the answers
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        out.write(json.dumps(answer(request)) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
