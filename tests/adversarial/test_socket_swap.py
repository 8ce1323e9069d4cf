"""A cell cannot put itself between the host and the control plane (issue 13).

The host reaches the servers through their unix sockets in the container's `/run/ipybox` (a directory
of the sandbox user), the container's address and the published port. A cell may replace a socket with
its own listener or with a symlink (which resolves against the host's root, as the host reaches the
socket through `/proc/<pid>/root`), try to bind the servers' TCP ports, or hold docker-init under
ptrace, kill the server and take over every port while the container still counts as running. In each
case no byte of a host client in the process that started the container reaches anything but the
server, and clients go on over a route that leads to the server, or fail. A client in another process
knows only the token file, which names the server process too: it gets no secret and its connections
to the published port are refused.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import logging
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiodocker
import pytest

from ipybox import ExecutionClient, ExecutionContainer, IpyboxError, ResourceClient, _routes, _tokens
from ipybox._labels import EXECUTOR_PORT, EXECUTOR_SOCKET, RESOURCE_PORT, RESOURCE_SOCKET
from tests.integration.conftest import ContainerFactory

# Replaces a server's socket with a listener that records whatever arrives; it answers nothing and
# closes a connection after its first bytes, so a client that sent a request fails over to its next route.
FAKE_SOCKET = r"""
import os, socket, threading
def fake(path, log):
    os.rename(path, path + '.real')
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    open(log, 'wb').close()
    def serve():
        while True:
            conn, _ = listener.accept()
            with open(log + '.connections', 'a') as f:
                f.write('1')
            conn.settimeout(5)
            try:
                data = conn.recv(65536)
                with open(log, 'ab') as f:
                    f.write(data)
            except OSError:
                pass
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
fake({path!r}, {log!r})
print('swapped')
"""

SYMLINK = r"""
import os
os.rename({path!r}, {path!r} + '.real')
os.symlink({target!r}, {path!r})
print(os.readlink({path!r}))
"""

# Every way a cell might get a second listener on a server's TCP port.
BIND = r"""
import errno, itertools, socket
results = []
for port, address, reuse_address, reuse_port in itertools.product(
    {ports!r}, ('0.0.0.0', {address!r}, '127.0.0.1'), (False, True), (False, True)
):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuse_address))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuse_port))
    try:
        s.bind((address, port))
        s.listen()
        results.append((port, address, reuse_address, reuse_port, 'bound'))
    except OSError as e:
        results.append((port, address, reuse_address, reuse_port, errno.errorcode[e.errno]))
    finally:
        s.close()
print(repr(results))
"""

# Holds docker-init (the container's pid 1: same user, dumpable) under ptrace so that it never notices
# its child's death, kills the server, and serves both TCP ports and both unix sockets itself,
# recording what arrives. Its own process (the kernel dies with the server, and ends forked copies of
# itself when their cell ends).
ATTACKER = r"""
import ctypes, os, socket, threading, time
time.sleep(0.5)  # the cell finishes first
libc = ctypes.CDLL(None, use_errno=True)
state = open('/tmp/takeover.state', 'w', buffering=1)
if libc.ptrace(16, 1, 0, 0) != 0:  # PTRACE_ATTACH
    state.write(f'attach refused {ctypes.get_errno()}\n')
    state.write('ready\n')
    raise SystemExit
os.waitpid(1, 0x40000000)  # __WALL: init stopped
server = next(int(p) for p in filter(str.isdigit, os.listdir('/proc'))
              if open(f'/proc/{p}/cmdline', 'rb').read().split(b'\0')[1:4] == [b'-I', b'-m', b'ipybox_server'])
os.kill(server, 9)
time.sleep(0.5)
def serve(listener, log):
    while True:
        conn, _ = listener.accept()
        conn.settimeout(5)
        try:
            data = conn.recv(65536)
            with open(log, 'ab') as f:
                f.write(data or b'')
        except OSError:
            pass
        conn.close()
for port in (8888, 8900):
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the server's closed connections linger
    listener.bind(('0.0.0.0', port))
    listener.listen()
    threading.Thread(target=serve, args=(listener, f'/tmp/takeover-{port}.log')).start()
for name in ('executor', 'resource'):
    path = f'/run/ipybox/{name}.sock'
    os.unlink(path)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    threading.Thread(target=serve, args=(listener, f'/tmp/takeover-{name}.log')).start()
state.write('ready\n')
while True:
    time.sleep(60)
"""
TAKEOVER = f"""
import subprocess, sys
subprocess.Popen([sys.executable, '-c', {ATTACKER!r}], start_new_session=True)
print('started')
"""


async def _init_pid(container: ExecutionContainer) -> int:
    docker = aiodocker.Docker()
    try:
        info = await (await docker.containers.get(container.container_id or "")).show()
    finally:
        await docker.close()
    return int(info["State"]["Pid"])


def _read(init_pid: int, path: str) -> bytes:
    """A file in the container, read through its root as the host sees it (works when the server is dead)."""
    try:
        return Path(f"/proc/{init_pid}/root{path}").read_bytes()
    except FileNotFoundError:
        return b""


@contextlib.asynccontextmanager
async def _host_socket() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A unix socket on the host, outside every container, that records each connection's first bytes."""
    received: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            received.append(await asyncio.wait_for(reader.read(65536), 5))
        except TimeoutError:
            received.append(b"")
        writer.close()

    directory = Path(tempfile.mkdtemp(prefix="ipybox-swap-"))
    path = directory / "host.sock"
    server = await asyncio.start_unix_server(record, str(path))
    try:
        yield str(path), received
    finally:
        server.close()
        await server.wait_closed()
        path.unlink(missing_ok=True)
        directory.rmdir()


async def test_a_socket_swapped_by_a_cell_gets_no_byte_and_the_client_goes_on(
    make_container: ContainerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ipybox")
    container = await make_container()
    token = _tokens.lookup("localhost", container.executor_port)
    assert token
    init = await _init_pid(container)
    async with ExecutionClient(port=container.executor_port) as cell:
        for path, log in ((EXECUTOR_SOCKET, "/tmp/fake-executor.log"), (RESOURCE_SOCKET, "/tmp/fake-resource.log")):
            assert (await cell.execute(FAKE_SOCKET.format(path=path, log=log))).text == "swapped"

        async with ExecutionClient(port=container.executor_port) as client:
            assert (await client.execute("print(6 * 7)")).text == "42"
            assert not client._via.startswith("unix socket"), client._via
        async with ResourceClient(port=container.resource_port) as resources:
            assert (await resources.status())["status"] == "ok"
            assert not resources._via.startswith("unix socket"), resources._via

        for log in ("/tmp/fake-executor.log", "/tmp/fake-resource.log"):
            received = _read(init, log)
            assert token.encode() not in received, f"{log}: the secret reached the cell's socket"
            assert received == b"", f"{log}: the cell's socket received {received[:200]!r}"
    for path in (EXECUTOR_SOCKET, RESOURCE_SOCKET):
        assert f"unix socket /proc/{init}/root{path}" in caplog.text, caplog.text
    assert "a process in the sandbox replaced the server's socket" in caplog.text


async def test_a_socket_replaced_by_a_symlink_to_a_host_socket_leads_nowhere(
    make_container: ContainerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ipybox")
    container = await make_container()
    async with _host_socket() as (target, received), ExecutionClient(port=container.executor_port) as cell:
        for path in (EXECUTOR_SOCKET, RESOURCE_SOCKET):
            assert (await cell.execute(SYMLINK.format(path=path, target=target))).text == target

        async with ExecutionClient(port=container.executor_port) as client:
            assert (await client.execute("print('still here')")).text == "still here"
            assert not client._via.startswith("unix socket"), client._via
        async with ResourceClient(port=container.resource_port) as resources:
            assert (await resources.status())["status"] == "ok"
            assert not resources._via.startswith("unix socket"), resources._via
        assert received == [], f"the host's socket {target} was reached through the sandbox's symlink: {received!r}"
    assert "is a symlink" in caplog.text, caplog.text


async def test_a_cell_cannot_bind_the_servers_ports(shared_container: ExecutionContainer) -> None:
    docker = aiodocker.Docker()
    try:
        info = await (await docker.containers.get(shared_container.container_id or "")).show()
    finally:
        await docker.close()
    address = next(iter(info["NetworkSettings"]["Networks"].values()))["IPAddress"]
    async with ExecutionClient(port=shared_container.executor_port) as client:
        text = (await client.execute(BIND.format(ports=(EXECUTOR_PORT, RESOURCE_PORT), address=address))).text or ""
    results = ast.literal_eval(text)  # a list of tuples printed with repr()
    assert len(results) == 24
    assert {outcome for *_, outcome in results} == {"EADDRINUSE"}, results


async def _wait_for(init: int, path: str, what: bytes, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while what not in _read(init, path):
        assert asyncio.get_running_loop().time() < deadline, f"{path} never said {what!r}: {_read(init, path)!r}"
        await asyncio.sleep(0.1)


async def _take_over(container: ExecutionContainer) -> int:
    init = await _init_pid(container)
    async with ExecutionClient(port=container.executor_port) as cell:
        assert (await cell.execute(TAKEOVER)).text == "started"
        await _wait_for(init, "/tmp/takeover.state", b"ready")
        # The attacking client's own kernel died with the server; its next execution re-opens the
        # websocket, which must not go to the cell's listeners either.
        with pytest.raises(IpyboxError):
            await cell.execute("print(1)", timeout=30)
    return init


def _assert_nothing_reached_the_cell(init: int, token: str) -> None:
    for name in ("executor", "resource", "8888", "8900"):
        received = _read(init, f"/tmp/takeover-{name}.log")
        assert token.encode() not in received, f"the secret reached the cell's listener ({name}): {received[:300]!r}"
        assert received == b"", f"the cell's listener ({name}) received {received[:300]!r}"


async def test_a_cell_holding_init_after_killing_the_server_gets_nothing_from_this_process(
    make_container: ContainerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ipybox")
    container = await make_container()
    token = _tokens.lookup("localhost", container.executor_port)
    assert token
    init = await _take_over(container)
    # The container still counts as running (init runs), but the secret is withheld: its server is gone.
    assert _tokens.lookup("localhost", container.executor_port) is None
    with pytest.raises(IpyboxError):
        await ExecutionClient(port=container.executor_port).connect(retries=1)
    with pytest.raises(IpyboxError):
        await ResourceClient(port=container.resource_port, connect_retries=1).connect()
    _assert_nothing_reached_the_cell(init, token)


async def test_a_cell_holding_init_after_killing_the_server_gets_nothing_from_another_process(
    make_container: ContainerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = await make_container()
    token = _tokens.lookup("localhost", container.executor_port)
    assert token
    init = await _take_over(container)
    # Another process of this user: no in-process records, only the token file.
    for table in ("_routes", "_sockets", "_servers"):
        monkeypatch.setattr(_routes, table, {}, raising=False)
    monkeypatch.setattr(_tokens, "_registry", {})
    with pytest.raises(IpyboxError):
        await ExecutionClient(port=container.executor_port).connect(retries=1)
    _assert_nothing_reached_the_cell(init, token)
