"""Cancelling ExecutionContainer.run() or kill() at any of their awaits leaves no container behind.

Each call is first run once without cancelling, turning the event loop one `asyncio.sleep(0)` at a time
and noting at every turn where the call waits (its chain of awaits through ipybox's code). Then, for
each place found, a fresh call is cancelled when it waits there: at its first turn there, and again
halfway through the turns the dry run spent there (at most 20 000 turns in). Plus a cancellation
before the call's first step (N = 0) and a call left to complete. Stepping N by one is out of reach:
run() takes 10^5 to 10^6 loop turns, nearly all of them waiting for the engine, and every trial costs
a container. Choosing N by where the call waits covers every await of the code path with two trials
each, whatever the machine's speed; the test fails when a place is never reached.

With `cancels=2` the task is cancelled again one turn after the first cancellation, while it cleans up.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiodocker
import pytest

import ipybox
from ipybox import ExecutionContainer
from tests.integration.conftest import session_labels

_PACKAGE = os.path.dirname(ipybox.__file__)
_MARK = "ai.gradion.ipybox.test-cancel"
_TRIAL_TIMEOUT = 120  # a safety net against a hang, not a timing assertion
_MID_TURNS = 20_000  # every turn spins the CPU that the engine and the container need too


def _suspension(task: asyncio.Task[Any]) -> tuple[str, ...]:
    """Where `task` waits: the chain of awaits through ipybox's code, as `module:function:line`."""
    chain: list[str] = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        frame = frame or getattr(awaited, "ag_frame", None)
        if frame is None:
            break
        if frame.f_code.co_filename.startswith(_PACKAGE):
            name = os.path.basename(frame.f_code.co_filename)
            chain.append(f"{name}:{frame.f_code.co_name}:{frame.f_lineno}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return tuple(chain)


@dataclass
class Point:
    where: tuple[str, ...]
    turns: int  # loop turns the dry run spent waiting there

    def __str__(self) -> str:
        return " > ".join(self.where)


async def _dry_run(call: Awaitable[Any]) -> list[Point]:
    task = asyncio.ensure_future(call)
    points: list[Point] = []
    while True:
        await asyncio.sleep(0)
        if task.done():
            break
        where = _suspension(task)
        if points and points[-1].where == where:
            points[-1].turns += 1
        elif all(point.where != where for point in points):  # a wait met again later (a retry loop) counts once
            points.append(Point(where, 1))
    task.result()
    assert points, "the call never waited: nothing to cancel"
    return points


async def _cancel(
    call: Awaitable[Any], points: list[Point], target: Point | None, into: int, cancels: int
) -> tuple[str, bool]:
    """Start `call`, cancel it when it waits at `target` (None: before its first step), `into` turns later.

    Returns where the call was when cancelled, and whether the cancellation reached it (else it completed).
    """
    task = asyncio.ensure_future(call)
    landed = "before its first step"
    if target is not None:
        order = [point.where for point in points]
        while True:
            await asyncio.sleep(0)
            where = _suspension(task) if not task.done() else ()
            if where == target.where or task.done():
                break
            if where in order and order.index(where) > order.index(target.where):
                break  # passed it unseen; this trial lands elsewhere
        for _ in range(into):
            if task.done() or _suspension(task) != target.where:
                break
            await asyncio.sleep(0)
        landed = "completed" if task.done() else str(Point(_suspension(task), 0))
    task.cancel()
    for _ in range(cancels - 1):
        await asyncio.sleep(0)  # the cancellation is delivered: the call cleans up now
        task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return landed, True
    return landed, False


async def _labelled(marker: str) -> list[str]:
    docker = aiodocker.Docker()
    try:
        containers = await docker.containers.list(all=True, filters={"label": [f"{_MARK}={marker}"]})
        return [container.id for container in containers]
    finally:
        await docker.close()


def _container(image: str) -> tuple[ExecutionContainer, str]:
    marker = uuid.uuid4().hex
    container = ExecutionContainer(tag=image, labels=session_labels(**{_MARK: marker}), show_pull_progress=False)
    return container, marker


async def _sweep(trial: Callable[[Point | None, int], Awaitable[str]], points: list[Point]) -> None:
    """Run `trial` before the first step, at each point (its first turn there, and later) and after completion.

    The later cancellation comes halfway through the turns the dry run spent at the point, at most
    `_MID_TURNS` turns in: while a request to the engine is out, the engine may have acted on it already.
    """
    reached: set[str] = set()
    await trial(None, 0)
    for point in points:
        for _attempt in range(3):  # the place is reached in the same order every time, at a varying turn
            if await trial(point, 0) == str(point):
                reached.add(str(point))
                break
        if point.turns > 1:
            await trial(point, min(point.turns // 2, _MID_TURNS))  # wherever it lands: any await is fine
    await trial(Point(("completed",), 0), 0)
    missed = [str(point) for point in points if str(point) not in reached]
    assert not missed, f"never cancelled at: {missed}"


@pytest.mark.parametrize("cancels", [1, 2])
async def test_cancelling_run_anywhere_leaves_no_container(image: str, cancels: int) -> None:
    probe, marker = _container(image)
    try:
        points = await _dry_run(probe.run())
    finally:
        await probe.kill()
    assert await _labelled(marker) == []

    async def trial(target: Point | None, into: int) -> str:
        container, marker = _container(image)
        try:
            async with asyncio.timeout(_TRIAL_TIMEOUT):
                if target is not None and target.where == ("completed",):
                    await container.run()
                    landed = "completed"
                    assert await _labelled(marker) == [container.container_id]
                    await container.kill()
                else:
                    landed, cancelled = await _cancel(container.run(), points, target, into, cancels)
                    if cancelled:
                        # Cancelled: run() itself must have removed whatever it created.
                        assert container.container_id is None
                        assert await _labelled(marker) == [], f"run() cancelled at {landed} left a container"
                    await container.kill()
            assert await _labelled(marker) == [], f"cancelled at {landed}, the container was left unreferenced"
            return landed
        finally:
            await container.kill()

    await _sweep(trial, points)


@pytest.mark.parametrize("cancels", [1, 2])
async def test_cancelling_kill_anywhere_leaves_no_container(image: str, cancels: int) -> None:
    probe, marker = _container(image)
    try:
        await probe.run()
        points = await _dry_run(probe.kill())
    finally:
        await probe.kill()
    assert await _labelled(marker) == []

    async def trial(target: Point | None, into: int) -> str:
        container, marker = _container(image)
        try:
            async with asyncio.timeout(_TRIAL_TIMEOUT):
                await container.run()
                if target is not None and target.where == ("completed",):
                    await container.kill()
                    landed = "completed"
                else:
                    landed, _ = await _cancel(container.kill(), points, target, into, cancels)
                    if target is None:
                        # Cancelled before its first step, kill() did nothing: the container must still be
                        # known, so that the next kill() removes it.
                        assert container.container_id is not None
                    else:
                        assert await _labelled(marker) == [], f"kill() cancelled at {landed} left a container"
                    await container.kill()
            assert await _labelled(marker) == [], f"cancelled at {landed}, the container was left unreferenced"
            return landed
        finally:
            await container.kill()

    await _sweep(trial, points)
