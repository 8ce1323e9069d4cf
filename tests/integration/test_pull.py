"""Pulling a missing image through a real registry on 127.0.0.1 (never a public one).

The test image is pushed to a local `docker-registry` under a fresh tag, and that tag is removed
locally: its layers stay shared with the test image, so the pull is quick, but the engine still
resolves the tag through the registry API.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiodocker
import pytest

from ipybox import ExecutionClient, ExecutionContainer, ImageNotFoundError
from tests.integration.conftest import SESSION_ID, SESSION_LABEL, session_labels

REGISTRY_BIN = Path("/usr/bin/docker-registry")
REGISTRY_STARTUP_TIMEOUT = 15.0
REPOSITORY = "ipybox-pull-test"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until_serving(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + REGISTRY_STARTUP_TIMEOUT
    while True:
        if process.poll() is not None:
            pytest.fail(f"docker-registry exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(
                f"docker-registry did not answer on 127.0.0.1:{port} within {REGISTRY_STARTUP_TIMEOUT}s:\n"
                f"{log.read_text(errors='replace')}"
            )
        time.sleep(0.1)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A registry server on 127.0.0.1; yields its address as `localhost:PORT` (plain HTTP for Docker)."""
    if not REGISTRY_BIN.exists():
        pytest.fail(f"{REGISTRY_BIN} missing; run the tests with scripts/test (it installs docker-registry)")
    root = tmp_path_factory.mktemp("registry")
    port = _free_port()
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n"
        "  level: warn\n"
        "storage:\n"
        "  filesystem:\n"
        f"    rootdirectory: {root / 'data'}\n"
        "  delete:\n"
        "    enabled: true\n"
        "http:\n"
        f"  addr: 127.0.0.1:{port}\n"
    )
    log = root / "registry.log"
    process: subprocess.Popen[bytes] | None = None
    try:
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                [str(REGISTRY_BIN), "serve", str(config)], stdout=log_file, stderr=subprocess.STDOUT
            )
        _wait_until_serving(process, port, log)
        yield f"localhost:{port}"
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def docker() -> AsyncIterator[aiodocker.Docker]:
    docker = aiodocker.Docker()
    try:
        yield docker
    finally:
        await docker.close()


async def _remove_tag(docker: aiodocker.Docker, tag: str) -> None:
    """Untag `tag` locally; the image stays while other tags (the test image) refer to it."""
    try:
        await docker.images.delete(tag, noprune=True)
    except aiodocker.DockerError as exc:
        if exc.status != 404:
            raise


async def _is_local(docker: aiodocker.Docker, tag: str) -> bool:
    try:
        await docker.images.inspect(tag)
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            return False
        raise
    return True


@pytest.fixture(scope="module")
async def pushed(registry: str, image: str) -> AsyncIterator[str]:
    """The test image pushed to the registry under a fresh tag, which is then removed locally."""
    name = f"{registry}/{REPOSITORY}"
    version = uuid.uuid4().hex
    tag = f"{name}:{version}"
    docker = aiodocker.Docker()
    try:
        await docker.images.tag(image, name, tag=version)
        events = await docker.images.push(name, tag=version)
        errors = [event["error"] for event in events if "error" in event]
        assert not errors, f"pushing {tag} failed: {errors}"
        await _remove_tag(docker, tag)
        yield tag
    finally:
        try:
            await _remove_tag(docker, tag)
            assert await _is_local(docker, image), f"removing {tag} removed the test image {image}"
        finally:
            await docker.close()


async def _session_containers(docker: aiodocker.Docker, case: str) -> list[str]:
    filters = {"label": [f"{SESSION_LABEL}={SESSION_ID}", f"case={case}"]}
    return [c.id for c in await docker.containers.list(all=True, filters=filters)]


async def test_missing_image_is_pulled_with_progress_lines_on_stderr(
    pushed: str, docker: aiodocker.Docker, capfd: pytest.CaptureFixture[str]
) -> None:
    await _remove_tag(docker, pushed)
    assert not await _is_local(docker, pushed)
    try:
        async with ExecutionContainer(tag=pushed, show_pull_progress=True, labels=session_labels()) as container:
            async with ExecutionClient(port=container.executor_port) as client:
                result = await client.execute("print(1)")
        assert result.text == "1"
        assert await _is_local(docker, pushed)
    finally:
        await _remove_tag(docker, pushed)
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert f"ipybox: pulling {pushed}" in lines
    assert f"ipybox: pulled {pushed}" in lines
    assert lines.index(f"ipybox: pulling {pushed}") < lines.index(f"ipybox: pulled {pushed}")
    assert "ipybox:" not in out  # stdout may be an MCP stdio stream


async def test_pull_without_progress_prints_nothing(
    pushed: str, docker: aiodocker.Docker, capfd: pytest.CaptureFixture[str]
) -> None:
    await _remove_tag(docker, pushed)
    capfd.readouterr()
    try:
        async with ExecutionContainer(tag=pushed, show_pull_progress=False, labels=session_labels()):
            assert await _is_local(docker, pushed)
    finally:
        await _remove_tag(docker, pushed)
    assert capfd.readouterr() == ("", "")


async def test_tag_missing_from_registry_names_the_build_command(
    registry: str, docker: aiodocker.Docker, capfd: pytest.CaptureFixture[str]
) -> None:
    tag = f"{registry}/{REPOSITORY}:missing-{uuid.uuid4().hex}"
    container = ExecutionContainer(tag=tag, show_pull_progress=True, labels=session_labels(case="pull-missing"))
    try:
        with pytest.raises(ImageNotFoundError, match=rf"ipybox build -t {tag}$") as excinfo:
            await container.run()
        assert excinfo.value.tag == tag
        assert await _session_containers(docker, "pull-missing") == []
        assert not await _is_local(docker, tag)
    finally:
        await container.kill()
        await _remove_tag(docker, tag)
    _, err = capfd.readouterr()
    assert f"ipybox: pulled {tag}" not in err
