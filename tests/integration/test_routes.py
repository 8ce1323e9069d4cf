"""Clients in the process that started a container take direct routes to it, around docker-proxy.

Best first: the servers' unix sockets through the container's root (/proc/<pid>/root/run/ipybox/...),
then the container's own address on the bridge, then the published port.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ipybox import ExecutionClient, ExecutionContainer, ResourceClient, _routes
from ipybox._labels import EXECUTOR_PORT, RESOURCE_PORT


@contextmanager
def _routes_changed() -> Iterator[None]:
    routes, sockets = dict(_routes._routes), dict(_routes._sockets)
    try:
        yield
    finally:
        _routes._routes.clear()
        _routes._routes.update(routes)
        _routes._sockets.clear()
        _routes._sockets.update(sockets)


def _nothing_listens_on(port: int) -> None:
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, f"something listens on 127.0.0.1:{port} here"


async def test_clients_use_the_unix_sockets(
    shared_container: ExecutionContainer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ipybox")  # a failed direct route says why
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(256)) * 4096)
    async with ResourceClient(port=shared_container.resource_port) as resources:
        assert resources._via.startswith("unix socket /proc/"), (resources._via, caplog.text)
        await resources.upload_file("routes/direct.bin", source)
        await resources.download_file("routes/direct.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == source.read_bytes()
    async with ExecutionClient(port=shared_container.executor_port) as client:
        assert client._via.startswith("unix socket /proc/"), (client._via, caplog.text)
        assert (await client.execute("print(6 * 7)")).text == "42"


async def test_without_the_sockets_clients_use_the_container_address(shared_container: ExecutionContainer) -> None:
    with _routes_changed():
        _routes._sockets.clear()
        async with ResourceClient(port=shared_container.resource_port) as resources:
            assert resources._via.startswith("container address http://"), resources._via
            assert (await resources.status())["status"] == "ok"
        async with ExecutionClient(port=shared_container.executor_port) as client:
            assert client._via.startswith("container address http://"), client._via
            assert (await client.execute("print('via the bridge')")).text == "via the bridge"


async def test_routes_that_do_not_answer_fall_back_to_the_published_port(
    shared_container: ExecutionContainer,
) -> None:
    with _routes_changed():
        for container_port, host_port in (
            (RESOURCE_PORT, shared_container.resource_port),
            (EXECUTOR_PORT, shared_container.executor_port),
        ):
            _nothing_listens_on(container_port)
            key = (("localhost", host_port), container_port)
            # Loopback on a port nothing listens on: refused at once, on this machine only; and a
            # socket path that does not exist.
            _routes._routes[key] = "127.0.0.1"
            path, pid, container_id = _routes._sockets[key]
            _routes._sockets[key] = (path + ".missing", pid, container_id)
        async with ResourceClient(port=shared_container.resource_port) as resources:
            assert resources._via == "published port"
            assert (await resources.status())["status"] == "ok"
        async with ExecutionClient(port=shared_container.executor_port) as client:
            assert client._via == "published port"
            assert (await client.execute("print('via docker-proxy')")).text == "via docker-proxy"


async def test_routes_are_forgotten_when_the_container_is_killed(make_container) -> None:  # type: ignore[no-untyped-def]
    container: ExecutionContainer = await make_container()
    executor, resource = container.executor_port, container.resource_port
    assert _routes.direct_url("localhost", executor, EXECUTOR_PORT) is not None
    assert _routes.unix_socket("localhost", executor, EXECUTOR_PORT) is not None
    await container.kill()
    for port, container_port in ((executor, EXECUTOR_PORT), (resource, RESOURCE_PORT)):
        assert _routes.direct_url("localhost", port, container_port) is None
        assert _routes.unix_socket("localhost", port, container_port) is None
