"""Memory bombs kill the kernel, not the control plane; the client learns why, and the sandbox goes on."""

from __future__ import annotations

import asyncio
import time

import pytest

from ipybox import ExecutionClient, ExecutionError, KernelDiedError, ResourceClient


async def test_slow_leak_kills_the_kernel_not_the_servers(make_container) -> None:  # type: ignore[no-untyped-def]
    container = await make_container(memory_limit="256m")
    async with ExecutionClient(port=container.executor_port) as client:
        await client.execute("state = 1")
        start = time.monotonic()
        with pytest.raises(KernelDiedError, match="out of memory") as info:
            await asyncio.wait_for(client.execute("x = []\nwhile True:\n    x.append(bytearray(10**7))"), 30)
        detected = time.monotonic() - start
        assert "state" in str(info.value) and "lost" in str(info.value)
        assert detected < 10, f"took {detected:.1f} s"
        # The servers survived: the same client goes on with a fresh kernel, files still work.
        with pytest.raises(ExecutionError, match="NameError"):
            await client.execute("state")
        assert (await client.execute("print('alive')")).text == "alive"
    async with ResourceClient(port=container.resource_port) as resources:
        assert (await resources.status())["status"] == "ok"


async def test_one_huge_allocation_is_a_memory_error(client: ExecutionClient) -> None:
    with pytest.raises(ExecutionError, match="MemoryError"):
        await client.execute("bytearray(10**11)")
    assert (await client.execute("print('alive')")).text == "alive"
