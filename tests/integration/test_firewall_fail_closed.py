"""A firewall set-up that fails leaves the sandbox blocked, never open, and says why."""

from __future__ import annotations

import pytest

from ipybox import ExecutionClient, FirewallError, ResourceClient, _firewall
from tests.integration.conftest import session_labels

SERVER = """
import socket
server = socket.create_server(("0.0.0.0", 8080))
while True:
    conn, _ = server.accept()
    conn.sendall(b"hello\\n")
    conn.close()
"""

PROBE = """
import socket
def probe(host, port):
    try:
        with socket.create_connection((host, port), timeout=3) as s:
            return s.recv(16).decode().strip()
    except OSError as e:
        return type(e).__name__
"""


async def test_failed_set_up_fails_closed(make_container, image: str, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import aiodocker

    docker = aiodocker.Docker()
    # A peer inside the sandbox's /24 (the default bridge): reachable under a working firewall.
    peer = await docker.containers.create(
        {
            "Image": image,
            "User": "0:0",
            "Entrypoint": ["/opt/ipybox/venv/bin/python", "-c", SERVER],
            "Labels": session_labels(),
        }
    )
    try:
        await peer.start()
        peer_ip = (await peer.show())["NetworkSettings"]["IPAddress"]
        container = await make_container()
        async with ExecutionClient(port=container.executor_port) as client:
            await client.execute(PROBE)
            probe = f"print(probe({peer_ip!r}, 8080))"
            for _ in range(50):  # the peer may still be starting
                if (await client.execute(probe)).text == "hello":
                    break
            await container.init_firewall([])
            assert (await client.execute(probe)).text == "hello"

            def broken_entries(_entries: object) -> tuple[list[str], list[str]]:
                return ["not-a-network"], []  # passes the host, makes the helper fail after its lock-down

            monkeypatch.setattr(_firewall, "parse_entries", broken_entries)
            with pytest.raises(FirewallError, match="not-a-network") as info:
                await container.init_firewall([peer_ip])
            assert isinstance(info.value, RuntimeError)
            assert (await client.execute(probe)).text == "ConnectionRefusedError"
            # The control plane still answers the host.
            async with ResourceClient(port=container.resource_port) as resources:
                assert (await resources.status())["status"] == "ok"
    finally:
        await peer.delete(force=True)
        await docker.close()
