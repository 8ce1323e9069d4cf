"""The secret of a container that is gone is never handed out, not even when its port is taken again."""

from __future__ import annotations

import aiodocker
import pytest
from aiohttp import web

from ipybox import ExecutionClient, _routes, _tokens
from tests.integration.conftest import ContainerFactory


async def _remove_behind_ipyboxs_back(container_id: str) -> None:
    # As `docker rm -f` does, or a process that died without ExecutionContainer.kill(): the records stay.
    docker = aiodocker.Docker()
    try:
        await (await docker.containers.get(container_id)).delete(force=True)
    finally:
        await docker.close()


async def test_token_of_a_removed_container_is_not_handed_out(
    make_container: ContainerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = await make_container()
    port = container.executor_port
    token = _tokens.lookup("localhost", port)
    assert token is not None
    await _remove_behind_ipyboxs_back(container.container_id or "")

    assert _tokens.lookup("localhost", port) is None, "the in-process registry served a stale secret"
    assert _tokens._token_file("localhost", port).exists()  # still recorded: the file itself is what is checked
    monkeypatch.setattr(_tokens, "_registry", {})  # another process of this user: only the file
    assert _tokens.lookup("localhost", port) is None, "the token file served a stale secret"


async def test_live_container_is_found_from_another_process(
    make_container: ContainerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = await make_container()
    token = _tokens.lookup("localhost", container.executor_port)
    monkeypatch.setattr(_tokens, "_registry", {})
    assert token is not None and _tokens.lookup("127.0.0.1", container.executor_port) == token


async def test_stale_token_is_not_sent_to_the_next_holder_of_the_port(
    make_container: ContainerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = await make_container()
    port = container.executor_port
    token = _tokens.lookup("localhost", port)
    assert token is not None
    await _remove_behind_ipyboxs_back(container.container_id or "")
    # A client in another process: no in-process records, neither secrets nor direct routes.
    monkeypatch.setattr(_tokens, "_registry", {})
    monkeypatch.setattr(_routes, "_routes", {})
    monkeypatch.setattr(_routes, "_sockets", {})

    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.Response(status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()  # the port is free again: someone else takes it
        with pytest.raises(Exception):  # noqa: B017 (what fails does not matter here, only what was sent)
            await ExecutionClient(port=port).connect(retries=1)
    finally:
        await runner.cleanup()
    assert seen, "the client never reached the new holder of the port"
    assert not any(token in header for header in seen), "the dead container's secret went to the port's new holder"
