"""Reattach from another process, the gateway's kernel listing, `ipybox ps`, `ipybox pause|resume`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ipybox import ContainerError, ExecutionClient, ExecutionContainer, RequestRefusedError, _tokens

from .conftest import ContainerFactory

IPYBOX = [sys.executable, "-m", "ipybox"]

CHILD = """
import asyncio, sys
from ipybox import ExecutionClient, ExecutionContainer

async def main():
    container = await ExecutionContainer.attach(sys.argv[1])
    try:
        kernels = await container.kernel_ids()
        assert sys.argv[2] in kernels, kernels
        async with ExecutionClient(port=container.executor_port, kernel_id=sys.argv[2]) as client:
            print((await client.execute("x += 1; print(x)")).text)
            await client.disconnect(shutdown=False)
        async with ExecutionClient(port=container.executor_port) as other:  # a new kernel: no x there
            print((await other.execute("print('x' in dir())")).text)
    finally:
        await container.detach()

asyncio.run(main())
"""


async def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1"}
    return await asyncio.to_thread(subprocess.run, [*args], capture_output=True, text=True, timeout=timeout, env=env)


async def test_a_second_process_attaches_to_a_running_kernel(make_container: ContainerFactory) -> None:
    container = await make_container(memory_limit="1g")
    client = ExecutionClient(port=container.executor_port)
    await client.connect()
    await client.execute("x = 41")
    kernel_id = client.kernel_id
    await client.disconnect(shutdown=False)  # the kernel stays, with x
    assert await container.kernel_ids() == [kernel_id]

    done = await _run(sys.executable, "-c", CHILD, (container.container_id or "")[:12], kernel_id)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["42", "False"]

    # The child's detach() left the sandbox and this kernel running; its new kernel is gone.
    assert await container.kernel_ids() == [kernel_id]
    async with ExecutionClient(port=container.executor_port, kernel_id=kernel_id) as again:
        assert (await again.execute("print(x)")).text == "42"
    assert await container.kernel_ids() == []  # disconnect() shuts it down by default


async def test_attach_refuses_what_it_cannot_attach_to(make_container: ContainerFactory, tmp_path: Path) -> None:
    with pytest.raises(ContainerError, match="no container"):
        await ExecutionContainer.attach("ipybox-no-such-sandbox")
    container = await make_container(memory_limit="1g")
    with pytest.raises(RequestRefusedError) as caught:
        await ExecutionClient(port=container.executor_port, kernel_id="0" * 8).connect()
    assert caught.value.status == 404
    # Another user's sandbox: no secret recorded where this user keeps them.
    other = tmp_path / "other-user"
    old = os.environ.get("IPYBOX_RUNTIME_DIR")
    os.environ["IPYBOX_RUNTIME_DIR"] = str(other)
    try:
        with pytest.raises(ContainerError, match="no secret"):
            await ExecutionContainer.attach(container.container_id or "")
    finally:
        if old is None:
            del os.environ["IPYBOX_RUNTIME_DIR"]
        else:
            os.environ["IPYBOX_RUNTIME_DIR"] = old


async def test_an_attached_container_is_killed_like_its_own(make_container: ContainerFactory) -> None:
    container = await make_container(memory_limit="1g")
    container_id = container.container_id or ""
    attached = await ExecutionContainer.attach(container_id)
    assert attached.executor_port == container.executor_port
    assert not attached.paused
    await attached.kill()
    assert _tokens.container_token(container_id) is None  # both names of the record are gone
    assert not (_tokens.token_dir() / f"{container_id}.token").exists()


async def test_ps_pause_and_resume(make_container: ContainerFactory) -> None:
    running = await make_container(memory_limit="1g")
    paused = await make_container(memory_limit="1g")
    async with ExecutionClient(port=running.executor_port) as client:
        await client.execute("x = 1")

        done = await _run(*IPYBOX, "pause", (paused.container_id or "")[:12])
        assert done.returncode == 0, done.stderr
        assert paused.paused

        done = await _run(*IPYBOX, "ps", "--json")
        assert done.returncode == 0, done.stderr
        rows = {row["id"]: row for row in json.loads(done.stdout)}
        mine = rows[running.container_id or ""]
        assert mine["state"] == "running"
        assert mine["kernels"] == 1
        assert mine["idle"] is not None and mine["idle"] < 60
        assert mine["age"] is not None and mine["memory"] > 10 * 2**20
        assert mine["executor_port"] == running.executor_port
        frozen = rows[paused.container_id or ""]
        assert frozen["state"] == "paused"
        assert frozen["kernels"] is None and frozen["idle"] is None
        assert frozen["memory"] > 10 * 2**20

        done = await _run(*IPYBOX, "ps")
        assert done.returncode == 0, done.stderr
        lines = {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:]}
        assert lines[(paused.container_id or "")[:12]][6] == "paused"
        assert lines[(running.container_id or "")[:12]][6:8] == ["running", "1"]

        done = await _run(*IPYBOX, "resume", paused.container_id or "")
        assert done.returncode == 0, done.stderr
        assert not paused.paused
        async with ExecutionClient(port=paused.executor_port) as other:
            assert (await other.execute("print(2)")).text == "2"

        done = await _run(*IPYBOX, "pause", "ipybox-no-such-sandbox")
        assert done.returncode == 1
        assert "no container" in done.stderr
