"""Host-side MCP servers for a sandbox: `ToolHost` (issue 15).

The MCP servers run on the host, with their credentials (stdio `env`, HTTP `headers`), and sandboxed code
calls them through the same generated modules as in-sandbox servers
(`from mcptools.<server>.<tool> import Params, <tool>`). Nothing of a server's parameters is sent to the
sandbox: only its name, when offered, and its tool list (names, descriptions, schemas), for generation.

How a call travels: the ToolHost opens a websocket to the sandbox's resource server (`GET /tools/host`,
over the same verified routes and with the same secret as `ResourceClient`: no listening port on the
host), offers its server names, and answers the calls the sandbox pushes down it
(`ipybox_server.tool_hosts` describes the frames). Calls are answered concurrently, each on the server's
one MCP session, which is started when the ToolHost starts and again after it died.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import keyword
import logging
import tempfile
from collections.abc import Mapping
from types import TracebackType
from typing import IO, Any

import aiohttp

from ipybox import _tokens
from ipybox._errors import (
    AuthenticationError,
    InvalidStateError,
    IpyboxError,
    ServerConnectionError,
    ToolHostError,
)
from ipybox._image.ipybox_server import mcp_call
from ipybox.resource import _mcp
from ipybox.resource._mcp import check_server_params
from ipybox.resource.client import ResourceClient

logger = logging.getLogger(__name__)

START_TIMEOUT = 120.0
"""Seconds a server has to start and answer the MCP handshake (npx and uvx may download it first)."""
LIST_TIMEOUT = 120.0
MAX_PAGES = 100
MAX_CONCURRENT_CALLS = 32
"""Calls a ToolHost runs at once; further calls from the sandbox wait for a free slot."""
MAX_MESSAGE = 64 * 1024 * 1024
"""The largest frame either side takes (`ipybox_server.tool_hosts.MAX_MESSAGE`)."""
HEARTBEAT = 20.0
OFFER_TIMEOUT = 30.0
RECONNECT_TRIES = 5
RECONNECT_INTERVAL = 1.0
STOP_TIMEOUT = 10.0


class _Failed(Exception):
    """A call without a result; `kind` as the sandbox's tool service names it."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def _describe(exc: BaseException) -> str:
    leaf = mcp_call.leaf_exception(exc)
    return f"{type(leaf).__name__}: {leaf}" if str(leaf) else type(leaf).__name__


class _HostServer:
    """One MCP server on the host with one session at a time, owned by one task (anyio's cancel scopes
    must be left by the task that entered them). A session that died is started again by the next call;
    the call that saw it die fails with kind "crash"."""

    def __init__(self, name: str, params: dict[str, Any]) -> None:
        self.name = name
        self.params = params
        self.starts = 0
        self.calls = 0
        self.running = 0
        self._client: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()
        self._errlog: IO[bytes] | None = None

    def _alive(self) -> bool:
        return self._client is not None and self._task is not None and not self._task.done()

    async def _own(self, ready: asyncio.Future[Any], stop: asyncio.Event, errlog: IO[bytes]) -> None:
        try:
            async with mcp_call.connect(self.params, errlog) as client:
                if not ready.done():
                    ready.set_result(client)
                await stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            elif not isinstance(exc, asyncio.CancelledError):
                logger.info("host-side MCP server %r ended: %s", self.name, _describe(exc))
        finally:
            if not ready.done():
                ready.cancel()

    async def client(self) -> Any:
        """The live session's client, started first when there is none."""
        async with self._lock:
            if self._alive():
                return self._client
            await self._end_session()
            self._stop = asyncio.Event()
            if self._errlog is not None:
                self._errlog.close()
            self._errlog = tempfile.TemporaryFile()  # a fresh stderr log per start: its tail names this start's failure
            ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._task = asyncio.create_task(
                self._own(ready, self._stop, self._errlog), name=f"ipybox-tool-host-{self.name}"
            )
            self.starts += 1
            try:
                self._client = await asyncio.wait_for(asyncio.shield(ready), START_TIMEOUT)
            except BaseException as exc:
                await self._end_session()
                if isinstance(exc, TimeoutError):
                    cause = f"no MCP handshake within {START_TIMEOUT:g} s"
                elif isinstance(exc, Exception):
                    cause = _describe(exc)
                else:
                    raise
                raise _Failed(
                    f"host-side MCP server {self.name!r} could not start: {cause}{self._tail()}", "unavailable"
                ) from exc
            return self._client

    def _tail(self, limit: int = 2000) -> str:
        if self._errlog is None:
            return ""
        try:
            self._errlog.seek(0)
            tail = self._errlog.read().decode("utf-8", "replace")[-limit:].strip()
        except (OSError, ValueError):
            return ""
        return f"; server stderr: {tail}" if tail else ""

    async def _end_session(self) -> None:
        """Stop the session's task (a stdio server's process ends with it)."""
        started, self._client = self._client is not None, None
        task, self._task = self._task, None
        if task is None or task.done():
            return
        self._stop.set()
        try:
            # A session that never came up has nothing to close in order: cancel its start at once.
            await asyncio.wait_for(asyncio.shield(task), STOP_TIMEOUT if started else 0)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        except BaseException:
            if not task.done():
                task.cancel()
            raise

    async def call(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """`{"is_error", "text", "structured"}` of one call; raises `_Failed`."""
        from mcp.shared.exceptions import MCPError
        from mcp.types import CONNECTION_CLOSED
        from pydantic import ValidationError

        client = await self.client()
        self.calls += 1
        self.running += 1
        try:
            result = await client.call_tool(tool, arguments)
        except MCPError as exc:
            if exc.error.code != CONNECTION_CLOSED:
                raise _Failed(exc.error.message, "tool") from exc
            await self._died()
            raise _Failed(
                f"host-side MCP server {self.name!r} exited during the call to {tool!r}{self._tail()}", "crash"
            ) from exc
        except ValidationError as exc:
            raise _Failed(
                f"host-side MCP server {self.name!r} answered {tool!r} with a malformed result: {exc}", "tool"
            ) from exc
        except Exception as exc:
            await self._died()
            cause = f"{_describe(exc)}{self._tail()}"
            raise _Failed(
                f"host-side MCP server {self.name!r} failed during the call to {tool!r}: {cause}", "crash"
            ) from exc
        finally:
            self.running -= 1
        return {
            "is_error": bool(result.is_error),
            "text": mcp_call.content_text(result),
            "structured": result.structured_content,
        }

    async def _died(self) -> None:
        async with self._lock:
            await self._end_session()

    async def list_tools(self) -> list[dict[str, Any]]:
        """The server's tools as the sandbox's generator takes them (MCP's names: inputSchema, outputSchema)."""
        client = await self.client()
        tools: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(LIST_TIMEOUT):
                cursor = None
                for _ in range(MAX_PAGES):
                    page = await client.list_tools(cursor=cursor)
                    for tool in page.tools:
                        entry = {"name": tool.name, "description": tool.description, "inputSchema": tool.input_schema}
                        if tool.output_schema is not None:
                            entry["outputSchema"] = tool.output_schema
                        tools.append(entry)
                    cursor = page.next_cursor
                    if not cursor:
                        break
        except TimeoutError as exc:
            raise _Failed(
                f"host-side MCP server {self.name!r} did not list its tools within {LIST_TIMEOUT:g} s", "unavailable"
            ) from exc
        except Exception as exc:
            raise _Failed(
                f"host-side MCP server {self.name!r} failed to list its tools: {_describe(exc)}{self._tail()}",
                "unavailable",
            ) from exc
        return tools

    async def close(self) -> None:
        async with self._lock:
            await self._end_session()
        if self._errlog is not None:
            self._errlog.close()
            self._errlog = None


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class ToolHost:
    """MCP servers on the host, offered to one sandbox: its code calls them, their secrets stay here.

    Each server is given as MCP server parameters: a stdio command
    (`{"command": ..., "args": [...], "env": {...}, "cwd": ...}`, started on the host) or a URL
    (`{"url": ..., "headers": {...}}`, streamable HTTP, or `"type": "sse"`), reached from the host. The
    sandbox learns only the servers' names and, from `generate_mcp_sources`, their tool lists.

    Example:
        ```python
        servers = {"github": {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-github"],
                              "env": {"GITHUB_PERSONAL_ACCESS_TOKEN": token}}}
        async with ExecutionContainer() as container:
            async with ToolHost(container.resource_port, servers) as tools:
                await tools.generate_mcp_sources()  # /app/mcptools/github/
                async with ExecutionClient(container.executor_port) as client:
                    await client.execute("from mcptools.github.search_repositories import Params, search_repositories")
        ```

    Calls work while the ToolHost runs; once it is closed (or its process ends) a call from the sandbox
    raises the runtime's `ToolServerError` ("unavailable") at once, a call in flight included. A
    connection that breaks while it runs is re-opened (a few tries, a second apart).

    Args:
        port: Host port of the container's resource port (`ExecutionContainer.resource_port`).
        servers: Server name (a Python identifier: it names the generated package) -> parameters.
        host: Host name or address of the resource port.
        token: The container's secret; found automatically for containers this user started here.

    Raises:
        InvalidServerParamsError: parameters that cannot work (raised here, before anything starts).
        ValueError: a server name that is not a Python identifier, or no servers.
    """

    def __init__(
        self, port: int, servers: Mapping[str, dict[str, Any]], host: str = "localhost", *, token: str | None = None
    ) -> None:
        if not servers:
            raise ValueError("ToolHost needs at least one server")
        self._servers: dict[str, _HostServer] = {}
        for name, params in servers.items():
            if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
                raise ValueError(
                    f"server name {name!r} must be a Python identifier (it names a package in the sandbox)"
                )
            self._servers[name] = _HostServer(name, check_server_params(params, f"host-side MCP server {name!r}"))
        self.port = port
        self.host = host
        self._token = token
        self._state = _State.NEW
        self._resources: ResourceClient | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._calls: dict[int, asyncio.Task[None]] = {}
        self._limit = asyncio.Semaphore(MAX_CONCURRENT_CALLS)
        self._send_lock = asyncio.Lock()
        self._sandbox: tuple[str, int] | None = None  # (container id, init pid) when this host can check it

    @property
    def servers(self) -> list[str]:
        """The names offered to the sandbox."""
        return list(self._servers)

    @property
    def connected(self) -> bool:
        """Whether the sandbox can reach the servers now."""
        return self._ws is not None and not self._ws.closed

    def stats(self) -> dict[str, dict[str, int]]:
        """Per server: `starts` (sessions started, restarts included), `calls` (calls answered or tried) and
        `running` (calls in progress; a call the sandbox abandoned is cancelled here)."""
        return {name: {"starts": s.starts, "calls": s.calls, "running": s.running} for name, s in self._servers.items()}

    async def __aenter__(self) -> ToolHost:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Start every server on the host, connect to the sandbox and offer them.

        Raises:
            ToolHostError: a server could not start (the message names it, with its stderr's tail), or the
                sandbox refused the offer (e.g. a name already registered in the sandbox).
            AuthenticationError: the sandbox refused the secret.
            ServerConnectionError: the sandbox's resource server could not be reached.
            InvalidStateError: started before, or closed.
        """
        if self._state is not _State.NEW:
            raise InvalidStateError(f"ToolHost is {self._state.value}: a ToolHost starts once")
        self._state = _State.RUNNING
        try:
            await self._start_servers()
            self._resources = ResourceClient(self.port, self.host, token=self._token)
            await self._resources.connect()
            self._sandbox = _tokens.recorded_container(self.host, self.port)
            self._ws = await self._open()
            self._reader = asyncio.create_task(self._read(), name="ipybox-tool-host-reader")
        except BaseException:
            await self.close()
            raise

    async def _start_servers(self) -> None:
        results = await asyncio.gather(*(s.client() for s in self._servers.values()), return_exceptions=True)
        failures = [str(r) for r in results if isinstance(r, BaseException)]
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
        if failures:
            raise ToolHostError("; ".join(failures))

    async def _open(self) -> aiohttp.ClientWebSocketResponse:
        assert self._resources is not None
        link = self._resources._connected()
        try:
            ws = await link.session.ws_connect(
                "/tools/host",
                heartbeat=HEARTBEAT,
                max_msg_size=MAX_MESSAGE,
                timeout=aiohttp.ClientWSTimeout(ws_close=5),
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):
                raise AuthenticationError(
                    f"the sandbox at {link.where} refused the ToolHost's connection (HTTP {exc.status}): missing or "
                    "wrong secret; pass token=... for containers not started by this user",
                    status=exc.status,
                ) from exc
            if exc.status == 404:
                raise ToolHostError(
                    f"the sandbox at {link.where} has no host-side tool service (HTTP 404): its image predates it; "
                    "rebuild the image with `ipybox build`",
                    status=404,
                ) from exc
            raise ServerConnectionError(f"ToolHost: the websocket to {link.where} failed: {exc}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise ServerConnectionError(f"ToolHost: the sandbox at {link.where} does not answer: {exc}") from exc
        try:
            await ws.send_str(json.dumps({"type": "offer", "servers": self.servers}))
            reply = await ws.receive(timeout=OFFER_TIMEOUT)
            answer = json.loads(reply.data) if reply.type == aiohttp.WSMsgType.TEXT else {}
            if answer.get("type") != "offered":
                error = answer.get("error") or f"the connection ended ({reply.type.name})"
                raise ToolHostError(f"the sandbox refused the offer of {', '.join(self.servers)}: {error}")
        except BaseException as exc:
            await ws.close()
            if isinstance(exc, TimeoutError):
                raise ServerConnectionError(
                    f"ToolHost: the sandbox did not answer the offer within {OFFER_TIMEOUT:g} s"
                ) from exc
            if isinstance(exc, ValueError):
                raise ToolHostError("the sandbox answered the offer with something that is not JSON") from exc
            raise
        return ws

    async def _read(self) -> None:
        """Answer calls until the ToolHost closes; re-open a connection that broke."""
        while True:
            ws = self._ws
            assert ws is not None
            calls: dict[int, asyncio.Task[None]] = {}
            self._calls = calls
            try:
                async for message in ws:
                    if message.type == aiohttp.WSMsgType.TEXT:
                        self._dispatch(ws, calls, message.data)
            finally:
                for task in calls.values():  # their answers cannot arrive: the sandbox failed them already
                    task.cancel()
            if self._state is not _State.RUNNING:
                return
            reason = f"{ws.exception()}" if ws.exception() is not None else f"close code {ws.close_code}"
            logger.warning("ToolHost: the connection to the sandbox ended (%s); reconnecting", reason)
            if not await self._reconnect():
                logger.error(
                    "ToolHost: the sandbox on port %s cannot be reached again; its calls to %s fail until a new "
                    "ToolHost starts",
                    self.port,
                    ", ".join(self.servers),
                )
                return

    def _sandbox_gone(self) -> bool:
        """Whether the sandbox's container has ended, as far as one procfs read tells (a local engine's)."""
        return self._sandbox is not None and _tokens.container_ended(*self._sandbox)

    async def _reconnect(self) -> bool:
        for _ in range(RECONNECT_TRIES):
            await asyncio.sleep(RECONNECT_INTERVAL)
            # After the pause: a container being killed loses its server a moment before its init.
            if self._sandbox_gone():  # nothing will answer again: no more tries, no logs of them
                logger.info("ToolHost: the sandbox's container %s has ended", (self._sandbox or ("",))[0][:12])
                return False
            try:
                self._ws = await self._open()
                return True
            except IpyboxError as exc:  # refused, unreachable, or no answer to the offer: try again
                logger.info("ToolHost: reconnecting failed: %s", exc)
        return False

    def _dispatch(self, ws: aiohttp.ClientWebSocketResponse, calls: dict[int, asyncio.Task[None]], data: str) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            return
        if not isinstance(message, dict) or not isinstance(message.get("id"), int):
            return
        call_id: int = message["id"]
        if message.get("type") == "call":
            task = asyncio.create_task(self._answer(ws, call_id, message), name=f"ipybox-tool-host-call-{call_id}")
            calls[call_id] = task
            task.add_done_callback(lambda _: calls.pop(call_id, None))
        elif message.get("type") == "cancel" and (running := calls.get(call_id)) is not None:
            running.cancel()

    async def _answer(self, ws: aiohttp.ClientWebSocketResponse, call_id: int, message: dict[str, Any]) -> None:
        server, tool, arguments = message.get("server"), message.get("tool"), message.get("arguments")
        reply: dict[str, Any] = {"type": "result", "id": call_id}
        try:
            host_server = self._servers.get(server) if isinstance(server, str) else None
            if host_server is None:
                raise _Failed(f"this ToolHost serves no MCP server {server!r}", "unknown_server")
            if not isinstance(tool, str) or not isinstance(arguments, dict):
                raise _Failed(f"a malformed call to {server!r}: tool must be a string, arguments an object", "tool")
            async with self._limit:
                reply["result"] = await host_server.call(tool, arguments)
        except _Failed as exc:
            reply = {"type": "error", "id": call_id, "error": str(exc), "kind": exc.kind}
        text = json.dumps(reply)
        if len(text) > MAX_MESSAGE:
            text = json.dumps(
                {
                    "type": "error",
                    "id": call_id,
                    "error": f"the result of {server}.{tool} is {len(text):,} bytes as JSON: more than the "
                    f"{MAX_MESSAGE:,} a host-side call may return",
                    "kind": "tool",
                }
            )
        try:
            async with self._send_lock:
                await ws.send_str(text)
        except (ConnectionError, RuntimeError) as exc:  # the connection closed meanwhile: the sandbox failed the call
            logger.info("ToolHost: the answer to call %s was not delivered: %s", call_id, exc)

    async def generate_mcp_sources(self, relpath: str = "mcptools") -> dict[str, list[str]]:
        """Generate `/app/<relpath>/<server>/` in the sandbox for every server, from its tool list.

        The tools are listed here, on the host; the sandbox gets the list only (names, descriptions,
        schemas), never the parameters. Generated modules call back through this ToolHost.

        Returns:
            Server name -> the names of its generated tool modules.

        Raises:
            ToolHostError: a server could not list its tools.
            RemotePathError: the sandbox refused `relpath`.
            InvalidStateError: the ToolHost is not running.
        """
        if self._state is not _State.RUNNING or self._resources is None:
            raise InvalidStateError(f"ToolHost is {self._state.value}: generate_mcp_sources needs a running one")
        link = self._resources._connected()
        modules: dict[str, list[str]] = {}
        for name, server in self._servers.items():
            try:
                tools = await server.list_tools()
            except _Failed as exc:
                raise ToolHostError(str(exc)) from exc
            modules[name] = await _mcp.generate_mcp_sources_from_tools(link, relpath, name, tools)
        return modules

    async def close(self) -> None:
        """Withdraw the offer and stop every server. Idempotent; calls in flight fail in the sandbox."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        reader, self._reader = self._reader, None
        ws, self._ws = self._ws, None
        try:
            if ws is not None:
                await ws.close()
            if reader is not None:
                reader.cancel()
                # gather: the reader's end (cancelled, or a failure it logged) is not ours to raise; our own
                # cancellation still is.
                await asyncio.gather(reader, return_exceptions=True)
        finally:
            try:
                if self._resources is not None:
                    await self._resources.disconnect()
            finally:
                await asyncio.gather(*(s.close() for s in self._servers.values()), return_exceptions=True)
