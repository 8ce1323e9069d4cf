"""Drives `ipybox mcp` servers for tests: through the MCP SDK's client, or as a raw JSON-RPC process.

Every server gets the session label and a label of its own (`CASE_LABEL`), so a test can find, and
wait for the removal of, exactly the container its server started.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import aiodocker
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.types import CallToolResult
from mcp.types.version import LATEST_HANDSHAKE_VERSION

from tests.integration.conftest import SESSION_ID, SESSION_LABEL

CASE_LABEL = "ai.gradion.ipybox.test-case"
TOOLS = {"execute_ipython_cell", "upload_file", "download_file", "reset"}
CALL_TIMEOUT = 180.0  # the first call waits for the container to start
START_TIMEOUT = 60.0


def server_argv(image: str, case: str, *args: str) -> list[str]:
    """The command line of an `ipybox mcp` server whose container carries the session and case labels."""
    return [
        sys.executable,
        "-m",
        "ipybox",
        "mcp",
        "--container-tag",
        image,
        "--container-label",
        f"{SESSION_LABEL}={SESSION_ID}",
        "--container-label",
        f"{CASE_LABEL}={case}",
        *args,
    ]


def server_env() -> dict[str, str]:
    return {**os.environ, "NO_COLOR": "1"}


def new_case() -> str:
    return uuid.uuid4().hex[:12]


def text_of(result: CallToolResult) -> str:
    """The first content item's text (the tools put their text first)."""
    first = result.content[0]
    assert first.type == "text", f"first content item is {first.type}, not text"
    return first.text


class McpServer:
    """`ipybox mcp` as a child process with a connected `mcp.Client`.

    One background task enters and exits the client's context: anyio's cancel scopes must be left in
    the task that entered them, while pytest-asyncio sets fixtures up and tears them down in different
    tasks. Tool calls may come from any task.
    """

    def __init__(self, image: str, *args: str, cwd: Path, case: str | None = None) -> None:
        self.case = case or new_case()
        self.argv = server_argv(image, self.case, *args)
        self.cwd = cwd
        self._client: Client | None = None
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._owner: asyncio.Task[None] | None = None
        self._errlog: IO[str] | None = None

    @property
    def client(self) -> Client:
        assert self._client is not None, "the server is not connected"
        return self._client

    def stderr(self) -> str:
        """What the server wrote to stderr so far (for failure messages)."""
        if self._errlog is None:
            return ""
        self._errlog.flush()
        self._errlog.seek(0)
        return self._errlog.read()[-4000:]

    async def __aenter__(self) -> McpServer:
        self._errlog = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
        self._owner = asyncio.create_task(self._own(), name=f"mcp-client-{self.case}")
        ready = asyncio.create_task(self._ready.wait())
        try:
            await asyncio.wait({ready, self._owner}, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if not self._ready.is_set():
            await self.__aexit__(None, None, None)
            raise RuntimeError(f"no MCP session with `ipybox mcp` within {START_TIMEOUT} s; stderr:\n{self.stderr()}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        try:
            if self._owner is not None:
                if not self._owner.done():
                    await asyncio.wait({self._owner}, timeout=30)
                if not self._owner.done():
                    self._owner.cancel()
                    await asyncio.gather(self._owner, return_exceptions=True)
                elif not self._owner.cancelled() and self._owner.exception() is not None and exc is None:
                    raise RuntimeError(f"the MCP client failed; stderr:\n{self.stderr()}") from self._owner.exception()
        finally:
            if self._errlog is not None:
                self._errlog.close()

    async def _own(self) -> None:
        params = StdioServerParameters(command=self.argv[0], args=self.argv[1:], env=server_env(), cwd=str(self.cwd))
        async with Client(stdio_client(params, errlog=self._errlog)) as client:  # type: ignore[arg-type]
            self._client = client
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                self._client = None

    async def call(self, tool: str, **arguments: Any) -> CallToolResult:
        """Call `tool`; fail after CALL_TIMEOUT (tool arguments may be called `timeout` themselves)."""
        try:
            return await asyncio.wait_for(self.client.call_tool(tool, arguments), CALL_TIMEOUT)
        except TimeoutError:
            raise AssertionError(f"{tool} gave no answer within {CALL_TIMEOUT} s; stderr:\n{self.stderr()}") from None

    async def execute(self, code: str, **arguments: Any) -> CallToolResult:
        return await self.call("execute_ipython_cell", code=code, **arguments)

    async def output(self, code: str, **arguments: Any) -> str:
        """The text of a cell that must succeed."""
        result = await self.execute(code, **arguments)
        assert not result.is_error, f"cell failed: {text_of(result)}"
        return text_of(result)


class RawServer:
    """`ipybox mcp` as a child process spoken to in JSON lines, keeping every line it writes to stdout."""

    def __init__(self, image: str, *args: str, cwd: Path, case: str | None = None) -> None:
        self.case = case or new_case()
        self.argv = server_argv(image, self.case, *args)
        self.cwd = cwd
        self.stdout_lines: list[bytes] = []
        self.process: asyncio.subprocess.Process | None = None
        self._errlog: IO[bytes] | None = None
        self._next_id = 0

    async def __aenter__(self) -> RawServer:
        self._errlog = tempfile.TemporaryFile()
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=self.cwd,
            env=server_env(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._errlog,
            limit=16 * 1024 * 1024,
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self.process is not None and self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
        finally:
            if self._errlog is not None:
                self._errlog.close()

    @property
    def proc(self) -> asyncio.subprocess.Process:
        assert self.process is not None
        return self.process

    def stderr(self) -> str:
        if self._errlog is None:
            return ""
        self._errlog.seek(0)
        return self._errlog.read().decode("utf-8", "replace")[-4000:]

    async def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        await self.proc.stdin.drain()

    async def request(self, method: str, params: dict[str, Any] | None = None) -> int:
        self._next_id += 1
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": self._next_id, "method": method}
        if params is not None:
            message["params"] = params
        await self.send(message)
        return self._next_id

    async def notify(self, method: str) -> None:
        await self.send({"jsonrpc": "2.0", "method": method})

    async def response(self, request_id: int, timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
        """Read stdout up to the response to `request_id` (other lines are kept, not answered)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no response to request {request_id} within {timeout} s:\n{self.stderr()}")
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), remaining)
            except TimeoutError:
                continue
            if not line:
                raise AssertionError(f"stdout closed before the response to {request_id}:\n{self.stderr()}")
            self.stdout_lines.append(line)
            message = json.loads(line)
            if message.get("id") == request_id and ("result" in message or "error" in message):
                return message

    async def initialize(self) -> dict[str, Any]:
        request_id = await self.request(
            "initialize",
            {
                "protocolVersion": LATEST_HANDSHAKE_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "ipybox-tests", "version": "0"},
            },
        )
        answer = await self.response(request_id, timeout=30)
        await self.notify("notifications/initialized")
        return answer

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> int:
        return await self.request("tools/call", {"name": name, "arguments": arguments})

    async def close_stdin_and_drain(self, timeout: float) -> int:
        """Close stdin, keep every further stdout line; the exit code (the process must exit in time)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        rest = await asyncio.wait_for(self.proc.stdout.read(), timeout)
        self.stdout_lines.extend(rest.splitlines(keepends=True))
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)


async def case_containers(case: str) -> list[dict[str, Any]]:
    """Inspect data of the containers (any state) the server of `case` started."""
    docker = aiodocker.Docker()
    try:
        found = await docker.containers.list(
            all=True, filters={"label": [f"{SESSION_LABEL}={SESSION_ID}", f"{CASE_LABEL}={case}"]}
        )
        return [await container.show() for container in found]
    finally:
        await docker.close()


async def wait_containers_gone(case: str, timeout: float) -> float:
    """Seconds until no container of `case` exists; fails (naming them) after `timeout`."""
    start = time.monotonic()
    while True:
        left = await case_containers(case)
        if not left:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            names = ", ".join(f"{c['Id'][:12]} ({c['State']['Status']})" for c in left)
            raise AssertionError(f"container(s) of case {case} still there after {timeout} s: {names}")
        await asyncio.sleep(0.25)


async def force_remove(case: str) -> None:
    """Remove whatever a failed test left (the test has failed already; the session must stay clean)."""
    docker = aiodocker.Docker()
    try:
        for container in await docker.containers.list(
            all=True, filters={"label": [f"{SESSION_LABEL}={SESSION_ID}", f"{CASE_LABEL}={case}"]}
        ):
            await container.delete(force=True)
    finally:
        await docker.close()


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has exited: it only waits for a parent to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def child_pids(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children.extend(int(child) for child in (task / "children").read_text().split())
    return children


async def wait_pid_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"process {pid} still runs after {timeout} s (killed now)")
        await asyncio.sleep(0.1)


# Run as a separate process by the test that SIGKILLs a client mid-cell: connects to the server whose
# argv is given as JSON, finishes one cell, prints "ready", then starts a 60 s cell.
KILLED_CLIENT_SOURCE = r"""
import asyncio, json, sys
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client

async def main():
    argv, cwd = json.loads(sys.argv[1]), sys.argv[2]
    params = StdioServerParameters(command=argv[0], args=argv[1:], env=dict(__import__("os").environ), cwd=cwd)
    async with Client(stdio_client(params, errlog=sys.stderr)) as client:
        first = await client.call_tool("execute_ipython_cell", {"code": "print('up')"})
        assert not first.is_error, first
        print("ready", flush=True)
        await client.call_tool("execute_ipython_cell", {"code": "import time; time.sleep(60)"})
        print("the long cell finished: the client was not killed", flush=True)

asyncio.run(main())
"""


def killed_client_argv(server: Sequence[str], cwd: Path) -> list[str]:
    return [sys.executable, "-c", KILLED_CLIENT_SOURCE, json.dumps(list(server)), str(cwd)]
