"""The checks that every route leads to the container's server, against processes and sockets of this host.

This test process stands in for the server: it listens, and its identity is the one recorded. Other
processes stand in for a sandbox process that replaced the server's socket.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import aiohttp
import pytest

from ipybox import _process as processes
from ipybox import _routes, _tokens
from ipybox._process import Process

CONTAINER_ID = "c" * 64


@contextmanager
def _process(*argv: str) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(argv or ("sleep", "60"))
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def _zombie() -> Process:
    """A child that has exited and is not reaped yet: /proc still shows it, in state Z."""
    child = subprocess.Popen(["sleep", "60"])
    identity = Process.of(child.pid)
    assert identity is not None
    child.kill()
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1][0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    _zombies.append(child)
    return identity


_zombies: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _reap() -> Iterator[None]:
    yield
    while _zombies:
        _zombies.pop().wait()


def _me() -> Process:
    me = Process.of(os.getpid())
    assert me is not None
    return me


@pytest.fixture
def container_runs(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether the recorded container's init still runs, as the tests say (by default: it does)."""
    state = [True]
    monkeypatch.setattr(_tokens, "container_runs", lambda container_id, pid: state[0])
    return state


# -- processes -----------------------------------------------------------------------------------


def test_a_process_is_its_pid_and_its_start_time() -> None:
    me = _me()
    assert me.pid == os.getpid() and me.runs()
    # The same pid with another start time: a process that got the pid after the recorded one ended.
    assert not Process(me.pid, me.start + 1).runs()
    assert not Process(2**22 + 1, me.start).runs()  # past any pid_max: no such process
    assert Process.of(2**22 + 1) is None


def test_an_exited_process_does_not_run_even_before_it_is_reaped() -> None:
    zombie = _zombie()
    assert not zombie.runs()
    assert Process.of(zombie.pid) is None


def test_the_start_time_is_read_past_any_command_name(tmp_path: Path) -> None:
    # The name is in parentheses and may hold spaces and parentheses itself: ") S 1 2 (" must not shift fields.
    tricky = tmp_path / ") S 1 2 ("
    shutil.copy(shutil.which("sleep") or "/bin/sleep", tricky)
    with _process(str(tricky), "60") as child:
        identity = Process.of(child.pid)
        assert identity is not None and identity.runs()
        stat = Path(f"/proc/{child.pid}/stat").read_text()
        assert identity.start == int(stat[stat.rindex(")") + 2 :].split()[19])
        assert (processes._stat(child.pid) or ())[1:] == (os.getpid(), identity.start)


def test_the_server_is_the_only_child_of_init() -> None:
    code = (
        "import subprocess, sys, time\n"
        "children = [subprocess.Popen(['sleep', '60']) for _ in range(int(sys.argv[1]))]\n"
        "time.sleep(60)"
    )
    with _process(sys.executable, "-c", code, "1") as init:
        deadline = time.monotonic() + 5
        while (server := processes.find_server(init.pid)) is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert server.runs() and processes._stat(server.pid) is not None
        assert (processes._stat(server.pid) or ("", 0, 0))[1] == init.pid
    with _process(sys.executable, "-c", code, "2") as init:
        time.sleep(0.5)
        assert processes.find_server(init.pid) is None, "two children: which one serves is unknown"
    with _process() as childless:
        assert processes.find_server(childless.pid) is None


def test_the_server_is_found_without_the_children_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Kernels without CONFIG_PROC_CHILDREN: every process is asked for its parent.
    for pid, parent in ((100, 0), (101, 100), (102, 1)):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(
            f"{pid} (p) S {parent} {pid} 0 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {pid * 7} 0 0\n"
        )
    monkeypatch.setattr(processes, "_PROC", tmp_path)
    assert processes.find_server(100) == Process(101, 707)


# -- the unix socket connector -------------------------------------------------------------------


@asynccontextmanager
async def _listener(path: Path) -> AsyncIterator[list[bytes]]:
    """A unix socket in this process that answers HTTP 200 and records what each connection sent."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(65536)
        received.append(data)
        if data:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(serve, str(path))
    try:
        yield received
    finally:
        server.close()
        await server.wait_closed()


async def _get(connector: aiohttp.BaseConnector, url: str = "http://localhost/status") -> str:
    async with aiohttp.ClientSession(connector=connector) as session, session.get(url) as response:
        return await response.text()


def _server(process: Process | None) -> _routes._Server:
    return _routes._Server(CONTAINER_ID, 1, process)


async def test_the_servers_own_socket_is_used(tmp_path: Path, container_runs: list[bool]) -> None:
    path = tmp_path / "executor.sock"
    async with _listener(path) as received:
        assert await _get(_routes._ServerSocketConnector(str(path), _server(_me()))) == "ok"
    assert received and b"GET /status" in received[0]


async def test_a_socket_served_by_another_process_gets_no_byte(
    tmp_path: Path, container_runs: list[bool], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "executor.sock"
    with _process() as server:  # the recorded server; the socket is served by this test process instead
        identity = Process.of(server.pid)
        async with _listener(path) as received:
            with pytest.raises(aiohttp.ClientConnectorError, match="replaced the server's socket"):
                await _get(_routes._ServerSocketConnector(str(path), _server(identity)))
            await asyncio.sleep(0.1)
    assert received == [b""], "the impostor was connected to (that much is needed to ask who it is), but sent nothing"
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert str(path) in warning.message
    assert f"pid {os.getpid()}" in warning.message and f"server's pid {server.pid}" in warning.message


async def test_a_symlink_or_a_file_in_the_sockets_place_is_not_followed(
    tmp_path: Path, container_runs: list[bool], caplog: pytest.LogCaptureFixture
) -> None:
    real, link, plain = tmp_path / "real.sock", tmp_path / "executor.sock", tmp_path / "resource.sock"
    link.symlink_to(real)
    plain.write_text("")
    async with _listener(real) as received:
        with pytest.raises(aiohttp.ClientConnectorError, match="is a symlink"):
            await _get(_routes._ServerSocketConnector(str(link), _server(_me())))
        with pytest.raises(aiohttp.ClientConnectorError, match="is not a socket"):
            await _get(_routes._ServerSocketConnector(str(plain), _server(_me())))
    # Even though the symlink leads to a socket of the right process: nothing behind a symlink is trusted.
    assert received == []
    assert "is a symlink" in caplog.text


async def test_no_connection_once_the_server_is_gone(
    tmp_path: Path, container_runs: list[bool], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "executor.sock"
    async with _listener(path) as received:
        with pytest.raises(aiohttp.ClientConnectorError, match="gone while the container still runs"):
            await _get(_routes._ServerSocketConnector(str(path), _server(_zombie())))
    assert received == []
    await asyncio.sleep(_routes._CONFIRM_DELAY + 0.2)  # the warning once the container is seen still running
    assert "a process in the sandbox may be serving its ports" in caplog.text


async def test_a_server_gone_because_its_container_ends_is_no_tampering_warning(
    tmp_path: Path, container_runs: list[bool], caplog: pytest.LogCaptureFixture
) -> None:
    # A killed container loses its server ~2 ms before its init: before, every kill mid-connection warned
    # "a process in the sandbox may be serving its ports".
    path = tmp_path / "executor.sock"
    async with _listener(path) as received:
        with pytest.raises(aiohttp.ClientConnectorError, match="gone while the container still runs"):
            await _get(_routes._ServerSocketConnector(str(path), _server(_zombie())))
        container_runs[0] = False  # the init goes too, within the moment
    await asyncio.sleep(_routes._CONFIRM_DELAY + 0.2)
    assert received == []
    assert "may be serving its ports" not in caplog.text


# -- the TCP connector ---------------------------------------------------------------------------


@asynccontextmanager
async def _tcp_listener() -> AsyncIterator[tuple[str, list[bytes]]]:
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(65536)
        received.append(data)
        if data:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/status", received
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("direct", [True, False])
async def test_tcp_is_used_while_the_server_runs(container_runs: list[bool], direct: bool) -> None:
    async with _tcp_listener() as (url, received):
        assert await _get(_routes._ServerTCPConnector(_server(_me()), direct), url) == "ok"
    assert len(received) == 1 and received[0].startswith(b"GET /status")


@pytest.mark.parametrize("direct", [True, False])
async def test_tcp_is_refused_while_the_container_runs_without_its_server(
    container_runs: list[bool], direct: bool
) -> None:
    async with _tcp_listener() as (url, received):
        with pytest.raises(aiohttp.ClientConnectorError, match="gone while the container still runs"):
            await _get(_routes._ServerTCPConnector(_server(_zombie()), direct), url)
    assert received == [], "not even a connection"


async def test_a_gone_container_has_no_direct_route_but_its_published_port_is_left_to_the_secret_registry(
    container_runs: list[bool],
) -> None:
    container_runs[0] = False
    async with _tcp_listener() as (url, received):
        with pytest.raises(aiohttp.ClientConnectorError, match="the container is gone"):
            await _get(_routes._ServerTCPConnector(_server(_zombie()), direct=True), url)
        assert received == []
        # The port may belong to something else by now; ipybox._tokens withholds the secret from it.
        assert await _get(_routes._ServerTCPConnector(_server(_zombie()), direct=False), url) == "ok"


class _DiesOnSecondLook(Process):
    """A server that runs when the connection is opened and is gone once it is established."""

    def runs(self) -> bool:
        looks = _looks.setdefault(self.pid, 0) + 1
        _looks[self.pid] = looks
        return looks == 1


_looks: dict[int, int] = {}


async def test_a_connection_established_after_the_server_died_is_closed_before_the_request(
    container_runs: list[bool],
) -> None:
    me = _me()
    async with _tcp_listener() as (url, received):
        with pytest.raises(aiohttp.ClientConnectorError, match="gone while the container still runs"):
            await _get(_routes._ServerTCPConnector(_server(_DiesOnSecondLook(me.pid, me.start)), True), url)
        await asyncio.sleep(0.1)
    assert received == [b""], "connected, then closed without a byte"


# -- records -------------------------------------------------------------------------------------


async def test_record_identifies_the_server_and_hands_out_checking_connectors(
    container_runs: list[bool],
) -> None:
    code = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    with _process(sys.executable, "-c", code) as init:
        deadline = time.monotonic() + 5
        while processes.find_server(init.pid) is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        info = {
            "Id": CONTAINER_ID,
            "State": {"Pid": init.pid},
            "NetworkSettings": {"Networks": {"bridge": {"IPAddress": "172.17.0.9", "Gateway": "127.0.0.1"}}},
        }
        _routes.record("127.0.0.1", {8888: 40021}, info, {8888: "/run/ipybox/executor.sock"})
        try:
            server = _routes._servers[(("localhost", 40021), 8888)]
            assert server.process == processes.find_server(init.pid)
            assert isinstance(_routes.published_connector("localhost", 40021, 8888), _routes._ServerTCPConnector)
            assert _routes.direct_url("localhost", 40021, 8888) == "http://172.17.0.9:8888"
            routes = _routes.direct_sessions("localhost", 40021, 8888)
            # The socket is looked up in the stand-in init's root, "/": there is no /run/ipybox here.
            assert [type(connector) for _, connector, _ in routes] == [_routes._ServerTCPConnector]
            for _, connector, _ in routes:
                assert connector is not None
                await connector.close()

            # The server is gone while the container runs: no direct route at all.
            _routes._servers[(("localhost", 40021), 8888)] = _routes._Server(CONTAINER_ID, init.pid, _zombie())
            assert _routes.direct_url("localhost", 40021, 8888) is None
            assert _routes.direct_sessions("localhost", 40021, 8888) == []
        finally:
            _routes.forget("127.0.0.1", [40021])
    assert _routes.published_connector("localhost", 40021, 8888) is None


def test_a_container_whose_server_is_not_found_gets_no_direct_route(container_runs: list[bool]) -> None:
    with _process() as childless:
        info = {
            "Id": CONTAINER_ID,
            "State": {"Pid": childless.pid},
            "NetworkSettings": {"Networks": {"bridge": {"IPAddress": "172.17.0.9", "Gateway": "127.0.0.1"}}},
        }
        _routes.record("127.0.0.1", {8888: 40031}, info, {8888: "/run/ipybox/executor.sock"})
        try:
            assert _routes.direct_url("localhost", 40031, 8888) is None
            assert _routes.direct_sessions("localhost", 40031, 8888) == []
            assert _routes.published_connector("localhost", 40031, 8888) is None
        finally:
            _routes.forget("127.0.0.1", [40031])
