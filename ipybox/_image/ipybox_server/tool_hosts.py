"""MCP servers that run on the host, called through a websocket the host opens (issue 15).

The host's `ipybox.ToolHost` keeps the MCP sessions (and their credentials) on the host and connects to
`GET /tools/host` of the resource app (origin and token checks as every route; no new listening port).
Kernel calls to a name it offered are pushed down that websocket and answered on it. JSON text frames:

    host -> server  {"type": "offer", "servers": [name, ...]}          first frame, exactly once
    server -> host  {"type": "offered", "servers": [...]}              or {"type": "refused", "error"}
    server -> host  {"type": "call", "id", "server", "tool", "arguments"}
    server -> host  {"type": "cancel", "id"}                           the caller gave up (timeout, interrupt)
    host -> server  {"type": "result", "id", "result": {"is_error", "text", "structured"}}
    host -> server  {"type": "error", "id", "error", "kind"}

A sandbox calls only names offered to it, on its own server: the rule is the registry below, which only
a holder of the container's secret fills. A name offered again (the host reconnected, or a second
ToolHost) moves to the newest websocket; calls already sent on the old one finish there. When a websocket
closes its names leave the registry and its pending calls fail with kind "unavailable" at once; later
calls of those names fail the same way (`serves` still claims them), naming the cause, until a host
offers them again.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import keyword
import logging
from typing import Any

from aiohttp import WSMsgType, web

logger = logging.getLogger(__name__)

OFFER_TIMEOUT = 10.0
"""Seconds a new websocket has to send its offer."""
HEARTBEAT = 20.0
"""Seconds between pings: a host that stopped answering is dropped (and its calls failed) after one more."""
MAX_MESSAGE = 64 * 1024 * 1024
"""The largest frame either side takes: a tool result of this size still arrives whole."""
MAX_SERVERS = 100
ANSWER_KINDS = frozenset({"tool", "crash", "unavailable", "timeout", "unknown_server"})
"""Error kinds a host may answer with; anything else is reported as "unavailable"."""


class Failed(Exception):
    """A host-side call that got no result; `kind` as the tools socket answers it."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class HostConnection:
    """One host's websocket: the names it serves and the calls waiting for its answers."""

    def __init__(self, ws: web.WebSocketResponse, peer: str) -> None:
        self.ws = ws
        self.peer = peer
        self.pending: dict[int, tuple[str, asyncio.Future[dict[str, Any]]]] = {}
        self._ids = itertools.count(1)
        self._send_lock = asyncio.Lock()
        self.gone: str | None = None  # why the connection ended, once it has

    async def send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.ws.send_str(json.dumps(message))

    async def call(self, server: str, tool: str, arguments: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        if self.gone is not None:
            raise Failed(_unavailable(server, self.gone), "unavailable")
        call_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[call_id] = (server, future)
        answered = False
        try:
            try:
                await self.send({"type": "call", "id": call_id, "server": server, "tool": tool, "arguments": arguments})
            except (ConnectionError, RuntimeError) as exc:  # closing or closed under us
                raise Failed(_unavailable(server, f"the websocket broke ({exc})"), "unavailable") from exc
            try:
                async with asyncio.timeout(timeout):
                    answer = await future
            except TimeoutError:
                raise Failed(
                    f"host-side MCP server {server!r} gave no answer to {tool!r} within {timeout:g} s; the call "
                    "was cancelled on the host (a longer limit: set mcp_runtime.CALL_TIMEOUT in the cell)",
                    "timeout",
                ) from None
            answered = True
        finally:
            self.pending.pop(call_id, None)
            if not answered and self.gone is None:
                await self._cancel(call_id)
        return _result(server, tool, answer)

    async def _cancel(self, call_id: int) -> None:
        # Shielded: the caller may be cancelled itself (an interrupted cell), and the host should stop
        # working on a call nobody waits for.
        try:
            await asyncio.shield(self.send({"type": "cancel", "id": call_id}))
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            pass

    def answer(self, message: dict[str, Any]) -> None:
        call_id = message.get("id")
        waiting = self.pending.get(call_id) if isinstance(call_id, int) else None
        if waiting is not None and not waiting[1].done():
            waiting[1].set_result(message)

    def close(self, reason: str) -> None:
        """Fail every pending call at once: nobody will answer them."""
        self.gone = reason
        for server, future in self.pending.values():
            if not future.done():
                future.set_exception(Failed(_unavailable(server, reason), "unavailable"))


def _unavailable(server: str, reason: str) -> str:
    return (
        f"host-side MCP server {server!r} is unavailable: {reason}; the application's ToolHost for this "
        "sandbox must be running (async with ToolHost(...)) for its tools to work"
    )


def _result(server: str, tool: str, answer: dict[str, Any]) -> dict[str, Any]:
    if answer.get("type") == "result":
        result = answer.get("result")
        if (
            isinstance(result, dict)
            and isinstance(result.get("is_error"), bool)
            and isinstance(result.get("text"), str)
        ):
            return {"is_error": result["is_error"], "text": result["text"], "structured": result.get("structured")}
        raise Failed(f"the host sent a malformed result for {server}.{tool}", "unavailable")
    kind = answer.get("kind")
    raise Failed(str(answer.get("error") or "the host gave no reason"), kind if kind in ANSWER_KINDS else "unavailable")


# -- registry ---------------------------------------------------------------------------------------

_served: dict[str, HostConnection] = {}
"""Name -> the websocket that serves it now."""
_departed: dict[str, str] = {}
"""Name -> why its host is gone: calls fail "unavailable" (not "unknown_server") until it is offered again."""
_calls: dict[str, int] = {}


def serves(server: str) -> bool:
    """Whether `server` is a host-side name here: offered by a connected host, or by one that left."""
    return server in _served or server in _departed


def forget(server: str) -> None:
    """Drop what is known of a departed host-side `server` (the name was registered in the sandbox)."""
    _departed.pop(server, None)


def describe() -> dict[str, dict[str, Any]]:
    """Diagnostics per host-side name, in the shape of `GET /tools/servers`."""
    names = sorted({*_served, *_departed})
    return {
        name: {"where": "host", "pid": None, "connected": name in _served, "calls": _calls.get(name, 0)}
        for name in names
    }


async def call(server: str, tool: str, arguments: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """The result dict of one call to a host-side server; raises `Failed`."""
    connection = _served.get(server)
    if connection is None:
        if server in _departed:
            raise Failed(_unavailable(server, _departed[server]), "unavailable")
        raise Failed(f"no host serves MCP server {server!r} to this sandbox", "unknown_server")
    _calls[server] = _calls.get(server, 0) + 1
    return await connection.call(server, tool, arguments, timeout)


def _check_offer(message: Any) -> list[str]:
    if not isinstance(message, dict) or message.get("type") != "offer":
        raise ValueError('the first message must be {"type": "offer", "servers": [...]}')
    names = message.get("servers")
    if not isinstance(names, list) or not names or len(names) > MAX_SERVERS:
        raise ValueError(f"'servers' must be a list of 1 to {MAX_SERVERS} names")
    for name in names:
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"server name {name!r} must be a Python identifier (it names a package)")
    if len(set(names)) != len(names):
        raise ValueError("server names must be unique")
    taken = sorted(name for name in names if _in_sandbox(name))
    if taken:
        raise ValueError(
            f"MCP server(s) {', '.join(taken)} are registered in the sandbox already: offer other names, or "
            "delete them first (DELETE /tools/servers/{name})"
        )
    return list(names)


def _in_sandbox(name: str) -> bool:
    # The in-sandbox registry is the tool service's (tools.py imports this module, hence the late import).
    from ipybox_server import tools

    return tools.registered_in_sandbox(name)


async def _first_message(ws: web.WebSocketResponse) -> Any:
    try:
        message = await ws.receive(timeout=OFFER_TIMEOUT)
    except TimeoutError:
        raise ValueError(f"no offer within {OFFER_TIMEOUT:g} s") from None
    if message.type != WSMsgType.TEXT:
        raise ValueError("the first message must be a JSON text frame")
    try:
        return json.loads(message.data)
    except ValueError:
        raise ValueError("the first message is not JSON") from None


async def host_websocket(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=MAX_MESSAGE)
    if not ws.can_prepare(request).ok:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "GET /tools/host is a websocket: connect with Upgrade: websocket"}),
            content_type="application/json",
        )
    await ws.prepare(request)
    connection = HostConnection(ws, str(request.remote or "unix socket"))
    try:
        names = _check_offer(await _first_message(ws))
    except ValueError as exc:
        await ws.send_str(json.dumps({"type": "refused", "error": str(exc)}))
        await ws.close()
        return ws
    logger.info("a host connection from %s serves %s", connection.peer, ", ".join(names))
    for name in names:
        previous = _served.get(name)
        if previous is not None:
            logger.warning("host-side MCP server %r moves to a newer host connection", name)
        _served[name] = connection
        _departed.pop(name, None)
    await connection.send({"type": "offered", "servers": names})
    reason = "the host closed its connection"
    try:
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                continue
            try:
                answer = json.loads(message.data)
            except ValueError:
                continue
            if isinstance(answer, dict) and answer.get("type") in ("result", "error"):
                connection.answer(answer)
        if ws.exception() is not None:
            reason = f"the host's connection failed ({ws.exception()})"
        elif ws.close_code not in (None, 1000):
            reason = f"the host's connection closed (code {ws.close_code})"
    except BaseException:
        reason = "the sandbox's server dropped the host's connection"
        raise
    finally:
        for name in names:
            if _served.get(name) is connection:
                del _served[name]
                _departed[name] = reason
        connection.close(reason)
    return ws


def add_routes(app: web.Application) -> None:
    """`GET /tools/host`: the host's websocket."""
    app.router.add_get("/tools/host", host_websocket)
