"""Runtime of generated MCP tool modules, in the kernel: stdlib only, whatever the user environment holds.

Generated modules call `call_tool(SERVER_NAME, TOOL_NAME, params[, output])`. The MCP session is not
here: ipybox's server process holds one per server (`tools`, in ipybox's own environment with mcp 2.x)
and this module sends each call to it over the tools socket, `/run/ipybox/tools.sock`, as HTTP/1.1
with one kept-alive connection per thread. A call carries the current execution's `msg_id`, so that an
application approving calls sees which execution made it. Interrupting the kernel during a call closes
the connection, which cancels the call (and a pending approval) in the server, and re-raises.

What a call returns (`tool_value`):

- an error result (`isError`) raises `ToolError` with the result's text, as does an MCP error;
- `output=None` (the tool declares no output schema): the result's text content, blocks joined by
  newlines (`echo: hi`);
- `output=dict`: the structured content as JSON data; `output=<pydantic model>`: the structured content
  validated into that model (pydantic 2's `model_validate`, or pydantic 1's `parse_obj`). A result
  without structured content gives its text.

The exceptions, every one naming the server and tool (`.server`, `.tool`)::

    ToolCallError (RuntimeError)          a call that did not give a result
    ├── ToolError                         the tool answered with an error (or an MCP error)
    ├── ToolDenied                        the application refused the call (`.reason`)
    │   └── ToolApprovalExpired           ... or did not decide in time
    ├── ToolServerError                   the server could not be started or reached, or is unknown
    │   └── ToolServerCrashed             the server died during the call (the next call restarts it)
    └── ToolTimeout (also TimeoutError)   no answer within CALL_TIMEOUT

Shell escapes (`!cmd`, `%%bash`, ...) ask the same socket first (`ask_shell`, installed by kernel_app);
a refusal raises `ShellEscapeDenied` (a PermissionError).
"""

from __future__ import annotations

import builtins
import http.client
import json
import os
import socket
import threading
import time
from typing import Any

TOOLS_SOCKET = "/run/ipybox/tools.sock"

CALL_TIMEOUT: float | None = 300.0
"""Seconds a tool call may take once approved (None: no limit). Set it in a cell to change it:
`from ipybox_server import mcp_runtime; mcp_runtime.CALL_TIMEOUT = 600`."""

_IDLE_RECONNECT = 3600.0
"""A connection idle this long is replaced before use (the server keeps idle ones open for 24 h)."""


class ToolCallError(RuntimeError):
    """An MCP tool call that did not give a result; the base of the tool errors.

    Attributes:
        server: the MCP server's name.
        tool: the tool's name.
    """

    def __init__(self, message: str, server: str = "", tool: str = "") -> None:
        self.server = server
        self.tool = tool
        prefix = f"{server}.{tool}: " if server or tool else ""
        super().__init__(prefix + message)


class ToolError(ToolCallError):
    """The tool reported an error (an `isError` result, or an MCP error such as an unknown tool or bad
    arguments); the message is the server's."""


class ToolDenied(ToolCallError):
    """The application refused the call (`reason`: why, as the application said)."""

    def __init__(self, message: str, server: str = "", tool: str = "") -> None:
        super().__init__(message, server, tool)
        self.reason = message


class ToolApprovalExpired(ToolDenied):
    """The application did not approve the call in time."""


class ToolServerError(ToolCallError):
    """The server could not be started or reached, or no server of that name is registered here."""


class ToolServerCrashed(ToolServerError):
    """The server exited (or its connection broke) during the call; the next call starts it again."""


class ToolTimeout(ToolCallError, TimeoutError):
    """The tool did not answer within `CALL_TIMEOUT` seconds (the server abandoned the call)."""


class ShellEscapeDenied(PermissionError):
    """The application refused a shell escape (`!cmd`, `!!cmd`, `%sx`, `%%bash`, `%%sh`, `%%script`).

    An application-level control, not a security boundary: code in the sandbox can start processes
    in other ways (`subprocess`, `os.system`). The sandbox is the boundary.
    """


class ServiceRefused(Exception):
    """The tool service answered with an error status (not a call's outcome: those are 200)."""


_ERRORS: dict[str, type[ToolCallError]] = {
    "tool": ToolError,
    "denied": ToolDenied,
    "expired": ToolApprovalExpired,
    "crash": ToolServerCrashed,
    "unavailable": ToolServerError,
    "unknown_server": ToolServerError,
    "timeout": ToolTimeout,
}


def arguments_of(params: Any) -> dict[str, Any]:
    """The JSON arguments of a `Params` model: only fields that were set, by alias (pydantic 2 or 1)."""
    if isinstance(params, dict):
        return params
    dump = getattr(params, "model_dump", None)
    if dump is not None:
        result: dict[str, Any] = dump(mode="json", by_alias=True, exclude_unset=True)
        return result
    # pydantic 1 (after a user's `pip install 'pydantic<2'`): .json() encodes dates, enums, ... as JSON.
    loaded: dict[str, Any] = json.loads(params.json(by_alias=True, exclude_unset=True))
    return loaded


def tool_value(answer: dict[str, Any], output: Any = None, server: str = "", tool: str = "") -> Any:
    """What a generated function returns for the tool service's `answer` (see the module docstring).

    Raises:
        ToolCallError: one of its subclasses, by the answer's error kind.
    """
    if "error" in answer:
        error_class = _ERRORS.get(str(answer.get("kind")), ToolServerError)
        raise error_class(str(answer["error"]), server, tool)
    result = answer["result"]
    text = str(result.get("text") or "")
    if result.get("is_error"):
        raise ToolError(text or "the MCP tool reported an error without a message", server, tool)
    structured = result.get("structured")
    if output is None or structured is None:
        return text
    if output is dict:
        return structured
    validate = getattr(output, "model_validate", None) or output.parse_obj
    return validate(structured)


# -- the connection to the tools socket ---------------------------------------------------------------


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=None)  # the server enforces the call's timeout
        self._path = path
        self.pid = os.getpid()
        self.used = time.monotonic()

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


_local = threading.local()


def _connection() -> tuple[_UnixConnection, bool]:
    """This thread's connection, and whether it was used before (then a failure may be a stale one)."""
    conn: _UnixConnection | None = getattr(_local, "conn", None)
    if conn is not None and conn.pid != os.getpid():
        conn = None  # inherited through fork: the parent's; never share its byte stream
    if conn is not None and time.monotonic() - conn.used > _IDLE_RECONNECT:
        conn.close()
        conn = None
    if conn is None:
        conn = _local.conn = _UnixConnection(TOOLS_SOCKET)
        return conn, False
    return conn, True


def _drop(conn: _UnixConnection) -> None:
    conn.close()
    if getattr(_local, "conn", None) is conn:
        _local.conn = None


def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST `body` to the tools socket on this thread's connection; the JSON answer.

    Raises:
        OSError: the socket cannot be reached (no tool service in this process tree).
        ServiceRefused: an answer other than 200 (a malformed request, or a bug in the service).
    """
    data = json.dumps(body)
    for _attempt in range(2):
        conn, reused = _connection()
        try:
            conn.request("POST", path, data, {"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = response.read()
        except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest) as exc:
            _drop(conn)
            # A kept-alive connection the server closed while idle: the request was not taken. Once more.
            if reused and not isinstance(exc, ConnectionRefusedError):
                continue
            raise
        except BaseException:  # an interrupt (KeyboardInterrupt) mid-call: the server cancels on the close
            _drop(conn)
            raise
        conn.used = time.monotonic()
        if response.will_close:
            _drop(conn)
        try:
            answer: dict[str, Any] = json.loads(payload)
        except ValueError:
            answer = {}
        if response.status != 200:
            raise ServiceRefused(
                f"the tool service answered {response.status}: {answer.get('error') or payload[:200]!r}"
            )
        return answer
    raise AssertionError("unreachable")


def current_msg_id() -> str | None:
    """The msg_id of the execution this code runs in, as the kernel knows it (None outside a kernel)."""
    try:
        get_ipython = getattr(builtins, "get_ipython", None)  # put there by the running IPython shell
        shell = get_ipython() if get_ipython is not None else None
        if shell is None:
            return None
        kernel = getattr(shell, "kernel", None)
        msg_id = kernel.get_parent().get("header", {}).get("msg_id") if kernel is not None else None
        # A thread a cell started has no parent of its own (ipykernel keeps it in a context variable):
        # the kernel's current execution names it.
        return msg_id or getattr(shell, "ipybox_msg_id", None)
    except Exception:
        return None


def call_tool(server_name: str, tool_name: str, params: Any, output: Any = None) -> Any:
    """Call MCP tool `tool_name` of server `server_name` with a `Params` model (or a dict of JSON arguments).

    Args:
        output: None for the result's text; `dict` for its structured content as JSON data; a pydantic
            model class to validate the structured content into.

    Raises:
        ToolCallError: one of its subclasses (see the module docstring).
    """
    if not isinstance(server_name, str):
        raise ToolServerError(
            "this package was generated by an older ipybox (it holds the server's parameters): generate it "
            "again with ResourceClient.generate_mcp_sources",
            "?",
            tool_name,
        )
    body = {
        "server": server_name,
        "tool": tool_name,
        "arguments": arguments_of(params),
        "msg_id": current_msg_id(),
        "timeout": CALL_TIMEOUT,
    }
    try:
        answer = post("/call", body)
    except ServiceRefused as exc:
        raise ToolServerError(str(exc), server_name, tool_name) from exc
    except OSError as exc:
        raise ToolServerError(
            f"ipybox's tool service at {TOOLS_SOCKET} cannot be reached ({type(exc).__name__}: {exc}); tools "
            "are called from the sandbox's kernels",
            server_name,
            tool_name,
        ) from exc
    return tool_value(answer, output, server_name, tool_name)


def ask_shell(kind: str, command: str) -> None:
    """Ask the application whether a shell escape may run (at once when approvals are off).

    Raises:
        ShellEscapeDenied: the application refused it, or did not decide in time.
    """
    try:
        answer = post("/shell", {"kind": kind, "command": command, "msg_id": current_msg_id()})
    except (OSError, ServiceRefused) as exc:
        # Closed, not open: the socket is gone only if code in the sandbox removed it.
        raise ShellEscapeDenied(f"{kind} {command!r} was not run: the tool service cannot be asked ({exc})") from exc
    if "error" in answer:
        raise ShellEscapeDenied(f"{kind} {command!r} was not run: {answer['error']}")
