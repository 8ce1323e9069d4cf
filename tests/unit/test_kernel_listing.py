"""`list_kernels` against a stand-in gateway: the answer an old image gives names the fix."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from ipybox import ServerConnectionError
from ipybox.container import list_kernels


@pytest.fixture
async def gateway_answering() -> AsyncIterator[dict[str, object]]:
    state: dict[str, object] = {"status": 403}

    async def kernels(request: web.Request) -> web.Response:
        return web.json_response([{"id": "k1"}], status=int(state["status"]))  # type: ignore[call-overload]

    app = web.Application()
    app.router.add_get("/api/kernels", kernels)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state["port"] = runner.addresses[0][1]
    try:
        yield state
    finally:
        await runner.cleanup()


async def test_a_gateway_with_listing_switched_off_names_ipybox_build(gateway_answering: dict[str, object]) -> None:
    # Images built before kernel listing answer 403 to a valid secret: the old message was a bare "HTTP 403".
    with pytest.raises(ServerConnectionError, match=r"HTTP 403: .*rebuild it with `ipybox build`") as caught:
        await list_kernels("127.0.0.1", int(gateway_answering["port"]), "secret")  # type: ignore[call-overload]
    assert caught.value.status == 403


async def test_a_wrong_secret_is_not_blamed_on_the_image(gateway_answering: dict[str, object]) -> None:
    gateway_answering["status"] = 401
    with pytest.raises(ServerConnectionError) as caught:
        await list_kernels("127.0.0.1", int(gateway_answering["port"]), "secret")  # type: ignore[call-overload]
    assert "ipybox build" not in str(caught.value)


async def test_listing_returns_the_kernels(gateway_answering: dict[str, object]) -> None:
    gateway_answering["status"] = 200
    assert await list_kernels("127.0.0.1", int(gateway_answering["port"]), "secret") == [{"id": "k1"}]  # type: ignore[call-overload]
