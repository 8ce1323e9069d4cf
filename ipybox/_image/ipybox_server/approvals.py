"""Application approvals of tool calls and shell escapes (issue 15).

Per kernel, approvals are off until a host client turns them on over the kernel's websocket, on the
channel "ipybox" that connection.py keeps from the kernel. With them on, each tool call and shell
escape of that kernel waits in `check()` for the host's decision before it runs:

    tools.sock POST /call or /shell ── check() ──▶ ipybox_approval_request to every websocket of the kernel
                                                   (again to one that re-connects while it is open)
        ◀── {"type": "decision", "id", "approve": true}   check() returns: the call runs
        ◀── {"type": "decision", "id", "approve": false, "reason"}   Refused(kind="denied")
        no decision within the kernel's timeout             Refused(kind="expired"), ipybox_approval_expired

Which kernel asks is decided by process, never by the request body: the tools.sock peer's pid
(SO_PEERCRED), walked up its parents to a kernel process the gateway started. The body's msg_id only
labels the request for the host (the execution it belongs to). A caller in no kernel (a process that
left the kernel's process tree) is refused while any kernel has approvals on.

An application-level control, not a security boundary: code in the sandbox can still run programs
without a shell escape (subprocess, os.system) and, as the same user, reach what an in-sandbox MCP
server reaches. What keeps code in is the sandbox itself.

Host -> server (content of a message on channel "ipybox"):
    {"type": "approvals", "enabled": bool, "timeout": seconds}   -> ipybox_approvals_reply {"enabled", "timeout"}
    {"type": "decision", "id", "approve": bool, "reason": str}   -> ipybox_decision_reply {"id", "accepted", "reason"}
Server -> host (msg_type, parent_header.msg_id = the execution's msg_id):
    ipybox_approval_request {"id", "kind": "tool"|"shell", "server", "tool", "arguments"}
    ipybox_approval_expired {"id", "reason"}   (no decision in time, or the caller went away)
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import struct
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

logger = logging.getLogger(__name__)

CHANNEL = "ipybox"
"""The websocket channel of approval messages (connection.py never forwards it to the kernel)."""
DEFAULT_TIMEOUT = 300.0
"""Seconds a request waits for a decision when the host's "approvals" message names none."""
MAX_TIMEOUT = 24 * 3600.0
_PARENT_HOPS = 64
"""Parents walked from the caller to its kernel at most (a deeper tree is treated as no kernel)."""


class Refused(Exception):
    """The application did not approve a call; `kind` is "denied" or "expired"."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class Listener(Protocol):
    """A kernel websocket that takes approval messages (connection.IpyboxWebsocketConnection)."""

    @property
    def kernel_id(self) -> str: ...

    def send_ipybox(self, msg_type: str, content: dict[str, Any], parent_msg_id: str | None) -> None: ...


@dataclass
class _Pending:
    kernel_id: str
    msg_id: str | None
    content: dict[str, Any]
    decision: asyncio.Future[tuple[bool, str]]


_kernel_manager: Any = None
_listeners: dict[str, set[Listener]] = {}  # kernel id -> its open websockets
_timeouts: dict[str, float] = {}  # kernel id -> seconds a request waits; present: approvals are on
_pending: dict[str, _Pending] = {}  # request id -> the request waiting for its decision


def use_kernel_manager(kernel_manager: Any) -> None:
    """The gateway's kernel manager: callers are attributed to its kernels by process."""
    global _kernel_manager
    _kernel_manager = kernel_manager


# -- the tools socket's side ---------------------------------------------------------------------


async def check(
    request: web.Request, *, msg_id: str | None, kind: str, server: str, tool: str, arguments: dict[str, Any]
) -> None:
    """Return when the call may run; raise `Refused` when it may not.

    Args:
        request: The tools.sock request (its peer process says which kernel asks).
        msg_id: The execution the caller says it belongs to: passed to the host as a label only.
        kind: "tool", or "shell" for a shell escape (then `server` is "shell" and `tool` the escape's
            kind, e.g. "system" or "%%bash", and `arguments` is {"command": ...}).
    """
    if not _timeouts:
        return  # approvals are off everywhere: no attribution, no wait
    kernel_id = kernel_of(peer_pid(request))
    if kernel_id is None:
        if _timeouts:  # `kernel_of` drops the kernels that are gone
            raise Refused(
                "refused: the caller is a process outside every kernel of this sandbox (one that left its "
                "kernel's process tree), and approvals are on; call tools from a kernel's own processes",
                "denied",
            )
        return
    timeout = _timeouts.get(kernel_id)
    if timeout is None:
        return
    await _ask(kernel_id, timeout, msg_id, kind, server, tool, arguments)


async def _ask(
    kernel_id: str,
    timeout: float,
    msg_id: str | None,
    kind: str,
    server: str,
    tool: str,
    arguments: dict[str, Any],
) -> None:
    request_id = uuid.uuid4().hex
    content = {"id": request_id, "kind": kind, "server": server, "tool": tool, "arguments": arguments}
    decision: asyncio.Future[tuple[bool, str]] = asyncio.get_running_loop().create_future()
    _pending[request_id] = _Pending(kernel_id, msg_id, content, decision)
    try:
        # No websocket open right now (a client re-opening one after a cut) is no refusal: the request
        # goes to the next one that connects, within the timeout.
        _send_all(kernel_id, "ipybox_approval_request", content, msg_id)
        try:
            approved, reason = await asyncio.wait_for(decision, timeout)
        except TimeoutError:
            why = f"no decision within {timeout:g} s"
            _send_all(kernel_id, "ipybox_approval_expired", {"id": request_id, "reason": why}, msg_id)
            raise Refused(
                f"not approved: {why} (the application's approval timeout, ExecutionClient(approval_timeout=...))",
                "expired",
            ) from None
        except asyncio.CancelledError:
            # The caller went away (its cell was interrupted): the host must not decide it any more.
            reason = "the caller went away before a decision (interrupted?)"
            _send_all(kernel_id, "ipybox_approval_expired", {"id": request_id, "reason": reason}, msg_id)
            raise
    finally:
        _pending.pop(request_id, None)
    if not approved:
        # The message is the application's reason as it gave it (the kernel's runtime puts the call's
        # name before it, and keeps it as `ToolDenied.reason`).
        raise Refused(reason or "denied by the application (no reason given)", "denied")


# -- the host's side: messages on the kernel websockets -------------------------------------------


def attach(listener: Listener) -> None:
    """A websocket of a kernel opened: it gets that kernel's requests, those still open first."""
    kernel_id = listener.kernel_id
    _listeners.setdefault(kernel_id, set()).add(listener)
    for pending in list(_pending.values()):
        if pending.kernel_id == kernel_id and not pending.decision.done():
            _send(listener, "ipybox_approval_request", pending.content, pending.msg_id)


def detach(listener: Listener) -> None:
    """A websocket closed. Approvals of its kernel stay on: a client re-opening after a cut relies on it."""
    listeners = _listeners.get(listener.kernel_id)
    if listeners is not None:
        listeners.discard(listener)
        if not listeners:
            del _listeners[listener.kernel_id]


def receive(listener: Listener, content: Any) -> None:
    """A message from the host on channel "ipybox" of one kernel's websocket."""
    kind = content.get("type") if isinstance(content, dict) else None
    if kind == "approvals":
        _configure(listener, content)
    elif kind == "decision":
        _decide(listener, content)
    else:
        logger.warning("ignored a message on channel %r of kernel %s: %r", CHANNEL, listener.kernel_id, kind)


def _configure(listener: Listener, content: dict[str, Any]) -> None:
    kernel_id = listener.kernel_id
    enabled = content.get("enabled", True) is True
    timeout = content.get("timeout", DEFAULT_TIMEOUT)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or not 0 < timeout <= MAX_TIMEOUT
    ):
        listener.send_ipybox(
            "ipybox_approvals_reply",
            {
                "enabled": kernel_id in _timeouts,
                "timeout": _timeouts.get(kernel_id),
                "error": f"timeout must be a number of seconds in (0, {MAX_TIMEOUT:g}], not {timeout!r}",
            },
            None,
        )
        return
    if enabled:
        _timeouts[kernel_id] = float(timeout)
    else:
        _timeouts.pop(kernel_id, None)
    listener.send_ipybox("ipybox_approvals_reply", {"enabled": enabled, "timeout": _timeouts.get(kernel_id)}, None)


def _decide(listener: Listener, content: dict[str, Any]) -> None:
    request_id = str(content.get("id"))
    pending = _pending.get(request_id)
    if pending is None or pending.kernel_id != listener.kernel_id or pending.decision.done():
        why = "no request with this id is waiting for a decision (it was decided, expired, or withdrawn)"
        listener.send_ipybox("ipybox_decision_reply", {"id": request_id, "accepted": False, "reason": why}, None)
        return
    approved = content.get("approve") is True  # anything else denies
    reason = content.get("reason")
    pending.decision.set_result((approved, reason if isinstance(reason, str) else ""))
    listener.send_ipybox("ipybox_decision_reply", {"id": request_id, "accepted": True, "reason": ""}, pending.msg_id)


def _send_all(kernel_id: str, msg_type: str, content: dict[str, Any], parent_msg_id: str | None) -> None:
    for listener in list(_listeners.get(kernel_id, ())):
        _send(listener, msg_type, content, parent_msg_id)


def _send(listener: Listener, msg_type: str, content: dict[str, Any], parent_msg_id: str | None) -> None:
    try:
        listener.send_ipybox(msg_type, content, parent_msg_id)
    except Exception as exc:  # a websocket closing under us: it re-connects or is gone; the others still get it
        logger.debug("sending %s to a websocket of kernel %s failed: %r", msg_type, listener.kernel_id, exc)


# -- which kernel a caller belongs to ---------------------------------------------------------------


def peer_pid(request: web.Request) -> int | None:
    """The pid of the process that opened the unix socket connection of `request` (SO_PEERCRED)."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return int(pid) if pid > 0 else None


def kernel_of(pid: int | None) -> str | None:
    """The id of the kernel whose process is `pid` or one of its ancestors; None for none.

    Also forgets the approval settings of kernels that are gone.
    """
    if _kernel_manager is None:
        return None
    kernels: dict[int, str] = {}  # a restarted kernel has a new process: read them on every call
    for kernel_id in _kernel_manager.list_kernel_ids():
        try:
            kernel_pid = getattr(_kernel_manager.get_kernel(kernel_id).provisioner, "pid", None)
        except (KeyError, AttributeError):
            continue
        if kernel_pid:
            kernels[int(kernel_pid)] = kernel_id
    for gone in set(_timeouts) - set(_kernel_manager.list_kernel_ids()):
        del _timeouts[gone]
    return _ancestor_in(pid, kernels)


def _ancestor_in(pid: int | None, kernels: dict[int, str]) -> str | None:
    try:
        for _ in range(_PARENT_HOPS):
            if pid is None or pid <= 1:
                return None
            if pid in kernels:
                return kernels[pid]
            pid = _parent(pid)
    except (OSError, ValueError, IndexError):  # the process ended meanwhile
        return None
    return None


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses; the last ")" ends it.
        return int(stat.read().rsplit(b")", 1)[1].split()[1])
