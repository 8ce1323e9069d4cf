"""Runtime of generated MCP tool modules: opens a connection to the MCP server and calls one tool.

Generated modules call `call_tool(SERVER_PARAMS, TOOL_NAME, params)` from kernel code. A kernel
already runs an asyncio loop in its main thread (`asyncio.run` there fails), so the call runs on a
private thread with its own loop while the caller waits; Ctrl-C (a kernel interrupt) cancels it
and the connection is closed before the interrupt is re-raised. Every call opens its own
connection (for stdio servers: starts the server process) and closes it afterwards.

The `mcp` SDK is imported on first use only: the resource server imports this module's neighbours
at start-up and must not pay for it.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from typing import IO, Any, TypeVar

from ipybox_server import mcp_params

T = TypeVar("T")

# How long an interrupted call may take to close its connection before the interrupt is re-raised.
CANCEL_GRACE = 10.0


class ToolError(Exception):
    """The MCP server reported an error for a tool call; the message is the server's."""


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


@asynccontextmanager
async def connect(
    server_params: dict[str, Any], errlog: IO[bytes] | None = None, read_timeout: float | None = None
) -> AsyncIterator[Any]:
    """An initialized `mcp.Client` for `server_params` (validated here, see `mcp_params`).

    `errlog` receives a stdio server's stderr (a kernel's sys.stderr has no file descriptor).
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
                command=params["command"], args=params["args"], env=params.get("env"), cwd=params.get("cwd")
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


def result_text(result: Any) -> str:
    """A tool result as text: structured content as JSON, else the content's text.

    Raises:
        ToolError: the result is an error result.
    """
    if result.is_error:
        raise ToolError(content_text(result) or "the MCP tool reported an error without a message")
    if result.structured_content is not None:
        return json.dumps(result.structured_content, ensure_ascii=False)
    return content_text(result)


async def call_tool_async(server_params: dict[str, Any], tool_name: str, arguments: dict[str, Any]) -> str:
    from mcp.shared.exceptions import MCPError

    with tempfile.TemporaryFile() as errlog:
        try:
            async with connect(server_params, errlog) as client:
                result = await client.call_tool(tool_name, arguments)
        except ToolError:
            raise
        except BaseException as exc:
            leaf = leaf_exception(exc)
            if isinstance(leaf, MCPError):
                raise ToolError(leaf.error.message) from leaf
            if leaf is not exc and isinstance(leaf, Exception):
                raise leaf from exc
            raise
    return result_text(result)


def run_sync(make_coroutine: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a private thread with its own event loop.

    Works where a loop already runs in the calling thread (a Jupyter kernel). An exception in the
    waiting thread (KeyboardInterrupt from a kernel interrupt) cancels the coroutine, gives it
    CANCEL_GRACE seconds to clean up, and propagates.
    """
    done = threading.Event()
    started = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> T:
        box["loop"] = asyncio.get_running_loop()
        box["task"] = asyncio.current_task()
        started.set()
        return await make_coroutine()

    def target() -> None:
        try:
            box["result"] = asyncio.run(main())
        except BaseException as exc:  # handed to the waiting thread
            box["error"] = exc
        finally:
            started.set()
            done.set()

    thread = threading.Thread(target=target, name="ipybox-mcp-call", daemon=True)
    thread.start()
    try:
        done.wait()
    except BaseException:
        started.wait(CANCEL_GRACE)
        if "task" in box and not done.is_set():
            box["loop"].call_soon_threadsafe(box["task"].cancel)
            done.wait(CANCEL_GRACE)
        raise
    if "error" in box:
        error: BaseException = box.pop("error")
        raise error
    result: T = box["result"]
    return result


def call_tool(server_params: dict[str, Any], tool_name: str, params: Any) -> str:
    """Call MCP tool `tool_name` with a pydantic `params` model; returns the result as text.

    Raises:
        ToolError: the server answered with an error (message from the server).
    """
    arguments = params.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return run_sync(lambda: call_tool_async(server_params, tool_name, arguments))
