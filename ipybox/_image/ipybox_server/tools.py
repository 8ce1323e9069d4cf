"""The tool service: MCP sessions held by the server process, called by kernels over a unix socket.

Kernel code calls MCP tools through generated modules and `mcp_runtime.call_tool`, which sends each
call to `TOOLS_SOCKET` (`/run/ipybox/tools.sock`). This process keeps one MCP session per registered
server (stdio, streamable HTTP or SSE, `mcp_call.connect`), reused by every call of every kernel and
thread, and restarted after it dies. Server parameters, their `env` and `headers` included, live in
this process's memory only: nothing is written to a file a cell could read.

Resource API (token and origin rules as every resource route; see openapi.py):

- `PUT /tools/servers/{name}` with server params (as `mcp_params.normalize` accepts them): registers
  (or replaces, closing the old session) an in-sandbox server. `POST /mcp/sources` registers too.
- `GET /tools/servers`: `{"servers": {name: {"where", "pid", "starts", "calls"}}}` for diagnostics.
- `DELETE /tools/servers/{name}`: unregisters and closes the session.

The tools socket (0600, the sandbox user's, no token: only this sandbox's processes reach it):

- `POST /call` `{"server", "tool", "arguments", "msg_id", "timeout"}` -> always 200:
  `{"result": {"is_error", "text", "structured"}}` or `{"error", "kind", "server", "tool"}`, `kind` one of
  `CallFailed.KINDS`.
- `POST /shell` `{"kind", "command", "msg_id"}` -> `{"approved": true}` or `{"error", "kind"}`.

Both ask `approvals.check` first; calls to a name a host offers go to `tool_hosts.call`. A caller
that disconnects (an interrupted kernel closes its connection) cancels its request, approval wait
and call included (`handler_cancellation`).

The `mcp` SDK is imported on the first call, not at start-up: this process also serves the gateway.
"""

from __future__ import annotations

import asyncio
import enum
import json
import keyword
import logging
import os
from contextlib import AsyncExitStack
from typing import IO, Any

from aiohttp import web

from ipybox_server import approvals, mcp_params, tool_hosts
from ipybox_server.paths import bad_request, not_found

logger = logging.getLogger(__name__)

TOOLS_SOCKET = "/run/ipybox/tools.sock"
DEFAULT_CALL_TIMEOUT = 300.0
START_TIMEOUT = 120.0
"""Seconds a server may take to start and initialize (a first `uvx`/`npx` run downloads packages)."""
WATCH_INTERVAL = 0.5
"""How often a stdio server's process is checked: a server that dies between calls is started afresh
by the next call, and one that dies during a call fails that call at once (not at its timeout)."""
MAX_CALL_BYTES = 64 * 1024 * 1024
KEEPALIVE_TIMEOUT = 24 * 3600.0
"""Kernels keep one connection per thread open between calls; the runtime reconnects when it finds one closed."""


class CallFailed(Exception):
    """A call that got no result; `kind` says why (the runtime maps each kind to an exception type)."""

    KINDS = ("tool", "denied", "expired", "crash", "unavailable", "timeout", "unknown_server")

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"


class _Connection:
    """One started server: its `mcp.Client`, the task that owns it (anyio scopes must be entered and
    left by one task), and for stdio the server's process id."""

    def __init__(self) -> None:
        self.client: Any = None
        self.pid: int | None = None
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def alive(self) -> bool:
        return self.task is not None and not self.task.done() and not self.stop.is_set()


def _child_pid_with_stderr(errlog: IO[bytes]) -> int | None:
    """The pid of this process's child whose stderr is `errlog`: the stdio server the SDK just started.

    The SDK does not expose its process; each server gets its own stderr file, so the file's inode
    tells the servers apart.
    """
    target = os.fstat(errlog.fileno())
    me = str(os.getpid())
    try:
        entries = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return None
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = stat.read().rsplit(")", 1)[1].split()[1]
            if parent != me:
                continue
            found = os.stat(f"/proc/{entry}/fd/2")
        except (OSError, IndexError):
            continue
        if (found.st_dev, found.st_ino) == (target.st_dev, target.st_ino):
            return int(entry)
    return None


def _running(pid: int) -> bool:
    """Whether our child `pid` still runs (the loop's child watcher reaps it at exit)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and fields[1] == str(os.getpid())


class StderrTail:
    """A stdio server's stderr: a pipe whose last `LIMIT` bytes are kept in memory, for error messages.

    Not a file: a server that logs every call would fill /tmp (size-capped) with an unlinked file no one
    can see. The pipe is read on the loop as the server writes.
    """

    LIMIT = 4096

    def __init__(self) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        self._read_fd = read_fd
        self.file: IO[bytes] = os.fdopen(write_fd, "wb", buffering=0)  # given to the server as its stderr
        self._tail = bytearray()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(read_fd, self._drain)

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self._read_fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._loop.remove_reader(self._read_fd)
                return
            self._tail += chunk
            del self._tail[: -self.LIMIT]

    def text(self) -> str:
        if self._read_fd >= 0:
            self._drain()
        return self._tail.decode("utf-8", "replace").strip()

    def close(self) -> None:
        self.file.close()
        if self._read_fd >= 0:
            self._loop.remove_reader(self._read_fd)
            os.close(self._read_fd)
            self._read_fd = -1


class ToolServer:
    """An in-sandbox MCP server: its parameters (in memory only) and its one session.

    The session starts on the first call, serves every call after it concurrently, and is replaced
    when it dies: the calls in flight fail with kind "crash", the next call starts a new one.
    """

    def __init__(self, name: str, params: dict[str, Any]) -> None:
        self.name = name
        self.params = params
        self.starts = 0
        self.calls = 0
        self._connection: _Connection | None = None
        self._stderr: StderrTail | None = None
        self._closed = False

    @property
    def state(self) -> State:
        connection = self._connection
        if connection is None or not connection.alive:
            return State.STOPPED
        return State.READY if connection.ready.done() else State.STARTING

    @property
    def pid(self) -> int | None:
        return self._connection.pid if self.state is State.READY and self._connection else None

    def describe(self) -> dict[str, Any]:
        return {"where": "sandbox", "pid": self.pid, "starts": self.starts, "calls": self.calls}

    async def call(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """The result dict of one call (`mcp_call.result_dict`); raises `CallFailed`."""
        from mcp.shared.exceptions import MCPError
        from mcp.types import CONNECTION_CLOSED

        from ipybox_server.mcp_call import result_dict

        self.calls += 1
        connection = await self._connected()
        try:
            result = await connection.client.call_tool(tool, arguments)
        except MCPError as exc:
            if exc.error.code != CONNECTION_CLOSED:
                raise CallFailed(exc.error.message, "tool") from exc
            self._discard(connection)
            raise CallFailed(self._death_message(tool), "crash") from exc
        except (asyncio.CancelledError, CallFailed):
            raise
        except Exception as exc:  # the transport failed under the call: this session is no good any more
            self._discard(connection)
            raise CallFailed(f"{self._death_message(tool)} ({type(exc).__name__}: {exc})", "crash") from exc
        return result_dict(result)

    def _death_message(self, tool: str) -> str:
        tail = self._stderr_tail()
        message = (
            f"MCP server {self.name!r} stopped answering during the call of {tool!r} (it exited or its "
            "connection closed); the next call starts it again"
        )
        return f"{message}; server stderr: {tail}" if tail else message

    def _stderr_tail(self) -> str:
        return self._stderr.text() if self._stderr is not None else ""

    async def _connected(self) -> _Connection:
        connection = self._connection
        if connection is None or not connection.alive:
            if self._closed:
                raise CallFailed(f"MCP server {self.name!r} was unregistered", "unknown_server")
            connection = self._start()
        # Shielded: a caller that gives up (timeout, interrupt) must not cancel a start others wait for.
        await asyncio.shield(connection.ready)
        return connection

    def _start(self) -> _Connection:
        connection = _Connection()
        if self._stderr is not None:
            self._stderr.close()
        self._stderr = StderrTail()
        connection.task = asyncio.create_task(self._own(connection, self._stderr.file), name=f"mcp-server-{self.name}")
        self._connection = connection
        self.starts += 1
        return connection

    async def _own(self, connection: _Connection, errlog: IO[bytes]) -> None:
        """Owns one session from start to end: enters `connect`, waits until told to stop or until the
        stdio server's process has gone, then leaves it (the SDK then stops the server's process group)."""
        from ipybox_server.mcp_call import connect

        try:
            async with AsyncExitStack() as stack:
                try:
                    async with asyncio.timeout(START_TIMEOUT):
                        connection.client = await stack.enter_async_context(connect(self.params, errlog))
                except BaseException as exc:
                    connection.ready.set_exception(self._start_failure(exc))
                    connection.ready.exception()  # retrieved: no "never retrieved" warning when no caller waits
                    raise
                if self.params["type"] == mcp_params.STDIO:
                    connection.pid = _child_pid_with_stderr(errlog)
                connection.ready.set_result(None)
                await self._watch(connection)
        except Exception:
            # A start that failed (its callers have the reason), or a transport that broke under the
            # session (its calls failed with kind "crash").
            logger.debug("the session of MCP server %r ended", self.name, exc_info=True)
        finally:
            connection.stop.set()

    async def _watch(self, connection: _Connection) -> None:
        while not connection.stop.is_set():
            try:
                await asyncio.wait_for(connection.stop.wait(), WATCH_INTERVAL)
            except TimeoutError:
                if connection.pid is not None and not _running(connection.pid):
                    return

    def _start_failure(self, exc: BaseException) -> CallFailed:
        from ipybox_server.mcp_call import leaf_exception

        if isinstance(exc, TimeoutError):
            message = f"MCP server {self.name!r} did not start and initialize within {START_TIMEOUT:g} s"
        else:
            leaf = leaf_exception(exc)
            reason = f"{type(leaf).__name__}: {leaf}" if str(leaf) else type(leaf).__name__
            message = f"MCP server {self.name!r} could not be started or reached: {reason}"
        tail = self._stderr_tail()
        return CallFailed(f"{message}; server stderr: {tail}" if tail else message, "unavailable")

    def _discard(self, connection: _Connection) -> None:
        """Stop `connection` (only that one: a newer session another call started stays)."""
        connection.stop.set()
        if self._connection is connection:
            self._connection = None

    async def close(self) -> None:
        self._closed = True
        connection = self._connection
        if connection is not None:
            self._discard(connection)
            if connection.task is not None:
                await asyncio.gather(connection.task, return_exceptions=True)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


_servers: dict[str, ToolServer] = {}
_closing: set[asyncio.Task[None]] = set()  # replaced sessions being closed (a task needs a reference)


def _server_name(name: Any) -> str:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise bad_request(f"server name {name!r} must be a Python identifier (it names the generated package)")
    return name


def registered_in_sandbox(name: str) -> bool:
    """Whether `name` is an in-sandbox server here (`tool_hosts` refuses a host's offer of it)."""
    return name in _servers


def refuse_host_served(name: str) -> None:
    """Raise `web.HTTPConflict` when a connected host serves `name`: the sandbox cannot take it over."""
    host_side = tool_hosts.describe().get(name)
    if host_side is not None and host_side.get("connected"):
        raise web.HTTPConflict(
            text=json.dumps({"error": f"MCP server {name!r} is served by the host; the host must withdraw it first"}),
            content_type="application/json",
        )


def register(name: str, params: dict[str, Any]) -> None:
    """Serve in-sandbox server `name` with normalized `params` from now on.

    A registration with other params is replaced (its session closed); with the same params it stays.

    Raises:
        web.HTTPConflict: a connected host serves that name.
    """
    refuse_host_served(name)
    tool_hosts.forget(name)  # a host that offered it once and left
    old = _servers.get(name)
    if old is not None and old.params == params:
        return  # the same server (generated again): its session goes on
    _servers[name] = ToolServer(name, params)
    if old is not None:
        task = asyncio.ensure_future(old.close())
        _closing.add(task)
        task.add_done_callback(_closing.discard)


async def unregister(name: str) -> bool:
    server = _servers.pop(name, None)
    if server is None:
        return False
    await server.close()
    return True


# -- resource routes --------------------------------------------------------------------------------


async def put_server(request: web.Request) -> web.Response:
    name = _server_name(request.match_info["name"])
    try:
        body = await request.json()
    except ValueError:
        raise bad_request("the request body must be JSON server params") from None
    try:
        params = mcp_params.normalize(body)
    except mcp_params.ParamsError as exc:
        raise bad_request(str(exc)) from None
    register(name, params)
    return web.json_response({"server": name, "where": "sandbox"})


async def list_servers(request: web.Request) -> web.Response:
    servers: dict[str, Any] = {name: {"starts": 0, **info} for name, info in tool_hosts.describe().items()}
    servers.update((name, server.describe()) for name, server in _servers.items())
    return web.json_response({"servers": dict(sorted(servers.items()))})


async def delete_server(request: web.Request) -> web.Response:
    name = _server_name(request.match_info["name"])
    if not await unregister(name):
        raise not_found(f"no MCP server {name!r} is registered in this sandbox")
    return web.json_response({"server": name})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/tools/servers", list_servers)
    app.router.add_put("/tools/servers/{name}", put_server)
    app.router.add_delete("/tools/servers/{name}", delete_server)


# -- the tools socket -------------------------------------------------------------------------------


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise bad_request("the request body must be JSON") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _timeout(body: dict[str, Any]) -> float | None:
    if "timeout" not in body:
        return DEFAULT_CALL_TIMEOUT
    timeout = body["timeout"]
    if timeout is None:
        return None  # no limit
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise bad_request(f"timeout must be a positive number of seconds or null, not {timeout!r}")
    return float(timeout)


async def _dispatch(server: str, tool: str, arguments: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    registered = _servers.get(server)
    try:
        async with asyncio.timeout(timeout):
            if registered is not None:
                return await registered.call(tool, arguments)
            return await tool_hosts.call(server, tool, arguments, timeout)
    except TimeoutError:
        raise CallFailed(
            f"no answer within {timeout:g} s; the call was abandoned (set mcp_runtime.CALL_TIMEOUT in the kernel "
            "to allow more)",
            "timeout",
        ) from None
    except tool_hosts.Failed as exc:
        raise CallFailed(str(exc), exc.kind) from exc


async def call(request: web.Request) -> web.Response:
    body = await _body(request)
    server, tool, arguments = body.get("server"), body.get("tool"), body.get("arguments", {})
    msg_id = body.get("msg_id")
    if not isinstance(server, str) or not isinstance(tool, str):
        raise bad_request("server and tool must be strings")
    if not isinstance(arguments, dict):
        raise bad_request("arguments must be a JSON object")
    if msg_id is not None and not isinstance(msg_id, str):
        raise bad_request("msg_id must be a string or null")
    timeout = _timeout(body)
    try:
        if server not in _servers and not tool_hosts.serves(server):
            raise CallFailed(
                f"no MCP server {server!r} is registered in this sandbox; generate its package with "
                "ResourceClient.generate_mcp_sources (or register it with PUT /tools/servers/{name}); a sandbox "
                "restored from a snapshot gets its servers from restore(..., mcp_servers={name: params})",
                "unknown_server",
            )
        try:
            await approvals.check(request, msg_id=msg_id, kind="tool", server=server, tool=tool, arguments=arguments)
        except approvals.Refused as exc:
            raise CallFailed(str(exc), exc.kind) from exc
        result = await _dispatch(server, tool, arguments, timeout)
    except CallFailed as exc:
        return web.json_response({"error": str(exc), "kind": exc.kind, "server": server, "tool": tool})
    return web.json_response({"result": result})


async def shell(request: web.Request) -> web.Response:
    """Approval of a shell escape; the kernel runs the command itself. An application-level control,
    not a security boundary: sandboxed code can start processes without asking (the sandbox is the boundary)."""
    body = await _body(request)
    kind, command, msg_id = body.get("kind"), body.get("command"), body.get("msg_id")
    if not isinstance(kind, str) or not isinstance(command, str):
        raise bad_request("kind and command must be strings")
    if msg_id is not None and not isinstance(msg_id, str):
        raise bad_request("msg_id must be a string or null")
    try:
        await approvals.check(
            request, msg_id=msg_id, kind="shell", server="shell", tool=kind, arguments={"command": command}
        )
    except approvals.Refused as exc:
        return web.json_response({"error": str(exc), "kind": exc.kind})
    return web.json_response({"approved": True})


@web.middleware
async def _json_errors(request: web.Request, handler):  # type: ignore[no-untyped-def]
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        return web.json_response({"error": exc.text or exc.reason}, status=exc.status)


def create_socket_app() -> web.Application:
    app = web.Application(middlewares=[_json_errors], client_max_size=MAX_CALL_BYTES)
    app.router.add_post("/call", call)
    app.router.add_post("/shell", shell)
    app.on_shutdown.append(_close_all)
    return app


async def _close_all(app: web.Application) -> None:
    await asyncio.gather(*(unregister(name) for name in list(_servers)), return_exceptions=True)


async def start_socket(path: str = TOOLS_SOCKET) -> web.AppRunner:
    """Serve the tools socket at `path` (0600); returns its runner.

    handler_cancellation: when a caller disconnects (an interrupted kernel closes its connection), its
    request is cancelled, and with it a pending approval or call.
    """
    runner = web.AppRunner(
        create_socket_app(), access_log=None, handler_cancellation=True, keepalive_timeout=KEEPALIVE_TIMEOUT
    )
    await runner.setup()
    await web.UnixSite(runner, path).start()
    os.chmod(path, 0o600)
    return runner
