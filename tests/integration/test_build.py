"""build_image against the real engine: labels, user, dependencies, and a fully cached rebuild.

Builds from LOCAL_BASE_IMAGE (never pulls) to a unique tag that is removed afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiodocker
import pytest

from ipybox._build import LOCAL_BASE_IMAGE, BuildEvent, build_image
from ipybox._labels import GID_LABEL, IMAGE_LABEL, UID_LABEL, VERSION_LABEL
from ipybox._version import __version__

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session", autouse=True)
async def _engine_and_image_present() -> AsyncIterator[None]:
    """Replaces the package's check: this module needs an engine, but builds its own image."""
    try:
        docker = aiodocker.Docker()
    except ValueError:
        pytest.skip("no Docker engine answers")
    try:
        await docker.version()
    except aiodocker.DockerError:
        pytest.skip("no Docker engine answers")
    finally:
        await docker.close()
    yield


@pytest.fixture
async def docker() -> AsyncIterator[aiodocker.Docker]:
    client = aiodocker.Docker()
    try:
        yield client
    finally:
        await client.close()


@dataclass
class Built:
    tag: str
    image_id: str
    events: list[BuildEvent]
    dependencies: Path


@pytest.fixture
async def built(docker: aiodocker.Docker, tmp_path: Path) -> AsyncIterator[Built]:
    tag = f"ipybox-test-build-{uuid.uuid4().hex[:12]}"
    dependencies = tmp_path / "deps.txt"
    dependencies.write_text('dependencies = [\n    "six",  # tiny and pure-python\n]\n')
    events: list[BuildEvent] = []
    try:
        image_id = await build_image(
            tag, dependencies=dependencies, base_image=LOCAL_BASE_IMAGE, on_progress=events.append
        )
        yield Built(tag, image_id, events, dependencies)
    finally:
        try:
            await docker.images.delete(tag, force=True)
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise


async def run_in(docker: aiodocker.Docker, image: str, script: str) -> str:
    container = await docker.containers.create({"Image": image, "Cmd": ["sh", "-c", script]})
    try:
        await container.start()
        result = await container.wait()
        output = "".join(await container.log(stdout=True, stderr=True))
        assert result["StatusCode"] == 0, output
        return output
    finally:
        await container.delete(force=True)


def expected_ids() -> tuple[int, int]:
    uid, gid = os.getuid(), os.getgid()
    return (1000, 1000) if uid == 0 or gid == 0 else (uid, gid)


async def test_built_image(docker: aiodocker.Docker, built: Built) -> None:
    uid, gid = expected_ids()
    info = await docker.images.inspect(built.tag)
    assert info["Id"] == built.image_id
    assert info["Config"]["Labels"] == {
        IMAGE_LABEL: "true",
        VERSION_LABEL: __version__,
        UID_LABEL: str(uid),
        GID_LABEL: str(gid),
    }
    assert info["Config"]["User"] == f"{uid}:{gid}"
    assert any(e.stage == "build" and e.step == e.total for e in built.events)

    output = await run_in(
        docker,
        built.tag,
        "id -u; id -g; python -c 'import six; print(six.__name__)'; stat -c '%u:%g %a' /app /run/ipybox; "
        "python -I -c 'import ipybox_server; print(ipybox_server.__file__)'",
    )
    assert output.split() == [
        str(uid),
        str(gid),
        "six",
        f"{uid}:{gid}",
        "755",
        f"{uid}:{gid}",
        "700",
        "/opt/ipybox/lib/ipybox_server/__init__.py",
    ]


async def test_two_environments_and_tools(docker: aiodocker.Docker, built: Built) -> None:
    uid, _ = expected_ids()
    output = await run_in(
        docker,
        built.tag,
        # ipybox's environment: 65534's, without pip or ipykernel; the user's: the sandbox user's, on PATH,
        # with the -d dependencies; the tools on PATH.
        "stat -c %u /opt/ipybox/venv /opt/ipybox/venv/bin/python /opt/ipybox/user-venv /opt/ipybox/lib; "
        '/opt/ipybox/venv/bin/python -I -c \'import importlib.util as u; print(u.find_spec("pip"), '
        'u.find_spec("ipykernel"), u.find_spec("kernel_gateway") is not None)\'; '
        "command -v python; command -v pip; "
        "python -c 'import six, ipykernel, mcp.server.fastmcp; print(six.__file__)'; "
        "for tool in uv uvx node npm npx; do command -v $tool; done; "
        "npm config get registry >/dev/null && node -e 'console.log(process.version.split(\".\")[0])'; "
        "cat /etc/ipybox/kernel-constraints.txt | grep -c '>='; "
        "grep -c constraint /etc/pip.conf /etc/uv/uv.toml; ls /etc/ipython",
    )
    assert output.split() == [
        "65534",
        "65534",
        str(uid),
        "65534",
        "None",
        "None",
        "True",
        "/opt/ipybox/user-venv/bin/python",
        "/opt/ipybox/user-venv/bin/pip",
        "/opt/ipybox/user-venv/lib/python3.11/site-packages/six.py",
        "/usr/local/bin/uv",
        "/usr/local/bin/uvx",
        "/usr/local/bin/node",
        "/usr/local/bin/npm",
        "/usr/local/bin/npx",
        "v24",
        "6",
        "/etc/pip.conf:1",
        "/etc/uv/uv.toml:1",
        "ipython_kernel_config.py",
    ]


async def test_unchanged_rebuild_is_fully_cached(built: Built) -> None:
    events: list[BuildEvent] = []
    image_id = await build_image(
        built.tag, dependencies=built.dependencies, base_image=LOCAL_BASE_IMAGE, on_progress=events.append
    )
    assert image_id == built.image_id
    assert not any("Running in" in e.message for e in events)
