"""Clocks that stop while the sandbox is paused: the channel's pings and an execution's timeout,
against a fake transport whose `frozen()` the test sets."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from ipybox import ExecutionTimeoutError
from ipybox._channel import KernelChannel
from ipybox._router import IDLE, STARTED, Router
from ipybox.executor import Execution


class FakeWebSocket:
    def __init__(self) -> None:
        self.closed = False
        self.pings = 0

    async def ping(self) -> None:
        self.pings += 1

    async def close(self, code: int = 1000) -> bool:
        self.closed = True
        return True


class FakeTransport:
    def __init__(self, heartbeat: float) -> None:
        self.heartbeat = heartbeat
        self.heard = asyncio.Event()
        self.ws: Any = FakeWebSocket()
        self.kernel_id = "k"
        self.is_frozen = False
        self.interrupts = 0

    def frozen(self) -> bool:
        return self.is_frozen

    async def wait_thawed(self) -> float:
        while self.is_frozen:
            await asyncio.sleep(0.01)
        return 0.0


async def test_a_missed_pong_while_frozen_waits_and_a_thawed_silence_closes() -> None:
    transport = FakeTransport(heartbeat=0.05)
    transport.is_frozen = True
    channel = KernelChannel(transport, Router("k"))  # type: ignore[arg-type]
    pinger = asyncio.create_task(channel._ping())
    try:
        await asyncio.sleep(0.6)  # twelve heartbeats without an answer, all while frozen
        assert transport.ws.pings >= 1 and not transport.ws.closed
        transport.is_frozen = False
        for _ in range(100):
            if transport.ws.closed:
                break
            await asyncio.sleep(0.02)
        assert transport.ws.closed  # silent and not paused: a dead peer
    finally:
        pinger.cancel()


async def test_any_frame_answers_a_ping() -> None:
    transport = FakeTransport(heartbeat=0.05)
    channel = KernelChannel(transport, Router("k"))  # type: ignore[arg-type]
    pinger = asyncio.create_task(channel._ping())

    async def frames() -> None:
        while True:
            transport.heard.set()
            await asyncio.sleep(0.005)

    feeder = asyncio.create_task(frames())
    try:
        await asyncio.sleep(0.4)
        assert transport.ws.pings >= 3 and not transport.ws.closed
    finally:
        pinger.cancel()
        feeder.cancel()


class FakeClient:
    def __init__(self, transport: FakeTransport, route: Any) -> None:
        self._transport = transport
        self._route = route

    def _transport_or_raise(self) -> FakeTransport:
        return self._transport

    async def interrupt(self) -> None:
        assert not self._transport.is_frozen  # never sent to a paused gateway
        self._transport.interrupts += 1
        self._route.queue.put_nowait(IDLE)  # the interrupted execution ends


async def test_frozen_time_does_not_count_against_the_timeout() -> None:
    transport = FakeTransport(heartbeat=0)
    route = Router("k").register(None, None)
    execution = Execution(FakeClient(transport, route), route)  # type: ignore[arg-type]
    route.queue.put_nowait(STARTED)
    transport.is_frozen = True
    began = time.monotonic()
    waiting = asyncio.create_task(execution.result(timeout=0.5))
    await asyncio.sleep(1.0)  # two timeouts, all frozen
    assert not waiting.done()
    transport.is_frozen = False
    await asyncio.sleep(0.1)
    assert not waiting.done()  # the clock runs again, with most of its 0.5 s left
    route.queue.put_nowait(("stream", "stdout", "done\n"))
    route.queue.put_nowait(IDLE)
    result = await asyncio.wait_for(waiting, 1)
    assert result.text == "done"
    assert time.monotonic() - began >= 1.1


async def test_the_timeout_fires_when_not_frozen() -> None:
    transport = FakeTransport(heartbeat=0)
    route = Router("k").register(None, None)
    execution = Execution(FakeClient(transport, route), route)  # type: ignore[arg-type]
    route.queue.put_nowait(STARTED)
    route.phase = route.phase.RUNNING
    began = time.monotonic()
    with pytest.raises(ExecutionTimeoutError):
        await asyncio.wait_for(execution.result(timeout=0.3), 10)
    assert transport.interrupts == 1
    assert 0.3 <= time.monotonic() - began < 9
