"""The tool service (tools.py) and the kernel-side runtime (mcp_runtime) over a real unix socket.

The service runs on its own event loop in a thread, as in the sandbox's server process; the runtime's
blocking calls come from the test's threads, as from a kernel's. The MCP servers are real stdio servers
(mcp 2.x, this environment's).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

IMAGE_DIR = Path(__file__).parent.parent.parent / "ipybox" / "_image"
sys.path.insert(0, str(IMAGE_DIR))

from ipybox_server import approvals, mcp_params, mcp_runtime, tool_hosts, tools  # noqa: E402
from ipybox_server.mcp_runtime import (  # noqa: E402
    ShellEscapeDenied,
    ToolApprovalExpired,
    ToolDenied,
    ToolError,
    ToolServerCrashed,
    ToolServerError,
    ToolTimeout,
    call_tool,
)

TEST_SERVER = Path(__file__).parent.parent / "mcp_server" / "server.py"

# A stdio server with tools that misbehave on request.
UNRULY_SERVER = """
import os, time
from mcp.server.mcpserver import MCPServer

server = MCPServer("unruly")

@server.tool()
def pid() -> str:
    return str(os.getpid())

@server.tool()
def sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"

@server.tool()
def die() -> str:
    os._exit(3)

server.run("stdio")
"""

T = TypeVar("T")


class Service:
    """tools.py's socket on a loop in a thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = self.run(tools.start_socket(path))

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def register(self, name: str, params: dict[str, Any]) -> None:
        async def register() -> None:
            tools.register(name, mcp_params.normalize(params))

        self.run(register())

    def server(self, name: str) -> dict[str, Any]:
        async def describe() -> dict[str, Any]:
            return tools._servers[name].describe()

        return self.run(describe())

    def close(self) -> None:
        async def close() -> None:
            for name in list(tools._servers):
                await tools.unregister(name)
            await self.runner.cleanup()

        self.run(close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def service(monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    directory = tempfile.mkdtemp(prefix="ipybox-tools-", dir="/tmp")  # a short path: sun_path holds 108 bytes
    path = os.path.join(directory, "tools.sock")
    monkeypatch.setattr(mcp_runtime, "TOOLS_SOCKET", path)
    monkeypatch.setattr(mcp_runtime, "_local", threading.local())
    service = Service(path)
    try:
        yield service
    finally:
        service.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def unruly(service: Service, tmp_path: Path) -> Service:
    source = tmp_path / "unruly.py"
    source.write_text(UNRULY_SERVER)
    service.register("unruly", {"command": sys.executable, "args": [str(source)]})
    return service


def test_calls_reuse_one_session_and_one_connection_per_thread(service: Service) -> None:
    service.register("testsrv", {"command": sys.executable, "args": [str(TEST_SERVER)]})
    assert call_tool("testsrv", "echo", {"text": "hi"}) == "hi"
    connection = mcp_runtime._local.conn
    pid = service.server("testsrv")["pid"]
    for index in range(20):
        assert call_tool("testsrv", "echo", {"text": str(index)}) == str(index)
    assert mcp_runtime._local.conn is connection and connection.sock is not None  # kept alive
    assert call_tool("testsrv", "stats", {"values": [1, 2]}, dict) == {"count": 2, "total": 3.0}
    described = service.server("testsrv")
    assert described == {"where": "sandbox", "pid": pid, "starts": 1, "calls": 22}
    assert isinstance(pid, int) and os.path.exists(f"/proc/{pid}")


def test_concurrent_calls_from_eight_threads(service: Service) -> None:
    service.register("testsrv", {"command": sys.executable, "args": [str(TEST_SERVER)]})

    def work(thread: int) -> list[str]:
        return [call_tool("testsrv", "echo", {"text": f"{thread}-{index}"}) for index in range(25)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(8)))
    assert results == [[f"{thread}-{index}" for index in range(25)] for thread in range(8)]
    assert service.server("testsrv")["starts"] == 1


def test_tool_errors_name_server_and_tool(service: Service) -> None:
    service.register("testsrv", {"command": sys.executable, "args": [str(TEST_SERVER)]})
    with pytest.raises(ToolError, match=r"^testsrv\.fail: .*the tool failed on purpose: 42") as info:
        call_tool("testsrv", "fail", {})
    assert (info.value.server, info.value.tool) == ("testsrv", "fail")
    with pytest.raises(ToolError, match=r"^testsrv\.nope: "):
        call_tool("testsrv", "nope", {})
    with pytest.raises(ToolServerError, match=r"^nosuch\.echo: no MCP server 'nosuch' is registered"):
        call_tool("nosuch", "echo", {})


def test_a_server_that_cannot_start_is_unavailable(service: Service) -> None:
    service.register("broken", {"command": "no-such-mcp-command-ipybox"})
    with pytest.raises(ToolServerError, match="could not be started or reached.*no-such-mcp-command-ipybox") as info:
        call_tool("broken", "echo", {})
    assert type(info.value) is ToolServerError
    service.register(
        "quits", {"command": sys.executable, "args": ["-c", "import sys; print('bad config', file=sys.stderr)"]}
    )
    with pytest.raises(ToolServerError, match="bad config"):  # the server's stderr is in the message
        call_tool("quits", "echo", {})


def test_a_crash_fails_that_call_and_the_next_call_restarts_the_server(unruly: Service) -> None:
    first = call_tool("unruly", "pid", {})
    with pytest.raises(ToolServerCrashed, match=r"^unruly\.die: .*the next call starts it again"):
        call_tool("unruly", "die", {})
    second = call_tool("unruly", "pid", {})
    assert second != first
    assert unruly.server("unruly")["starts"] == 2


def test_a_server_killed_between_calls_is_started_again(unruly: Service) -> None:
    pid = int(call_tool("unruly", "pid", {}))
    os.kill(pid, 9)
    deadline = time.monotonic() + 5
    while unruly.server("unruly")["pid"] == pid and time.monotonic() < deadline:
        time.sleep(0.1)  # the session notices within tools.WATCH_INTERVAL
    assert int(call_tool("unruly", "pid", {})) != pid


def test_a_server_killed_during_a_call_fails_it_at_once(unruly: Service) -> None:
    pid = int(call_tool("unruly", "pid", {}))
    threading.Timer(0.5, os.kill, (pid, 9)).start()
    started = time.monotonic()
    with pytest.raises(ToolServerCrashed):
        call_tool("unruly", "sleep", {"seconds": 60})
    assert time.monotonic() - started < 10


def test_call_timeout(unruly: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    call_tool("unruly", "pid", {})  # started (a start counts against the timeout too)
    monkeypatch.setattr(mcp_runtime, "CALL_TIMEOUT", 0.5)
    with pytest.raises(ToolTimeout, match=r"^unruly\.sleep: no answer within 0\.5 s.*CALL_TIMEOUT") as info:
        call_tool("unruly", "sleep", {"seconds": 5})
    assert isinstance(info.value, TimeoutError)
    monkeypatch.setattr(mcp_runtime, "CALL_TIMEOUT", 300.0)
    assert call_tool("unruly", "sleep", {"seconds": 0}) == "slept"  # the session survived the timeout


def test_approvals_are_asked_before_the_call(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    service.register("testsrv", {"command": sys.executable, "args": [str(TEST_SERVER)]})
    asked: list[dict[str, Any]] = []
    verdicts: list[approvals.Refused | None] = [None, approvals.Refused("not today", "denied")]
    verdicts.append(approvals.Refused("no decision within 1 s", "expired"))

    async def check(request: Any, **kwargs: Any) -> None:
        asked.append(kwargs)
        verdict = verdicts.pop(0)
        if verdict is not None:
            raise verdict

    monkeypatch.setattr(approvals, "check", check)
    assert call_tool("testsrv", "echo", {"text": "ok"}) == "ok"
    with pytest.raises(ToolDenied, match=r"^testsrv\.echo: not today$") as denied:
        call_tool("testsrv", "echo", {"text": "no"})
    assert type(denied.value) is ToolDenied and denied.value.reason == "not today"
    with pytest.raises(ToolApprovalExpired):
        call_tool("testsrv", "echo", {"text": "late"})
    assert asked[0] == {
        "msg_id": None,
        "kind": "tool",
        "server": "testsrv",
        "tool": "echo",
        "arguments": {"text": "ok"},
    }
    assert service.server("testsrv")["calls"] == 1  # refused calls never reached the server


def test_shell_escapes_ask_first(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[dict[str, Any]] = []

    async def check(request: Any, **kwargs: Any) -> None:
        asked.append(kwargs)
        if "rm" in kwargs["arguments"]["command"]:
            raise approvals.Refused("no deleting", "denied")

    monkeypatch.setattr(approvals, "check", check)
    mcp_runtime.ask_shell("system", "ls -l")
    with pytest.raises(ShellEscapeDenied, match="'rm -rf x' was not run: no deleting"):
        mcp_runtime.ask_shell("%%bash", "rm -rf x")
    assert asked[0] == {
        "msg_id": None,
        "kind": "shell",
        "server": "shell",
        "tool": "system",
        "arguments": {"command": "ls -l"},
    }


def test_a_caller_that_disconnects_cancels_its_pending_approval(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    service.register("testsrv", {"command": sys.executable, "args": [str(TEST_SERVER)]})
    waiting, cancelled = threading.Event(), threading.Event()

    async def check(request: Any, **kwargs: Any) -> None:
        waiting.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    monkeypatch.setattr(approvals, "check", check)
    body = json.dumps({"server": "testsrv", "tool": "echo", "arguments": {"text": "x"}}).encode()
    with socket.socket(socket.AF_UNIX) as sock:  # as a kernel interrupted mid-call: the runtime closes it
        sock.connect(service.path)
        sock.sendall(
            b"POST /call HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert waiting.wait(10)
    assert cancelled.wait(10)
    assert service.server("testsrv")["calls"] == 0


def test_host_served_names_go_to_tool_hosts(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str, dict[str, Any], float | None]] = []

    async def host_call(server: str, tool: str, arguments: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        calls.append((server, tool, arguments, timeout))
        if tool == "gone":
            raise tool_hosts.Failed("the host closed its connection", "unavailable")
        return {"is_error": False, "text": "from the host", "structured": None}

    monkeypatch.setattr(tool_hosts, "serves", lambda name: name == "hosted")
    monkeypatch.setattr(tool_hosts, "call", host_call)
    assert call_tool("hosted", "hello", {"a": 1}) == "from the host"
    with pytest.raises(ToolServerError, match="the host closed its connection"):
        call_tool("hosted", "gone", {})
    assert calls[0] == ("hosted", "hello", {"a": 1}, 300.0)


def test_malformed_requests_are_400(service: Service) -> None:
    for body in ({"server": 1, "tool": "x"}, {"server": "s", "tool": "t", "arguments": []}, {"timeout": -1}):
        with pytest.raises(mcp_runtime.ServiceRefused, match="answered 400"):
            mcp_runtime.post("/call", {"server": "s", "tool": "t", **body})
    with pytest.raises(mcp_runtime.ServiceRefused, match="answered 404"):
        mcp_runtime.post("/nothing", {})


def test_an_old_package_passing_params_is_told_to_regenerate() -> None:
    with pytest.raises(ToolServerError, match="generated by an older ipybox"):
        call_tool({"command": "x"}, "echo", {})  # type: ignore[arg-type]


def test_the_runtime_reconnects_after_the_server_closed_an_idle_connection(service: Service) -> None:
    service.register("testsrv", {"command": sys.executable, "args": [str(TEST_SERVER)]})
    assert call_tool("testsrv", "echo", {"text": "a"}) == "a"
    connection = mcp_runtime._local.conn
    assert connection.sock is not None
    connection.sock.shutdown(socket.SHUT_RDWR)  # as if the server had dropped it
    assert call_tool("testsrv", "echo", {"text": "b"}) == "b"


def _http_server(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, str(TEST_SERVER), "streamable-http", "127.0.0.1", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("the test MCP server did not listen") from None
            time.sleep(0.1)


def test_an_http_server_that_went_away_fails_calls_until_it_is_back(service: Service) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    service.register("remote", {"url": f"http://127.0.0.1:{port}/mcp", "headers": {"X-Test": "1"}})
    process = _http_server(port)
    try:
        assert call_tool("remote", "echo", {"text": "up"}) == "up"
        process.kill()
        process.wait()
        with pytest.raises(ToolServerError, match=r"^remote\.echo: "):
            call_tool("remote", "echo", {"text": "down"})
        with pytest.raises(ToolServerError, match=r"^remote\.echo: "):
            call_tool("remote", "echo", {"text": "still down"})
        process = _http_server(port)
        assert call_tool("remote", "echo", {"text": "back"}) == "back"
        assert service.server("remote")["pid"] is None
    finally:
        process.kill()
        process.wait()


def test_registering_again_keeps_the_session_unless_the_params_change(unruly: Service, tmp_path: Path) -> None:
    first = call_tool("unruly", "pid", {})
    unruly.register("unruly", {"command": sys.executable, "args": [str(tmp_path / "unruly.py")]})  # generated again
    assert call_tool("unruly", "pid", {}) == first
    unruly.register("unruly", {"command": sys.executable, "args": [str(tmp_path / "unruly.py")], "env": {"A": "1"}})
    assert call_tool("unruly", "pid", {}) != first
    assert unruly.server("unruly")["starts"] == 1  # a new registration: its own count
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{first}") and time.monotonic() < deadline:
        time.sleep(0.1)  # the replaced session's server is stopped
    assert not os.path.exists(f"/proc/{first}")


def test_a_servers_stderr_is_kept_as_a_bounded_tail_in_memory(service: Service) -> None:
    async def write_and_read() -> str:
        tail = tools.StderrTail()
        try:
            for index in range(1000):  # as a server that logs every call: 1000 lines, ~30 kB
                tail.file.write(f"log line {index:05d} of a chatty server\n".encode())
            await asyncio.sleep(0.1)
            return tail.text()
        finally:
            tail.close()

    text = service.run(write_and_read())
    assert len(text) <= tools.StderrTail.LIMIT and text.endswith("log line 00999 of a chatty server")
