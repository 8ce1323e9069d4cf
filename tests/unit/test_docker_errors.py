from collections.abc import AsyncIterator

import aiodocker
import pytest
from aiohttp import web

from ipybox import ContainerError, DockerUnavailableError, ExecutionContainer
from ipybox._docker import docker_errors


def test_cannot_connect_becomes_docker_unavailable() -> None:
    with pytest.raises(DockerUnavailableError, match="engine start"):
        with docker_errors("starting"):
            raise aiodocker.DockerError(900, "Cannot connect to Docker engine")


def test_api_error_becomes_container_error_with_context() -> None:
    with pytest.raises(ContainerError, match=r"container 0123456789ab: starting failed: boom \(HTTP 500\)") as info:
        with docker_errors("starting", "0123456789abcdef"):
            raise aiodocker.DockerError(500, "boom")
    assert isinstance(info.value.__cause__, aiodocker.DockerError)


async def test_run_without_an_engine_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-such.sock")
    container = ExecutionContainer(show_pull_progress=False)
    with pytest.raises(DockerUnavailableError, match="Docker engine"):
        await container.run()
    await container.kill()  # nothing was started; still safe


async def _serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"tcp://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def not_an_engine() -> AsyncIterator[str]:
    """An HTTP server on 127.0.0.1 that answers 404 to everything, as DOCKER_HOST would name it."""
    async for url in _serve(web.Application()):
        yield url


@pytest.fixture
async def web_page() -> AsyncIterator[str]:
    """An HTTP server on 127.0.0.1 that answers every request with 200 and a web page."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<html>hello</html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", page)
    async for url in _serve(app):
        yield url


async def test_docker_host_that_is_not_an_engine_is_named(monkeypatch: pytest.MonkeyPatch, not_an_engine: str) -> None:
    monkeypatch.setenv("DOCKER_HOST", not_an_engine)
    container = ExecutionContainer(show_pull_progress=False)
    try:
        with pytest.raises(DockerUnavailableError) as info:
            await container.run()
    finally:
        await container.kill()
    message = str(info.value)
    assert f"DOCKER_HOST={not_an_engine} is not a Docker engine" in message
    assert "GET /version answered HTTP 404" in message
    assert "pulled" not in message  # nothing was wrong with the image
    assert "unset DOCKER_HOST" in message


async def test_docker_host_answering_web_pages_is_named(monkeypatch: pytest.MonkeyPatch, web_page: str) -> None:
    monkeypatch.setenv("DOCKER_HOST", web_page)
    container = ExecutionContainer(show_pull_progress=False)
    try:
        with pytest.raises(DockerUnavailableError, match=f"DOCKER_HOST={web_page} is not a Docker engine"):
            await container.run()
    finally:
        await container.kill()


async def test_other_commands_against_a_non_engine_name_it(monkeypatch: pytest.MonkeyPatch, not_an_engine: str) -> None:
    from ipybox._cleanup import remove_containers
    from ipybox._run import image_present

    monkeypatch.setenv("DOCKER_HOST", not_an_engine)
    with pytest.raises(DockerUnavailableError, match="not a Docker engine"):
        await remove_containers()  # ipybox cleanup
    with pytest.raises(DockerUnavailableError, match="not a Docker engine"):
        await image_present("gradion-ai/ipybox")  # ipybox run: not "image missing"
