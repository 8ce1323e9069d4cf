"""Which waiter a failed pool start reaches (no Docker: the starts are scripted futures)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from ipybox import IpyboxError, SandboxPool
from ipybox import pool as pool_module


class FakeSandbox:
    def __init__(self) -> None:
        self.container = SimpleNamespace(container_id="fake")
        self.closed = False
        self._on_close: list[Any] = []

    def healthy(self) -> bool:
        return not self.closed

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            for callback in self._on_close:
                callback(self)


class ScriptedPool(SandboxPool):
    """Each start waits for a future the test resolves: with a FakeSandbox, or with an error."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.starts: list[asyncio.Future[FakeSandbox]] = []

    async def _new_sandbox(self) -> Any:
        start: asyncio.Future[FakeSandbox] = asyncio.get_running_loop().create_future()
        self.starts.append(start)
        return await start

    def pending(self) -> list[asyncio.Future[FakeSandbox]]:
        return [start for start in self.starts if not start.done()]


async def turns(count: int = 20) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


@pytest.fixture
async def pool(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ScriptedPool]:
    # No back-off between failed starts: the scripted starts fail on the test's command, not on a timer.
    monkeypatch.setattr(pool_module, "_RETRY_DELAYS", (0.0,))
    pool = ScriptedPool(1, max_starting=4)
    await pool.start()
    try:
        yield pool
    finally:
        await pool.close()
        for start in pool.pending():
            start.cancel()


async def test_failure_of_a_start_reaches_the_waiting_caller(pool: ScriptedPool) -> None:
    await turns()
    waiter = asyncio.create_task(pool.acquire())
    await turns()
    for start in pool.pending():
        start.set_exception(IpyboxError("no network"))
    with pytest.raises(IpyboxError, match="no network"):
        await waiter


async def test_failure_for_a_waiter_that_got_a_sandbox_anyway_is_dropped(pool: ScriptedPool) -> None:
    await turns()
    waiter = asyncio.create_task(pool.acquire())
    await turns()
    first, second = pool.pending()
    # The first start fails while the waiter waits, and in the same turn the second one succeeds: the waiter
    # takes the sandbox, and the failure recorded for it must go nowhere else.
    first.set_exception(IpyboxError("stale failure"))
    served = FakeSandbox()
    second.set_result(served)
    assert await waiter is served

    later = asyncio.create_task(pool.acquire())
    await turns()
    assert not later.done(), f"an unrelated acquire() ended with {later.exception()!r}"
    fresh = FakeSandbox()
    pool.pending()[0].set_result(fresh)
    assert await later is fresh


async def test_failure_for_a_cancelled_waiter_reaches_no_one(pool: ScriptedPool) -> None:
    await turns()
    waiter = asyncio.create_task(pool.acquire())
    await turns()
    for start in pool.pending():
        start.set_exception(IpyboxError("stale failure"))
    # Cancelled in the same turn, before it could see the failure meant for it.
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter

    later = asyncio.create_task(pool.acquire())
    await turns()
    assert not later.done(), f"an unrelated acquire() ended with {later.exception()!r}"
    fresh = FakeSandbox()
    pool.pending()[0].set_result(fresh)
    assert await later is fresh


async def test_one_failure_reaches_one_waiter_the_longest_waiting(pool: ScriptedPool) -> None:
    await turns()
    first = asyncio.create_task(pool.acquire())
    await turns()
    second = asyncio.create_task(pool.acquire())
    await turns()
    pool.pending()[0].set_exception(IpyboxError("one failure"))
    await turns()
    assert first.done() and isinstance(first.exception(), IpyboxError)
    assert not second.done()
    served = FakeSandbox()
    pool.pending()[0].set_result(served)
    assert await second is served
