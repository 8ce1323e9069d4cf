"""Sandboxes cannot open connections to each other; the host and other containers stay reachable.

Two sandboxes on Docker's default bridge (where every container of the machine lands by default) and a
plain server container there. A cell in sandbox A listens on a TCP port; sandbox B must not reach it,
with or without a firewall on B, while the host reaches it, B reaches the plain container (also under
`init_firewall([])`: the host's /24) and B still reaches A's token-protected ports. Nothing leaves the
machine: every address is a container of this test.
"""

from __future__ import annotations

import asyncio

import aiodocker
import pytest

from ipybox import ExecutionClient, ExecutionContainer
from tests.integration.conftest import ContainerFactory

LISTEN = """
import socket as _iso_socket, threading as _iso_threading
_iso_server = _iso_socket.create_server(("0.0.0.0", 0))
_iso_udp = _iso_socket.socket(_iso_socket.AF_INET, _iso_socket.SOCK_DGRAM)
_iso_udp.bind(("0.0.0.0", _iso_server.getsockname()[1]))

def _iso_serve():
    while True:
        conn, _ = _iso_server.accept()
        conn.sendall(b"hello-sandbox-a\\n")
        conn.close()

def _iso_echo():
    while True:
        data, peer = _iso_udp.recvfrom(1024)
        _iso_udp.sendto(data, peer)

_iso_threading.Thread(target=_iso_serve, daemon=True).start()
_iso_threading.Thread(target=_iso_echo, daemon=True).start()
print(_iso_server.getsockname()[1])
"""

PROBE = """
import socket as _iso_socket, time as _iso_time
def _iso_probe(host, port, udp=False):
    start = _iso_time.monotonic()
    try:
        kind = _iso_socket.SOCK_DGRAM if udp else _iso_socket.SOCK_STREAM
        with _iso_socket.socket(_iso_socket.AF_INET, kind) as sock:
            sock.settimeout(3)
            sock.connect((host, port))
            if udp:
                sock.send(b"udp-ping\\n")
            data = sock.recv(64)
        print(data.decode().strip() or "EOF")
    except OSError as exc:
        print("blocked %s %.1f" % (type(exc).__name__, _iso_time.monotonic() - start))
"""


async def _address(docker: aiodocker.Docker, container_id: str) -> str:
    info = await (await docker.containers.get(container_id)).show()
    return str(info["NetworkSettings"]["Networks"]["bridge"]["IPAddress"])


async def _probe(client: ExecutionClient, host: str, port: int, udp: bool = False) -> str:
    return (await client.execute(f"_iso_probe({host!r}, {port}, udp={udp})", timeout=30)).text or ""


async def _wait_for(client: ExecutionClient, host: str, port: int, expected: str) -> str:
    for _ in range(50):  # a container that was just started may not listen yet
        if (result := await _probe(client, host, port)) == expected:
            return result
    return result


@pytest.mark.parametrize("firewall_on_b", [False, True], ids=["no-firewall", "firewall"])
async def test_a_sandbox_cannot_connect_to_another_sandbox(
    make_container: ContainerFactory, plain_server: str, firewall_on_b: bool
) -> None:
    sandbox_a: ExecutionContainer = await make_container()
    sandbox_b: ExecutionContainer = await make_container()
    docker = aiodocker.Docker()
    try:
        assert sandbox_a.container_id is not None and sandbox_b.container_id is not None
        address_a = await _address(docker, sandbox_a.container_id)
    finally:
        await docker.close()
    async with (
        ExecutionClient(port=sandbox_a.executor_port) as client_a,
        ExecutionClient(port=sandbox_b.executor_port) as client_b,
    ):
        port = int((await client_a.execute(LISTEN)).text or "0")
        await client_b.execute(PROBE)
        # B reaches a container that is not a sandbox: the bridge itself works.
        assert await _wait_for(client_b, plain_server, 8080, "hello-plain") == "hello-plain"
        if firewall_on_b:
            await sandbox_b.init_firewall([])

        tcp = await _probe(client_b, address_a, port)
        udp = await _probe(client_b, address_a, port, udp=True)
        assert tcp.startswith("blocked"), f"sandbox B opened a TCP connection to a cell's server in sandbox A: {tcp}"
        assert udp.startswith("blocked"), f"sandbox B exchanged UDP with a cell's socket in sandbox A: {udp}"
        # Refused at once, not dropped into a timeout.
        assert float(tcp.split()[-1]) < 2.0, tcp

        # What keeps working: B reaches the plain container (under the firewall: the host's /24) ...
        assert await _probe(client_b, plain_server, 8080) == "hello-plain"
        # ... and A's token-protected ports (the gateway answers, without a token: refused).
        gateway = await client_b.execute(
            "import urllib.request, urllib.error\n"
            "try:\n"
            f"    urllib.request.urlopen('http://{address_a}:8888/api/kernels', timeout=5)\n"
            "except urllib.error.HTTPError as e:\n"
            "    print('HTTP', e.code)\n"
        )
        assert gateway.text in ("HTTP 401", "HTTP 403"), gateway.text
        # The host reaches the cell's server in A (from the bridge's gateway).
        reader, writer = await asyncio.open_connection(address_a, port)
        try:
            assert (await reader.readline()).strip() == b"hello-sandbox-a"
        finally:
            writer.close()
        # A itself still reaches B's kernel ports and the plain container.
        await client_a.execute(PROBE)
        assert await _probe(client_a, plain_server, 8080) == "hello-plain"
