"""Fixtures for tests against a real Docker engine and the ipybox test image.

`scripts/test` provides both. Without them these tests fail (not skip): a green run must mean the
sandbox was really exercised.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiodocker
import pytest

from ipybox import DEFAULT_TAG, ExecutionClient, ExecutionContainer
from ipybox._labels import CONTAINER_LABEL

pytestmark = pytest.mark.integration

TEST_IMAGE = os.environ.get("IPYBOX_TEST_IMAGE", DEFAULT_TAG)
SESSION_LABEL = "ai.gradion.ipybox.test-session"
SESSION_ID = uuid.uuid4().hex


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def image() -> str:
    return TEST_IMAGE


@pytest.fixture(scope="session", autouse=True)
async def _engine_and_image_present() -> AsyncIterator[None]:
    try:
        docker = aiodocker.Docker()
    except ValueError:
        pytest.fail("no Docker engine answers; run the tests with scripts/test")
    try:
        await docker.images.inspect(TEST_IMAGE)
    except aiodocker.DockerError:
        pytest.fail(f"test image {TEST_IMAGE} missing; run the tests with scripts/test")
    finally:
        await docker.close()
    yield
    # Nothing a test started may survive the session.
    docker = aiodocker.Docker()
    try:
        leftovers = await docker.containers.list(all=True, filters={"label": [f"{SESSION_LABEL}={SESSION_ID}"]})
        for container in leftovers:
            try:
                await container.delete(force=True)
            except aiodocker.DockerError as exc:  # 409: a removal already in progress; go on with the rest
                if exc.status != 409:
                    raise
        assert not leftovers, f"{len(leftovers)} test container(s) were left behind"
    finally:
        await docker.close()


def session_labels(**extra: str) -> dict[str, str]:
    return {SESSION_LABEL: SESSION_ID, **extra}


ContainerFactory = Callable[..., Awaitable[ExecutionContainer]]


@pytest.fixture
async def make_container(image: str) -> AsyncIterator[ContainerFactory]:
    """Starts containers with the test image and session label; kills every one afterwards."""
    started: list[ExecutionContainer] = []

    async def make(**kwargs: Any) -> ExecutionContainer:
        kwargs.setdefault("tag", image)
        kwargs["labels"] = {**session_labels(), **kwargs.get("labels", {})}
        container = ExecutionContainer(**kwargs)
        started.append(container)
        await container.run()
        return container

    try:
        yield make
    finally:
        for container in started:
            await container.kill()


PLAIN_SERVER = """
import socket
server = socket.create_server(("0.0.0.0", 8080))
while True:
    conn, _ = server.accept()
    conn.sendall(b"hello-plain\\n")
    conn.close()
"""


@pytest.fixture
async def plain_server(image: str) -> AsyncIterator[str]:
    """A container that is not a sandbox, on the default bridge, greeting `hello-plain` on port 8080;
    yields its address."""
    docker = aiodocker.Docker()
    container = await docker.containers.create(
        {
            "Image": image,
            "User": "0:0",
            "Entrypoint": ["/opt/ipybox/venv/bin/python", "-c", PLAIN_SERVER],
            "Labels": session_labels(),
        }
    )
    try:
        await container.start()
        yield str((await container.show())["NetworkSettings"]["IPAddress"])
    finally:
        await container.delete(force=True)
        await docker.close()


@pytest.fixture(scope="module")
async def shared_container(image: str) -> AsyncIterator[ExecutionContainer]:
    """One container for a module's tests that only need a fresh kernel each."""
    async with ExecutionContainer(tag=image, labels=session_labels()) as container:
        yield container


@pytest.fixture
async def client(shared_container: ExecutionContainer) -> AsyncIterator[ExecutionClient]:
    async with ExecutionClient(port=shared_container.executor_port) as client:
        yield client


__all__ = ["CONTAINER_LABEL", "ContainerFactory", "session_labels"]
