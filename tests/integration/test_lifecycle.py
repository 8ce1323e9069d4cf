"""Nothing left behind: sandboxes that end themselves (idle timeout, max lifetime, owner death); and
what is meant to stay behind: a workspace volume.

Each sandbox here is started by the `make_container` factory (which kills it afterwards: a kill of a
sandbox that already removed itself must be silent) or by an owner subprocess under the session label
(the session's final sweep fails on any leftover).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid

import aiodocker
import pytest

from ipybox import ContainerError, ExecutionClient, ExecutionContainer, IpyboxError, SandboxPool
from ipybox._labels import EXPIRES_LABEL, IDLE_TIMEOUT_LABEL, MAX_LIFETIME_LABEL, OWNER_LABEL, WORKSPACE_LABEL

from .conftest import ContainerFactory, session_labels

OWNER = r"""
import asyncio, json, sys, time
from ipybox import ExecutionContainer

async def main():
    labels = json.loads(sys.argv[2])
    container = ExecutionContainer(sys.argv[1], labels=labels, owner_bound=True, owner_grace=3)
    await container.run()
    print("READY", container.container_id, flush=True)
    if sys.argv[3] == "block":
        time.sleep(20)  # the event loop is blocked: the lease must hold regardless
        print("UNBLOCKED", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def exists(container_id: str) -> bool:
    docker = aiodocker.Docker()
    try:
        await docker.containers.get(container_id)
        return True
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            return False
        raise
    finally:
        await docker.close()


async def gone_after(container_id: str, timeout: float) -> float:
    """Seconds until the container no longer exists (fails after `timeout`)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not await exists(container_id):
            return time.monotonic() - start
        await asyncio.sleep(0.1)
    pytest.fail(f"container {container_id[:12]} still exists {timeout} s later")


async def inspect(container_id: str) -> dict:  # type: ignore[type-arg]
    docker = aiodocker.Docker()
    try:
        return await (await docker.containers.get(container_id)).show()  # type: ignore[no-any-return]
    finally:
        await docker.close()


async def start_owner(image: str, mode: str) -> tuple[asyncio.subprocess.Process, str]:
    import json

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        OWNER,
        image,
        json.dumps(session_labels()),
        mode,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 60)
    assert line.startswith(b"READY "), line
    return process, line.split()[1].decode()


async def test_owner_sigkilled_removes_the_sandbox(image: str) -> None:
    process, container_id = await start_owner(image, "wait")
    try:
        labels = (await inspect(container_id))["Config"]["Labels"]
        assert labels[OWNER_LABEL].split(":")[1] == str(process.pid)
        await asyncio.sleep(4)  # longer than the grace: the lease holds while the owner lives
        assert await exists(container_id)
        process.send_signal(signal.SIGKILL)
        await process.wait()
        elapsed = await gone_after(container_id, 3 + 5)
        print(f"\nowner SIGKILLed: sandbox gone after {elapsed:.2f} s (owner_grace 3 s)")
        assert elapsed >= 2.5
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_owner_with_a_blocked_event_loop_keeps_its_sandbox(image: str) -> None:
    process, container_id = await start_owner(image, "block")
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 40)
        assert line.strip() == b"UNBLOCKED"
        assert await exists(container_id)  # 20 s blocked, grace 3 s: not taken for dead
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    await gone_after(container_id, 3 + 5)


async def test_attach_takes_a_lease_of_its_own(image: str) -> None:
    process, container_id = await start_owner(image, "wait")
    attached = await ExecutionContainer.attach(container_id)
    try:
        assert attached.owner_bound
        process.send_signal(signal.SIGKILL)
        await process.wait()
        await asyncio.sleep(3 + 3)  # past the grace: the attached process holds a lease
        assert await exists(container_id)
        await attached.detach()  # the last lease goes: the grace runs out, the sandbox goes
        await gone_after(container_id, 3 + 5)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await attached.kill()


async def test_idle_timeout_removes_an_unused_sandbox(make_container: ContainerFactory) -> None:
    start = time.monotonic()
    container = await make_container(idle_timeout=3)
    container_id = container.container_id
    assert container_id is not None
    assert (await inspect(container_id))["Config"]["Labels"][IDLE_TIMEOUT_LABEL] == "3"
    elapsed = await gone_after(container_id, 15)
    assert time.monotonic() - start >= 3
    print(f"\nidle_timeout 3 s: gone {elapsed:.2f} s after the start returned")
    await container.kill()  # already removed by the engine: silent


async def test_a_pool_arms_the_idle_timeout_at_hand_out(image: str) -> None:
    # Spares wait longer than the idle timeout and are still handed out alive; once handed out, an
    # unused sandbox removes itself. Before: SandboxPool refused idle_timeout (ValueError).
    async with SandboxPool(1, tag=image, labels=session_labels(), idle_timeout=3) as pool:
        await pool.wait_ready(timeout=60)
        await asyncio.sleep(6)
        sandbox = await pool.acquire()
        try:
            assert sandbox.container.idle_timeout == 3
            assert (await sandbox.client.execute("print('alive')")).text == "alive"
            container_id = sandbox.container.container_id
            assert container_id is not None
            await sandbox.client.disconnect()
            await gone_after(container_id, 15)
        finally:
            await sandbox.close()


async def test_a_sandbox_in_use_is_not_idle(make_container: ContainerFactory) -> None:
    container = await make_container(idle_timeout=3)
    assert container.container_id is not None
    async with ExecutionClient(port=container.executor_port) as client:
        for i in range(8):  # a cell every second for 8 s
            assert (await client.execute(f"print({i})")).text == str(i)
            await asyncio.sleep(1)
        # A silent long cell: the kernel is busy, which is not idle.
        await client.execute("import time; time.sleep(7)", timeout=30)
        assert await exists(container.container_id)
    await gone_after(container.container_id, 15)


async def test_a_pause_is_not_idle_time(make_container: ContainerFactory) -> None:
    container = await make_container(idle_timeout=4)
    assert container.container_id is not None
    await container.pause()
    await asyncio.sleep(8)
    await container.resume()
    await asyncio.sleep(1)
    assert await exists(container.container_id)  # 8 s paused, ~1 s awake: not idle yet
    await gone_after(container.container_id, 15)


async def test_max_lifetime_removes_a_busy_sandbox(make_container: ContainerFactory) -> None:
    start = time.monotonic()
    container = await make_container(max_lifetime=6)
    assert container.container_id is not None
    labels = (await inspect(container.container_id))["Config"]["Labels"]
    assert labels[MAX_LIFETIME_LABEL] == "6"
    assert abs(float(labels[EXPIRES_LABEL]) - (time.time() + 6)) < 10
    started = time.monotonic() - start
    removal = asyncio.create_task(gone_after(container.container_id, 30))
    with pytest.raises(IpyboxError):  # the sandbox goes away under the client
        async with ExecutionClient(port=container.executor_port) as client:
            while time.monotonic() - start < 30:
                await client.execute("print(1)")
                await asyncio.sleep(0.5)
    removed = started + await removal
    print(f"\nmax_lifetime 6 s, in use: run() took {started:.2f} s, gone {removed:.2f} s after run() began")
    assert 6 <= removed < 20
    await container.kill()


async def test_default_sandboxes_are_not_affected(make_container: ContainerFactory) -> None:
    container = await make_container()
    assert container.container_id is not None
    info = await inspect(container.container_id)
    assert not info["HostConfig"].get("AutoRemove")
    env = info["Config"]["Env"]
    assert not [e for e in env if e.startswith(("IPYBOX_IDLE_TIMEOUT", "IPYBOX_MAX_LIFETIME", "IPYBOX_OWNER_GRACE"))]
    labels = info["Config"]["Labels"]
    assert not {IDLE_TIMEOUT_LABEL, MAX_LIFETIME_LABEL, EXPIRES_LABEL, OWNER_LABEL} & set(labels)
    assert container._lease is None
    await asyncio.sleep(3)
    assert await exists(container.container_id)


async def test_ipybox_run_is_owner_bound(image: str) -> None:
    """`ipybox run` SIGKILLed in the middle of a cell leaves no sandbox behind."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ipybox", "run", "--tag", image, "import time; time.sleep(120)"
    )
    docker = aiodocker.Docker()
    container_id = None
    try:
        deadline = time.monotonic() + 60
        while container_id is None and time.monotonic() < deadline:
            for container in await docker.containers.list(filters={"label": [OWNER_LABEL]}):
                info = await container.show()
                if info["Config"]["Labels"][OWNER_LABEL].split(":")[1] == str(process.pid):
                    container_id = str(info["Id"])
            await asyncio.sleep(0.2)
        assert container_id is not None, "ipybox run started no owner-bound sandbox"
        await asyncio.sleep(2)  # the lease is taken before run() returns; let the cell start
        process.send_signal(signal.SIGKILL)
        await process.wait()
        await gone_after(container_id, 10 + 5)  # the default owner_grace is 10 s
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if container_id is not None and await exists(container_id):
            await (await docker.containers.get(container_id)).delete(force=True)
        await docker.close()


async def test_workspace_outlives_its_sandbox_and_serves_one_at_a_time(make_container: ContainerFactory) -> None:
    name = f"ipybox-test-ws-{uuid.uuid4().hex[:12]}"
    docker = aiodocker.Docker()
    try:
        first = await make_container(workspace=name)
        volume = await (await docker.volumes.get(name)).show()
        assert volume["Labels"][WORKSPACE_LABEL] == "true"
        async with ExecutionClient(port=first.executor_port) as client:
            # A new volume is a copy of the image's /app: the sandbox user owns it and writes at once.
            result = await client.execute(
                "import os\nopen('/app/note.txt', 'w').write('kept')\nprint(os.stat('/app').st_uid == os.getuid())"
            )
            assert result.text == "True"
        with pytest.raises(ContainerError, match="in use by sandbox"):
            await make_container(workspace=name)
        await first.kill()
        await docker.volumes.get(name)  # kill() keeps the workspace
        second = await make_container(workspace=name)
        async with ExecutionClient(port=second.executor_port) as client:
            assert (await client.execute("print(open('/app/note.txt').read())")).text == "kept"
        await second.kill()
    finally:
        with contextlib.suppress(aiodocker.DockerError):
            await (await docker.volumes.get(name)).delete()
        await docker.close()


async def test_cleanup_stale_removes_a_paused_expired_sandbox(image: str, make_container: ContainerFactory) -> None:
    from ipybox._cleanup import remove_containers

    keep = await make_container()
    expired = await make_container(max_lifetime=4)
    await expired.pause()  # frozen: its watchdog cannot end it
    await asyncio.sleep(5)
    assert expired.container_id is not None and await exists(expired.container_id)
    removed = await remove_containers(image, stale=True)
    assert expired.container_id in removed
    assert keep.container_id not in removed
    assert keep.container_id is not None and await exists(keep.container_id)
    assert not await exists(expired.container_id)


async def test_racing_starts_on_one_workspace_let_exactly_one_through(image: str) -> None:
    # Each run() checks "no sandbox uses this volume" before it creates its container: without a lock
    # around check and create, three concurrent starts could all pass the check.
    name = f"ipybox-test-ws-{uuid.uuid4().hex[:12]}"
    containers = [ExecutionContainer(tag=image, labels=session_labels(), workspace=name) for _ in range(3)]
    docker = aiodocker.Docker()
    try:
        results = await asyncio.gather(*(container.run() for container in containers), return_exceptions=True)
        started = [result for result in results if result is None]
        refused = [result for result in results if isinstance(result, ContainerError)]
        assert len(started) == 1, results
        assert len(refused) == 2 and all("in use by sandbox" in str(error) for error in refused)
    finally:
        await asyncio.gather(*(container.kill() for container in containers), return_exceptions=True)
        with contextlib.suppress(aiodocker.DockerError):
            await (await docker.volumes.get(name)).delete()
        await docker.close()
