"""The sandbox's side of approvals (ipybox_server/approvals.py), without a gateway: fake websockets and
kernel manager; attribution over a real unix socket with real processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

IMAGE_DIR = Path(__file__).parent.parent.parent / "ipybox" / "_image"
sys.path.insert(0, str(IMAGE_DIR))

from ipybox_server import approvals  # noqa: E402


class Socket:
    """A kernel websocket as approvals.py sees it: what was sent to it."""

    def __init__(self, kernel_id: str) -> None:
        self.kernel_id = kernel_id
        self.sent: list[tuple[str, dict[str, Any], str | None]] = []

    def send_ipybox(self, msg_type: str, content: dict[str, Any], parent_msg_id: str | None) -> None:
        self.sent.append((msg_type, content, parent_msg_id))

    def of_type(self, msg_type: str) -> list[dict[str, Any]]:
        return [content for kind, content, _ in self.sent if kind == msg_type]


class Provisioner:
    def __init__(self, pid: int) -> None:
        self.pid = pid


class Kernel:
    def __init__(self, pid: int) -> None:
        self.provisioner = Provisioner(pid)


class KernelManager:
    def __init__(self, kernels: dict[str, int]) -> None:
        self.kernels = kernels

    def list_kernel_ids(self) -> list[str]:
        return list(self.kernels)

    def get_kernel(self, kernel_id: str) -> Kernel:
        return Kernel(self.kernels[kernel_id])


@pytest.fixture(autouse=True)
def clean_state() -> Iterator[None]:
    yield
    approvals._listeners.clear()
    approvals._timeouts.clear()
    approvals._pending.clear()
    approvals.use_kernel_manager(None)


def enable(socket: Socket, timeout: Any = 5) -> dict[str, Any]:
    approvals.receive(socket, {"type": "approvals", "enabled": True, "timeout": timeout})
    return socket.of_type("ipybox_approvals_reply")[-1]


async def ask(kernel_id: str = "k1", timeout: float = 5, msg_id: str | None = "exec-1") -> asyncio.Task[None]:
    task = asyncio.ensure_future(approvals._ask(kernel_id, timeout, msg_id, "tool", "github", "issues", {"n": 1}))
    await asyncio.sleep(0)
    return task


async def test_off_by_default_nothing_is_asked_and_no_kernel_is_looked_up() -> None:
    # No kernel manager at all: a lookup would find no kernel and refuse.
    await approvals.check(None, msg_id=None, kind="tool", server="s", tool="t", arguments={})  # type: ignore[arg-type]


def test_turning_approvals_on_and_off_is_acknowledged() -> None:
    socket = Socket("k1")
    assert enable(socket, 30) == {"enabled": True, "timeout": 30.0}
    assert approvals._timeouts == {"k1": 30.0}
    approvals.receive(socket, {"type": "approvals", "enabled": False})
    assert socket.of_type("ipybox_approvals_reply")[-1] == {"enabled": False, "timeout": None}
    assert approvals._timeouts == {}


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), "5", True, 10**9])
def test_a_bad_timeout_is_refused_and_changes_nothing(timeout: Any) -> None:
    socket = Socket("k1")
    reply = enable(socket, timeout)
    assert reply["enabled"] is False and "timeout must be a number of seconds" in reply["error"]
    assert approvals._timeouts == {}


async def test_a_request_goes_to_every_websocket_of_its_kernel_only_and_the_first_decision_wins() -> None:
    first, second, other = Socket("k1"), Socket("k1"), Socket("k2")
    for socket in (first, second, other):
        approvals.attach(socket)
    task = await ask()
    (request,) = first.of_type("ipybox_approval_request")
    assert request == {"id": request["id"], "kind": "tool", "server": "github", "tool": "issues", "arguments": {"n": 1}}
    assert second.sent == [("ipybox_approval_request", request, "exec-1")]
    assert other.sent == []
    approvals.receive(other, {"type": "decision", "id": request["id"], "approve": True})  # not its kernel
    assert other.of_type("ipybox_decision_reply")[0]["accepted"] is False
    approvals.receive(second, {"type": "decision", "id": request["id"], "approve": True})
    await task
    assert second.of_type("ipybox_decision_reply") == [{"id": request["id"], "accepted": True, "reason": ""}]
    approvals.receive(first, {"type": "decision", "id": request["id"], "approve": False})  # too late
    reply = first.of_type("ipybox_decision_reply")[0]
    assert reply["accepted"] is False and "no request with this id is waiting" in reply["reason"]
    assert approvals._pending == {}


@pytest.mark.parametrize("approve", [False, "yes", 1, None])
async def test_anything_but_true_denies(approve: Any) -> None:
    socket = Socket("k1")
    approvals.attach(socket)
    task = await ask()
    request_id = socket.of_type("ipybox_approval_request")[0]["id"]
    approvals.receive(socket, {"type": "decision", "id": request_id, "approve": approve, "reason": "not now"})
    with pytest.raises(approvals.Refused) as refused:
        await task
    assert (str(refused.value), refused.value.kind) == ("not now", "denied")


async def test_no_decision_in_time_expires_and_says_so() -> None:
    socket = Socket("k1")
    approvals.attach(socket)
    task = await ask(timeout=0.05)
    with pytest.raises(approvals.Refused, match=r"no decision within 0.05 s .*approval_timeout") as refused:
        await task
    assert refused.value.kind == "expired"
    request_id = socket.of_type("ipybox_approval_request")[0]["id"]
    assert socket.of_type("ipybox_approval_expired") == [{"id": request_id, "reason": "no decision within 0.05 s"}]


async def test_a_denial_without_a_reason_says_who_denied() -> None:
    socket = Socket("k1")
    approvals.attach(socket)
    task = await ask()
    approvals.receive(socket, {"type": "decision", "id": socket.of_type("ipybox_approval_request")[0]["id"]})
    with pytest.raises(approvals.Refused, match=r"^denied by the application \(no reason given\)$"):
        await task


async def test_a_caller_that_goes_away_withdraws_its_request() -> None:
    socket = Socket("k1")
    approvals.attach(socket)
    task = await ask()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (expired,) = socket.of_type("ipybox_approval_expired")
    assert "went away" in expired["reason"] and approvals._pending == {}


async def test_a_websocket_that_connects_while_a_request_is_open_gets_it() -> None:
    task = await ask()  # no websocket at all: the request waits for one
    late = Socket("k1")
    approvals.attach(late)
    (request,) = late.of_type("ipybox_approval_request")
    assert late.sent[0][2] == "exec-1"
    approvals.detach(late)
    approvals.detach(late)  # the gateway may close a connection twice
    again = Socket("k1")
    approvals.attach(again)
    approvals.receive(again, {"type": "decision", "id": request["id"], "approve": True})
    await task


def test_unknown_messages_are_ignored() -> None:
    socket = Socket("k1")
    approvals.receive(socket, {"type": "launch"})
    approvals.receive(socket, None)
    approvals.receive(socket, ["decision"])
    assert socket.sent == [] and approvals._timeouts == {}


# -- attribution: a real unix socket, real processes ------------------------------------------------

CALLER = """
import http.client, socket, sys
class Conn(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(sys.argv[1])
conn = Conn("localhost")
conn.request("POST", "/check", b"{}")
print(conn.getresponse().read().decode())
"""


@pytest.fixture
async def check_socket(tmp_path: Path) -> Any:
    """A unix socket whose POST /check runs approvals.check and answers what it decided."""

    async def check(request: web.Request) -> web.Response:
        try:
            await approvals.check(request, msg_id="m", kind="shell", server="shell", tool="system", arguments={})
        except approvals.Refused as exc:
            return web.Response(text=f"{exc.kind}: {exc}")
        return web.Response(text="approved")

    app = web.Application()
    app.router.add_post("/check", check)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    path = str(tmp_path / "tools.sock")
    await web.UnixSite(runner, path).start()
    yield path
    await runner.cleanup()


async def call_from(path: str, *, detached: bool = False) -> str:
    argv = [sys.executable, "-c", CALLER, path]
    if detached:  # sh exits at once: the caller is re-parented out of this process's tree
        argv = ["sh", "-c", '("$@" &)', "sh", *argv]
    process = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE)
    out, _ = await process.communicate()
    return out.decode().strip()


async def test_callers_are_attributed_to_their_kernel_by_process(check_socket: str) -> None:
    approvals.use_kernel_manager(KernelManager({"mine": os.getpid(), "gone-pid": 2**22 + 7}))
    socket = Socket("mine")
    approvals.attach(socket)
    enable(socket)

    async def approve_requests() -> None:
        while True:
            for request in socket.of_type("ipybox_approval_request"):
                approvals.receive(socket, {"type": "decision", "id": request["id"], "approve": True})
            await asyncio.sleep(0.01)

    approver = asyncio.ensure_future(approve_requests())
    try:
        # A child of this process (the "kernel") asks through it; its msg_id is only a label.
        assert await call_from(check_socket) == "approved"
        assert socket.of_type("ipybox_approval_request")[0]["tool"] == "system"
        assert socket.sent[1][2] == "m"
        # A process that left the tree is in no kernel: refused while approvals are on.
        answer = await call_from(check_socket, detached=True)
        assert answer.startswith("denied: refused: the caller is a process outside every kernel")
    finally:
        approver.cancel()


async def test_approvals_of_kernels_that_are_gone_are_forgotten(check_socket: str) -> None:
    manager = KernelManager({"other": 2**22 + 7})
    approvals.use_kernel_manager(manager)
    enable(Socket("other"))
    assert (await call_from(check_socket)).startswith("denied: refused: the caller is a process outside")
    del manager.kernels["other"]
    assert await call_from(check_socket) == "approved"  # no kernel has approvals on any more
    assert approvals._timeouts == {}


def test_the_parent_walk_stops_at_init_and_at_processes_that_ended() -> None:
    assert approvals._ancestor_in(os.getpid(), {os.getppid(): "k"}) == "k"
    assert approvals._ancestor_in(os.getpid(), {}) is None
    assert approvals._ancestor_in(2**22 + 11, {1: "k"}) is None  # no such process
    assert approvals._ancestor_in(None, {}) is None


async def test_peer_pid_is_none_for_tcp(unused_tcp_port: int) -> None:
    seen: list[int | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(approvals.peer_pid(request))
        return web.Response()

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{unused_tcp_port}/"):
            pass
    finally:
        await runner.cleanup()
    assert seen == [None]
