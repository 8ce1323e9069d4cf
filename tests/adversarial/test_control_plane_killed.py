"""Code that kills the container's server process: every client fails with an ipybox error, none hangs."""

from __future__ import annotations

import asyncio
import time

import pytest

from ipybox import ExecutionClient, ExecutionContainer, IpyboxError, ResourceClient, ServerConnectionError

# Kill the process that serves the gateway and the resource API (`python -I -m ipybox_server`),
# found through /proc as the image has no ps. The kernel runs as the same user, so it may.
KILL_SERVER = """
import os
for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
        argv = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\\0')
    except OSError:
        continue
    if argv[1:4] == [b'-I', b'-m', b'ipybox_server']:
        os.kill(int(pid), 9)
"""

DETECTION_BOUND = 10.0


async def _fails_with_ipybox_error(awaitable, what: str) -> tuple[BaseException, float]:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    try:
        await asyncio.wait_for(awaitable, 30)
    except TimeoutError:
        pytest.fail(f"{what} hung after the server was killed")
    except Exception as exc:
        elapsed = time.monotonic() - start
        assert isinstance(exc, IpyboxError), f"{what} raised {exc!r}, not an ipybox error"
        assert not isinstance(exc, TimeoutError), f"{what} timed out instead of failing: {exc!r}"
        assert elapsed < DETECTION_BOUND, f"{what} took {elapsed:.1f} s to fail"
        return exc, elapsed
    pytest.fail(f"{what} succeeded after the server was killed")


async def test_killing_the_server_fails_every_client_fast(make_container) -> None:  # type: ignore[no-untyped-def]
    container: ExecutionContainer = await make_container()
    async with (
        ExecutionClient(port=container.executor_port) as victim,
        ExecutionClient(port=container.executor_port) as killer,
        ResourceClient(port=container.resource_port) as resources,
    ):
        assert (await resources.status())["status"] == "ok"
        pending = await victim.submit("import time\ntime.sleep(600)")
        await asyncio.sleep(0.5)
        killed = await killer.submit(KILL_SERVER)
        await _fails_with_ipybox_error(killed.result(timeout=60), "the killing execution")
        await _fails_with_ipybox_error(pending.result(timeout=60), "the pending execution")
        await _fails_with_ipybox_error(victim.execute("print(1)", timeout=60), "the next execution")
        await _fails_with_ipybox_error(killer.execute("print(1)", timeout=60), "the killer's next execution")
        start = time.monotonic()
        with pytest.raises(ServerConnectionError):
            await asyncio.wait_for(resources.status(), 30)
        assert time.monotonic() - start < DETECTION_BOUND
    # The fixture kills the (by now stopped) container afterwards; the session check finds no leftovers.
