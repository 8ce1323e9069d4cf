"""Pause and resume with real containers: a cell running across a long pause, timeouts and heartbeats
that do not count frozen time, a raw `docker pause`, idempotence, resource transfers that wait."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import aiodocker
import pytest

from ipybox import ExecutionClient, InvalidStateError, ResourceClient
from ipybox._errors import ContainerError

from .conftest import ContainerFactory

PRINTING_CELL = "import time\nfor i in range(40):\n    print(i, flush=True)\n    time.sleep(0.1)"
LINES = [str(i) for i in range(40)]


async def test_a_running_cell_finishes_after_a_long_pause(
    make_container: ContainerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # heartbeat_interval=1: aiohttp's heartbeat closed the websocket 1.5 s into the pause, the re-open
    # against the frozen gateway gave up after its 10 s budget, and the cell ended in
    # ExecutionOutcomeUnknownError (the client was lost).
    container = await make_container(memory_limit="1g")
    async with ExecutionClient(port=container.executor_port, heartbeat_interval=1) as client:
        execution = await client.submit(PRINTING_CELL)
        waiting = asyncio.ensure_future(execution.result(timeout=20))
        await asyncio.sleep(1.0)
        caplog.set_level(logging.INFO, logger="ipybox")
        await container.pause()
        assert container.paused
        await asyncio.sleep(30)
        await container.resume()
        assert not container.paused
        result = await asyncio.wait_for(waiting, 30)
        assert result.text.split() == LINES
        assert not result.truncated
        assert not [r for r in caplog.records if "re-opened" in r.getMessage() or "no answer" in r.getMessage()]
        assert client.healthy
        assert (await client.execute("print('next')")).text == "next"


async def test_a_timeout_does_not_count_while_paused(make_container: ContainerFactory) -> None:
    # The 5 s timeout would pass during the 7 s pause: the old client interrupted the kernel at resume.
    container = await make_container(memory_limit="1g")
    async with ExecutionClient(port=container.executor_port) as client:
        code = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0:\n    pass\nprint('done')"
        execution = await client.submit(code)
        waiting = asyncio.ensure_future(execution.result(timeout=5))
        await asyncio.sleep(0.5)
        await container.pause()
        await asyncio.sleep(7)
        await container.resume()
        result = await asyncio.wait_for(waiting, 30)
        assert result.text == "done"


async def test_a_pause_outside_ipybox_is_seen_too(make_container: ContainerFactory) -> None:
    # `docker pause` behind ipybox's back: the freezer says so, heartbeats and the timeout wait.
    container = await make_container(memory_limit="1g")
    docker = aiodocker.Docker()
    try:
        raw = await docker.containers.get(container.container_id or "")
        async with ExecutionClient(port=container.executor_port, heartbeat_interval=1) as client:
            execution = await client.submit(PRINTING_CELL)
            # The 8 s timeout passes during the 8 s pause unless the pause is credited.
            waiting = asyncio.ensure_future(execution.result(timeout=8))
            await asyncio.sleep(1.0)
            await raw.pause()
            assert container.paused
            await asyncio.sleep(8)
            await raw.unpause()
            result = await asyncio.wait_for(waiting, 30)
            assert result.text.split() == LINES
            assert not result.truncated
    finally:
        await docker.close()


async def test_pause_and_resume_are_idempotent(make_container: ContainerFactory) -> None:
    container = await make_container(memory_limit="1g")
    assert not container.paused
    await container.resume()  # not paused: nothing to do
    await container.pause()
    await container.pause()
    assert container.paused
    await container.resume()
    await container.resume()
    assert not container.paused
    async with ExecutionClient(port=container.executor_port) as client:
        assert (await client.execute("print(1 + 1)")).text == "2"
    await container.kill()
    assert not container.paused
    with pytest.raises(InvalidStateError):
        await container.pause()
    with pytest.raises(InvalidStateError):
        await container.resume()


async def test_pause_of_a_container_removed_behind_ipyboxs_back_fails_clearly(
    make_container: ContainerFactory,
) -> None:
    container = await make_container(memory_limit="1g")
    docker = aiodocker.Docker()
    try:
        await (await docker.containers.get(container.container_id or "")).delete(force=True)
    finally:
        await docker.close()
    with pytest.raises(ContainerError) as caught:
        await container.pause()
    assert caught.value.container_id == container.container_id


async def test_a_resource_transfer_waits_for_a_paused_sandbox(make_container: ContainerFactory, tmp_path: Path) -> None:
    # inactivity_timeout=2 and a 5 s pause: the old client sent the request to the frozen server and
    # gave up with TransferStalledError.
    container = await make_container(memory_limit="1g")
    source = tmp_path / "data.bin"
    source.write_bytes(b"x" * 2**20)
    async with ResourceClient(port=container.resource_port, inactivity_timeout=2) as resources:
        await container.pause()
        began = time.monotonic()
        upload = asyncio.ensure_future(resources.upload_file("data.bin", source))
        await asyncio.sleep(5)
        assert not upload.done()
        await container.resume()
        await asyncio.wait_for(upload, 30)
        assert time.monotonic() - began >= 5
        target = tmp_path / "back.bin"
        await resources.download_file("data.bin", target)
        assert target.read_bytes() == source.read_bytes()
