"""A firewall helper that fails in any way leaves the sandbox without network, or removes it.

The helper container is replaced by one that fails before its lock-down could take effect (as an image
without the helper module, an out-of-memory kill, a hang past the helper's timeout, or the engine
refusing to create it would), and the sandbox must not reach anything afterwards; the error says which
of the two happened. Nothing leaves the machine: the peer is a container of this test.
"""

from __future__ import annotations

from typing import Any

import aiodocker
import pytest
from aiodocker.containers import DockerContainers

from ipybox import ExecutionClient, ExecutionContainer, FirewallError, IpyboxError, _firewall
from tests.integration.conftest import ContainerFactory, session_labels

PROBE = """
import socket
def probe(host, port):
    try:
        with socket.create_connection((host, port), timeout=3) as s:
            return s.recv(16).decode().strip()
    except OSError as e:
        return type(e).__name__
"""

FAILURES: dict[str, list[str] | None] = {
    "exit-1": ["/bin/sh", "-c", "echo 'No module named ipybox_server.firewall' >&2; exit 1"],
    "oom-killed": ["/bin/sh", "-c", "exit 137"],  # what Docker reports for a kernel OOM kill
    "no-summary": ["/bin/true"],  # exits 0 without saying what it applied
    "timeout": ["/bin/sleep", "120"],
    "create-error": None,  # the engine refuses to create the helper
}


def _is_helper(config: dict[str, Any]) -> bool:
    return str((config.get("HostConfig") or {}).get("NetworkMode", "")).startswith("container:")


def break_helper(monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    create = DockerContainers.create

    async def failing_create(self: DockerContainers, config: dict[str, Any], **kwargs: Any) -> Any:
        if _is_helper(config):
            entrypoint = FAILURES[failure]
            if entrypoint is None:
                raise aiodocker.DockerError(500, {"message": "no space left on device"})
            config = {**config, "Entrypoint": entrypoint, "Cmd": []}
        return await create(self, config, **kwargs)

    monkeypatch.setattr(DockerContainers, "create", failing_create)
    monkeypatch.setattr(_firewall, "HELPER_TIMEOUT", 3.0)


async def _networks(container_id: str) -> dict[str, Any] | None:
    """The container's networks, or None when it no longer exists."""
    docker = aiodocker.Docker()
    try:
        info = await (await docker.containers.get(container_id)).show()
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            return None
        raise
    finally:
        await docker.close()
    return dict((info.get("NetworkSettings") or {}).get("Networks") or {})


@pytest.mark.parametrize("failure", list(FAILURES))
async def test_a_failed_helper_leaves_no_network(
    make_container: ContainerFactory, plain_server: str, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    container: ExecutionContainer = await make_container()
    assert container.container_id is not None
    async with ExecutionClient(port=container.executor_port) as client:
        await client.execute(PROBE)
        for _ in range(50):  # the peer may still be starting
            if (await client.execute(f"print(probe({plain_server!r}, 8080))")).text == "hello-plain":
                break
        else:
            pytest.fail("the peer never answered before the firewall")

        break_helper(monkeypatch, failure)
        with pytest.raises(FirewallError) as info:
            await container.init_firewall([])
        message = str(info.value)

        networks = await _networks(container.container_id)
        if networks is None:
            assert "removed" in message, message
            return
        assert "disconnected" in message, f"the error must say what became of the sandbox: {message}"
        assert networks == {}, f"the sandbox is still on {sorted(networks)}: {message}"
    # A client on this machine still reaches a kernel (over the unix socket: the open client may have
    # been on the container's address, which is gone), and the kernel reaches nothing.
    async with ExecutionClient(port=container.executor_port) as client:
        await client.execute(PROBE)
        assert (await client.execute(f"print(probe({plain_server!r}, 8080))")).text != "hello-plain"


async def test_a_sandbox_that_cannot_be_isolated_is_not_started(image: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The start-time helper (isolation from other sandboxes) failing: run() fails, nothing is left."""
    break_helper(monkeypatch, "exit-1")
    container = ExecutionContainer(tag=image, labels=session_labels())
    with pytest.raises(IpyboxError) as info:
        await container.run()
    assert "isolat" in str(info.value), str(info.value)
    docker = aiodocker.Docker()
    try:
        labels = [f"{key}={value}" for key, value in session_labels().items()]
        left = [item.id for item in await docker.containers.list(all=True, filters={"label": labels})]
        assert container.container_id is None or container.container_id not in left
    finally:
        await docker.close()
