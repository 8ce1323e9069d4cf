"""ExecutionContainer against a real engine: lifecycle, ports, binds, env, limits, images."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import aiodocker
import pytest

from ipybox import (
    ContainerStartError,
    ExecutionClient,
    ExecutionContainer,
    ImageError,
    ImageNotFoundError,
    ResourceClient,
)
from tests.integration.conftest import SESSION_ID, SESSION_LABEL, ContainerFactory, session_labels


async def _containers_of_session(**labels: str) -> list[str]:
    docker = aiodocker.Docker()
    try:
        wanted = [f"{SESSION_LABEL}={SESSION_ID}", *(f"{k}={v}" for k, v in labels.items())]
        return [c.id for c in await docker.containers.list(all=True, filters={"label": wanted})]
    finally:
        await docker.close()


async def _inspect(container_id: str) -> dict:  # type: ignore[type-arg]
    docker = aiodocker.Docker()
    try:
        return await (await docker.containers.get(container_id)).show()  # type: ignore[no-any-return]
    finally:
        await docker.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_lifecycle_run_kill_idempotent(image: str) -> None:
    container = ExecutionContainer(tag=image, labels=session_labels(case="lifecycle"))
    await container.run()
    try:
        assert await _containers_of_session(case="lifecycle") == [container.container_id]
        with pytest.raises(RuntimeError, match="new ExecutionContainer"):
            await container.run()
    finally:
        await container.kill()
    await container.kill()  # a second kill is harmless
    assert await _containers_of_session(case="lifecycle") == []
    assert container.container_id is None


async def test_context_manager_serves_both_ports(image: str) -> None:
    async with ExecutionContainer(tag=image, labels=session_labels(case="ctx")) as container:
        assert container.executor_port != container.resource_port
        async with ExecutionClient(port=container.executor_port) as client:
            assert (await client.execute("print('ok')")).text == "ok"
        async with ResourceClient(port=container.resource_port) as resources:
            assert (await resources.status())["status"] == "ok"
    assert await _containers_of_session(case="ctx") == []


async def test_failed_start_removes_everything(image: str) -> None:
    container = ExecutionContainer(tag=image, labels=session_labels(case="failed"), startup_timeout=0.01)
    with pytest.raises(ContainerStartError, match="startup_timeout"):
        async with container:
            pass
    assert await _containers_of_session(case="failed") == []


async def test_ports_are_on_loopback_and_explicit_ports_are_used(make_container: ContainerFactory) -> None:
    executor_port, resource_port = _free_port(), _free_port()
    container = await make_container(executor_port=executor_port, resource_port=resource_port)
    assert (container.executor_port, container.resource_port) == (executor_port, resource_port)
    info = await _inspect(container.container_id or "")
    bindings = info["HostConfig"]["PortBindings"]
    assert {b[0]["HostIp"] for b in bindings.values()} == {"127.0.0.1"}
    async with ExecutionClient(port=executor_port) as client:
        assert (await client.execute("print(2)")).text == "2"


async def test_binds_env_and_created_host_dirs(make_container: ContainerFactory, tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "input.txt").write_text("from host")
    os.chmod(existing, 0o777)  # the sandbox user may differ from the test's user
    created = tmp_path / "created" / "nested"  # does not exist yet: ipybox creates it
    container = await make_container(
        binds={str(existing): "data", str(created): "out/results"}, env={"GREETING": "hello"}
    )
    assert created.is_dir()
    async with ExecutionClient(port=container.executor_port) as client:
        result = await client.execute(
            "import os\n"
            "print(open('/app/data/input.txt').read())\n"
            "open('/app/out/results/written.txt', 'w').write('from sandbox')\n"
            "print(os.environ['GREETING'])"
        )
    assert result.text == "from host\nhello"
    assert (created / "written.txt").read_text() == "from sandbox"


async def test_relative_host_bind_path(make_container: ContainerFactory, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    container = await make_container(binds={"rel/dir": "rel"})
    async with ExecutionClient(port=container.executor_port) as client:
        await client.execute("open('/app/rel/f.txt', 'w').write('x')")
    assert (tmp_path / "rel" / "dir" / "f.txt").read_text() == "x"


async def test_limits_and_labels_applied(make_container: ContainerFactory) -> None:
    container = await make_container(memory_limit="512m", cpu_limit=1, pids_limit=256, labels={"team": "agents"})
    info = await _inspect(container.container_id or "")
    host_config = info["HostConfig"]
    assert host_config["Memory"] == 512 * 2**20
    assert host_config["MemorySwap"] == 512 * 2**20
    assert host_config["NanoCpus"] == 1_000_000_000
    assert host_config["PidsLimit"] == 256
    assert host_config["Init"] is True
    assert info["Config"]["Labels"]["team"] == "agents"
    assert info["Config"]["Labels"]["ai.gradion.ipybox.container"] == "true"


async def test_sandbox_runs_as_unprivileged_user_in_app(make_container: ContainerFactory) -> None:
    container = await make_container()
    async with ExecutionClient(port=container.executor_port) as client:
        result = await client.execute("import os\nprint(os.getuid(), os.getgid(), os.getcwd())")
    uid, gid, cwd = (result.text or "").split()
    expected_uid = os.getuid() or 1000
    assert (int(uid), cwd) == (expected_uid, "/app")
    assert int(gid) != 0


async def test_missing_image_names_the_build_command() -> None:
    # A registry on a closed local port: the pull fails at once and nothing leaves this machine.
    tag = "localhost:1/ipybox-missing:nope"
    container = ExecutionContainer(tag=tag, labels=session_labels(case="missing"), show_pull_progress=False)
    with pytest.raises(ImageNotFoundError, match=r"ipybox build -t localhost:1/ipybox-missing:nope"):
        await container.run()
    assert await _containers_of_session(case="missing") == []


async def test_foreign_image_is_refused() -> None:
    container = ExecutionContainer(tag="ipybox/debian-base:bookworm", labels=session_labels(case="foreign"))
    with pytest.raises(ImageError, match="not built by `ipybox build`"):
        await container.run()
    assert await _containers_of_session(case="foreign") == []


async def test_many_containers_get_distinct_ports(make_container: ContainerFactory) -> None:
    containers = [await make_container() for _ in range(3)]
    ports = {p for c in containers for p in (c.executor_port, c.resource_port)}
    assert len(ports) == 6
