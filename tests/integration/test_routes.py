"""Clients in the process that started a container reach it at its own address, around docker-proxy."""

from __future__ import annotations

import socket

from ipybox import ExecutionClient, ExecutionContainer, ResourceClient, _routes
from ipybox._labels import EXECUTOR_PORT, RESOURCE_PORT


async def test_resource_client_uses_the_container_address(shared_container: ExecutionContainer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    direct = _routes.direct_url("localhost", shared_container.resource_port, RESOURCE_PORT)
    assert direct is not None, "no direct route recorded for a container on the default bridge"
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(256)) * 4096)
    async with ResourceClient(port=shared_container.resource_port) as client:
        assert client._base_url == direct
        await client.upload_file("routes/direct.bin", source)
        await client.download_file("routes/direct.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == source.read_bytes()


async def test_a_route_that_does_not_answer_falls_back_to_the_published_port(
    shared_container: ExecutionContainer,
) -> None:
    port = shared_container.resource_port
    saved = dict(_routes._routes)
    key = (("localhost", port), RESOURCE_PORT)
    # Loopback on a port nothing listens on: refused at once, on this machine only.
    _routes._routes[key] = "127.0.0.1"
    try:
        url = _routes.direct_url("localhost", port, RESOURCE_PORT)
        assert url == f"http://127.0.0.1:{RESOURCE_PORT}"
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", RESOURCE_PORT)) != 0, "something listens on 8900 here"
        async with ResourceClient(port=port) as client:
            assert client._base_url == f"http://localhost:{port}"
            assert (await client.status())["status"] == "ok"
    finally:
        _routes._routes.clear()
        _routes._routes.update(saved)


async def test_routes_are_forgotten_when_the_container_is_killed(make_container) -> None:  # type: ignore[no-untyped-def]
    container: ExecutionContainer = await make_container()
    executor, resource = container.executor_port, container.resource_port
    assert _routes.direct_url("localhost", executor, EXECUTOR_PORT) is not None
    await container.kill()
    assert _routes.direct_url("localhost", executor, EXECUTOR_PORT) is None
    assert _routes.direct_url("localhost", resource, RESOURCE_PORT) is None


async def test_execution_client_uses_the_container_address(shared_container: ExecutionContainer) -> None:
    direct = _routes.direct_url("localhost", shared_container.executor_port, EXECUTOR_PORT)
    assert direct is not None
    async with ExecutionClient(port=shared_container.executor_port) as client:
        assert client._base_url == direct
        assert (await client.execute("print(6 * 7)")).text == "42"


async def test_execution_client_falls_back_to_the_published_port(shared_container: ExecutionContainer) -> None:
    port = shared_container.executor_port
    saved = dict(_routes._routes)
    _routes._routes[(("localhost", port), EXECUTOR_PORT)] = "127.0.0.1"  # nothing listens on 8888 here
    try:
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", EXECUTOR_PORT)) != 0, "something listens on 8888 here"
        async with ExecutionClient(port=port) as client:
            assert client._base_url == f"http://localhost:{port}"
            assert (await client.execute("print('via docker-proxy')")).text == "via docker-proxy"
    finally:
        _routes._routes.clear()
        _routes._routes.update(saved)
