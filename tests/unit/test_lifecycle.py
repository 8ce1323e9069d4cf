"""The in-sandbox watchdog's decisions (fed a fake clock) and the resource server's `GET /lease`.

The server package runs in the container only; it needs nothing but aiohttp, so it is imported from the
source tree here.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ipybox" / "_image"))

from ipybox_server import lifecycle, resource  # noqa: E402

TOKEN = "secret"
AUTH = {"Authorization": f"token {TOKEN}"}


def ticks(watchdog: lifecycle.Watchdog, start: float, end: float, step: float = 0.5) -> str | None:
    now = start
    while now < end:
        now += step
        if (reason := watchdog.tick(now)) is not None:
            return reason
    return None


def test_unarmed_never_fires() -> None:
    watchdog = lifecycle.Watchdog(0.0)
    assert not watchdog.armed
    assert ticks(watchdog, 0.0, 10_000.0, 7.0) is None


def test_from_environ() -> None:
    watchdog = lifecycle.Watchdog.from_environ(
        0.0, {"IPYBOX_IDLE_TIMEOUT": "5", "IPYBOX_MAX_LIFETIME": "60.5", "IPYBOX_OWNER_GRACE": ""}
    )
    assert (watchdog.idle_timeout, watchdog.max_lifetime, watchdog.owner_grace) == (5.0, 60.5, None)
    assert lifecycle.Watchdog.from_environ(0.0, {}).armed is False
    with pytest.raises(ValueError, match="IPYBOX_IDLE_TIMEOUT"):
        lifecycle.Watchdog.from_environ(0.0, {"IPYBOX_IDLE_TIMEOUT": "0"})
    with pytest.raises(ValueError):
        lifecycle.Watchdog.from_environ(0.0, {"IPYBOX_MAX_LIFETIME": "soon"})


def test_idle_counts_awake_time_only() -> None:
    watchdog = lifecycle.Watchdog(0.0, idle_timeout=5.0)
    assert ticks(watchdog, 0.0, 3.0) is None
    # A 100 s gap between two ticks is a pause (the loop did not run): it adds at most 1 s.
    assert watchdog.tick(104.0) is None
    assert ticks(watchdog, 104.0, 104.5) is None
    reason = ticks(watchdog, 104.5, 200.0)
    assert reason is not None and "idle_timeout=5" in reason


def test_activity_resets_idle() -> None:
    watchdog = lifecycle.Watchdog(0.0, idle_timeout=2.0)
    now = 0.0
    for _ in range(100):
        now += 0.5
        watchdog.activity()
        assert watchdog.tick(now) is None


def test_max_lifetime_is_wall_clock() -> None:
    watchdog = lifecycle.Watchdog(0.0, max_lifetime=8.0)
    watchdog.activity()
    assert watchdog.tick(7.9) is None
    reason = watchdog.tick(8.0)  # a pause counts: one jump past the limit is enough
    assert reason is not None and "max_lifetime" in reason


def test_owner_grace_runs_from_ready_without_a_lease() -> None:
    watchdog = lifecycle.Watchdog(0.0, owner_grace=3.0)
    watchdog.ready(10.0)  # a slow start does not use up the grace
    assert watchdog.tick(12.5) is None
    assert watchdog.tick(13.0) is not None


def test_lease_holds_and_grace_after_the_last_closes() -> None:
    watchdog = lifecycle.Watchdog(0.0, owner_grace=3.0)
    watchdog.ready(0.0)
    watchdog.lease_opened()
    watchdog.lease_opened()
    assert ticks(watchdog, 0.0, 1000.0) is None
    watchdog.lease_closed(1000.0)
    assert ticks(watchdog, 1000.0, 1010.0) is None  # one holder is left
    watchdog.lease_closed(1010.0)
    assert watchdog.tick(1012.5) is None
    watchdog.lease_opened()  # back within the grace (a reconnect): no exit
    assert ticks(watchdog, 1012.5, 1100.0) is None
    watchdog.lease_closed(1100.0)
    reason = ticks(watchdog, 1100.0, 1110.0)
    assert reason is not None and "owner_grace=3" in reason


async def test_lease_route_counts_holders_and_requests_count_as_activity() -> None:
    watchdog = lifecycle.Watchdog(0.0, idle_timeout=1.0, owner_grace=1.0)
    async with TestClient(TestServer(resource.create_app(TOKEN, watchdog=watchdog))) as client:
        response = await client.get("/lease", headers=AUTH)  # not an upgrade
        assert response.status == 400
        assert "error" in await response.json()
        response = await client.get("/lease")
        assert response.status == 401
        ws = await client.ws_connect("/lease", headers=AUTH)
        for _ in range(50):
            if watchdog.leases == 1:
                break
            await asyncio.sleep(0.01)
        assert watchdog.leases == 1
        ticks(watchdog, 0.0, 0.5)
        response = await client.get("/status", headers=AUTH)
        assert response.status == 200
        assert watchdog.tick(1.4) is None  # the request reset the idle time
        await ws.close()
        for _ in range(50):
            if watchdog.leases == 0:
                break
            await asyncio.sleep(0.01)
        assert watchdog.leases == 0


async def test_unauthenticated_requests_are_not_activity() -> None:
    watchdog = lifecycle.Watchdog(0.0, idle_timeout=1.0)
    async with TestClient(TestServer(resource.create_app(TOKEN, watchdog=watchdog))) as client:
        watchdog.tick(0.5)
        response = await client.get("/status")
        assert response.status == 401
        assert watchdog.tick(1.0) is not None


class _Kernel:
    def __init__(self, state: str) -> None:
        self.execution_state = state


class _KernelManager:
    def __init__(self) -> None:
        self.last_kernel_activity = 1
        self.kernels = {"a": _Kernel("idle")}

    def list_kernel_ids(self) -> list[str]:
        return list(self.kernels)

    def get_kernel(self, kernel_id: str) -> _Kernel:
        return self.kernels[kernel_id]


def test_kernel_activity_and_busy_kernels() -> None:
    km = _KernelManager()
    activity = lifecycle._KernelActivity(km)
    assert not activity.active()
    km.last_kernel_activity = 2
    assert activity.active()
    assert not activity.active()
    km.kernels["a"].execution_state = "busy"  # a silent long cell is not idle
    assert activity.active()


async def test_put_lifecycle_arms_and_disarms_the_idle_timeout() -> None:
    watchdog = lifecycle.Watchdog(0.0, self_ending=True)
    async with TestClient(TestServer(resource.create_app(TOKEN, watchdog=watchdog))) as client:
        response = await client.put("/lifecycle", json={"idle_timeout": 2.5}, headers=AUTH)
        assert response.status == 200
        assert await response.json() == {"idle_timeout": 2.5, "max_lifetime": None, "owner_grace": None}
        assert watchdog.armed and watchdog.idle_timeout == 2.5
        assert ticks(watchdog, 0.0, 3.0) == "idle for idle_timeout=2.5 s"
        response = await client.put("/lifecycle", json={"idle_timeout": None}, headers=AUTH)
        assert response.status == 200 and not watchdog.armed


@pytest.mark.parametrize(
    "body",
    [
        {"idle_timeout": 0},
        {"idle_timeout": -1},
        {"idle_timeout": True},
        {"idle_timeout": "5"},
        {},
        [],
        {"max_lifetime": 5},
    ],
)
async def test_put_lifecycle_refuses_bad_bodies_with_the_shape_named(body: object) -> None:
    watchdog = lifecycle.Watchdog(0.0, idle_timeout=9.0, self_ending=True)
    async with TestClient(TestServer(resource.create_app(TOKEN, watchdog=watchdog))) as client:
        response = await client.put("/lifecycle", json=body, headers=AUTH)
        assert response.status == 400
        assert "idle_timeout" in (await response.json())["error"]
        assert watchdog.idle_timeout == 9.0
        assert (await client.put("/lifecycle", json={"idle_timeout": 1}, headers={})).status == 401


async def test_put_lifecycle_is_refused_in_a_sandbox_not_created_to_end_itself() -> None:
    # Its container has no AutoRemove: a server ended by an idle timeout would leave it stopped. The
    # resource fuzzer armed tiny timeouts this way and the sandbox under test went away mid-run.
    watchdog = lifecycle.Watchdog(0.0)
    async with TestClient(TestServer(resource.create_app(TOKEN, watchdog=watchdog))) as client:
        response = await client.put("/lifecycle", json={"idle_timeout": 1e-9}, headers=AUTH)
        assert response.status == 409
        assert "not created to end itself" in (await response.json())["error"]
        assert not watchdog.armed


def test_self_ending_comes_from_the_environment() -> None:
    assert lifecycle.Watchdog.from_environ(0.0, {"IPYBOX_SELF_ENDING": "1"}).self_ending
    assert not lifecycle.Watchdog.from_environ(0.0, {}).self_ending
