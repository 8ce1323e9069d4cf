"""Fork and thread bombs: the cell fails within its timeout, the host stays responsive, the sandbox recovers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time

import pytest

from ipybox import (
    ExecutionClient,
    ExecutionContainer,
    ExecutionError,
    ExecutionTimeoutError,
    KernelDiedError,
)
from tests.adversarial.test_runaway_timeout import PROCESSES

FORK_BOMB = "import os\nwhile True:\n    os.fork()"
THREAD_BOMB = "import threading, time\nwhile True: threading.Thread(target=time.sleep, args=(3600,)).start()"
TIMEOUT = 5
# Past the timeout: 5 s interrupt grace, a restart and slack for a loaded 2-core machine.
FAIL_BOUND = TIMEOUT + 10
PIDS_LIMIT = 128


async def _bomb(client: ExecutionClient, code: str) -> float:
    """Run a bomb; it must fail (raise, time out with a restart or kill the kernel) in time."""
    start = time.monotonic()
    with pytest.raises((ExecutionError, ExecutionTimeoutError, KernelDiedError)) as info:
        await asyncio.wait_for(client.execute(code, timeout=TIMEOUT), 60)
    elapsed = time.monotonic() - start
    if isinstance(info.value, ExecutionError):
        assert "BlockingIOError" in str(info.value) or "can't start new thread" in str(info.value), info.value
    assert elapsed < FAIL_BOUND, f"the bomb took {elapsed:.1f} s to fail"
    return elapsed


def _host_responds() -> None:
    start = time.monotonic()
    subprocess.run(["true"], check=True, timeout=10)
    assert time.monotonic() - start < 5


async def _processes(client: ExecutionClient) -> list[dict[str, object]]:
    """The container's processes, from a new cell; retried while the sandbox is still at its limit."""
    for _ in range(10):
        try:
            result = await asyncio.wait_for(client.execute(PROCESSES, timeout=20), 60)
            return list(json.loads(result.text or "[]"))
        except (ExecutionError, KernelDiedError, ExecutionTimeoutError):
            await asyncio.sleep(1)
    pytest.fail("the sandbox did not recover: no cell ran after the bomb")


async def test_fork_bomb(make_container) -> None:  # type: ignore[no-untyped-def]
    container: ExecutionContainer = await make_container(pids_limit=PIDS_LIMIT)
    async with ExecutionClient(port=container.executor_port) as client:
        await _bomb(client, FORK_BOMB)
        _host_responds()
        await _processes(client)
        assert (await client.execute("print('works')", timeout=30)).text == "works"


@pytest.mark.parametrize("kernel", ["pre-warmed", "spawned"])
async def test_fork_bomb_leaves_no_forked_copies(make_container, kernel: str) -> None:  # type: ignore[no-untyped-def]
    """Each copy of the kernel ends when its fork fails, or at its next fork once one has (kernel_app.py)."""
    container: ExecutionContainer = await make_container(pids_limit=PIDS_LIMIT)
    async with contextlib.AsyncExitStack() as stack:
        if kernel == "spawned":
            # The pre-warmed kernel goes to a first client; the second kernel comes from the kernelspec.
            await stack.enter_async_context(ExecutionClient(port=container.executor_port))
        client = await stack.enter_async_context(ExecutionClient(port=container.executor_port))
        before = await _processes(client)
        await _bomb(client, FORK_BOMB)
        after = await _processes(client)
        assert (await client.execute("print('works')", timeout=30)).text == "works"
    # A few extra are fine (the next kernel, a cell's own process); the bomb's copies are not.
    assert len(after) <= len(before) + 3, f"{len(after) - len(before)} forked processes left: {after[:10]}"


async def test_thread_bomb(make_container) -> None:  # type: ignore[no-untyped-def]
    container: ExecutionContainer = await make_container(pids_limit=PIDS_LIMIT)
    async with ExecutionClient(port=container.executor_port) as client:
        before = await _processes(client)
        await _bomb(client, THREAD_BOMB)
        _host_responds()
        after = await _processes(client)
        assert (await client.execute("print('works')", timeout=30)).text == "works"
    assert len(after) <= len(before) + 3, after
