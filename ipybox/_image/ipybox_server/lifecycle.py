"""The sandbox's own watchdog: idle timeout, max lifetime and owner leases.

The host sets the limits at create time (env `IPYBOX_IDLE_TIMEOUT`, `IPYBOX_MAX_LIFETIME`,
`IPYBOX_OWNER_GRACE`, seconds); with none set nothing here ever fires. When a limit is reached the
server exits; the container then stops and, created with AutoRemove, disappears. Living in the
sandbox, this works with no host process alive at all (the owner SIGKILLed, a remote engine).

- Idle: no kernel message, no busy kernel and no resource request for `idle_timeout` seconds of
  *awake* time. The loop ticks every 0.5 s and credits at most 1 s per tick, so time frozen by
  `docker pause` (the loop does not run) is not idle time.
- Max lifetime: wall clock (monotonic, which runs on through a pause) from the server's start.
- Owner: the owner holds a lease (`GET /lease`, a token-protected websocket on the resource server,
  without traffic). When the owner dies, SIGKILL included, the OS closes its socket; when the last
  lease has closed and none came back within `owner_grace`, the server exits. No heartbeat: an
  owner whose event loop is blocked keeps its lease. Before the first lease the same grace runs from
  the ready line (an owner killed while starting the sandbox).

`Watchdog` is the decision alone (no I/O, fed a clock); `run` polls the kernels and acts. The idle
timeout can be set later too (`PUT /lifecycle`, below): a pool arms it when it hands a sandbox out.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

TICK = 0.5
MAX_CREDIT = 1.0  # most awake time one tick may add: a longer gap was a pause


def _seconds(environ: dict[str, str] | os._Environ[str], name: str) -> float | None:
    value = environ.get(name, "").strip()
    if not value:
        return None
    seconds = float(value)
    if not seconds > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return seconds


class Watchdog:
    """Decides when the sandbox must end. Times are `time.monotonic()` values passed in."""

    def __init__(
        self,
        now: float,
        *,
        idle_timeout: float | None = None,
        max_lifetime: float | None = None,
        owner_grace: float | None = None,
        self_ending: bool = False,
    ) -> None:
        self.idle_timeout = idle_timeout
        self.self_ending = self_ending  # created with AutoRemove: a limit may be armed later (PUT /lifecycle)
        self.max_lifetime = max_lifetime
        self.owner_grace = owner_grace  # None: not owner-bound
        self._start = now
        self._last_tick = now
        self._idle = 0.0  # awake seconds since the last activity
        self._leases = 0
        self._lease_lost_at: float | None = now  # no lease yet: the grace runs from the start

    @classmethod
    def from_environ(cls, now: float, environ: dict[str, str] | os._Environ[str] = os.environ) -> Watchdog:
        return cls(
            now,
            idle_timeout=_seconds(environ, "IPYBOX_IDLE_TIMEOUT"),
            max_lifetime=_seconds(environ, "IPYBOX_MAX_LIFETIME"),
            owner_grace=_seconds(environ, "IPYBOX_OWNER_GRACE"),
            self_ending=environ.get("IPYBOX_SELF_ENDING", "") == "1",
        )

    @property
    def armed(self) -> bool:
        return self.idle_timeout is not None or self.max_lifetime is not None or self.owner_grace is not None

    @property
    def leases(self) -> int:
        return self._leases

    def ready(self, now: float) -> None:
        """The servers accept connections: idle time and the first lease's grace count from here."""
        self._idle = 0.0
        self._last_tick = now
        if self._leases == 0:
            self._lease_lost_at = now

    def activity(self) -> None:
        self._idle = 0.0

    def lease_opened(self) -> None:
        self._leases += 1
        self._lease_lost_at = None

    def lease_closed(self, now: float) -> None:
        self._leases -= 1
        if self._leases == 0:
            self._lease_lost_at = now

    def tick(self, now: float) -> str | None:
        """Advance to `now`; the reason to end the sandbox, or None."""
        self._idle += min(max(now - self._last_tick, 0.0), MAX_CREDIT)
        self._last_tick = now
        if self.max_lifetime is not None and now - self._start >= self.max_lifetime:
            return f"max_lifetime of {self.max_lifetime:g} s reached"
        if self.idle_timeout is not None and self._idle >= self.idle_timeout:
            return f"idle for idle_timeout={self.idle_timeout:g} s"
        if (
            self.owner_grace is not None
            and self._lease_lost_at is not None
            and now - self._lease_lost_at >= self.owner_grace
        ):
            return f"the owner's lease is gone (no lease for owner_grace={self.owner_grace:g} s)"
        return None


WATCHDOG_KEY = web.AppKey("watchdog", Watchdog)


@web.middleware
async def note_activity(request: web.Request, handler):  # type: ignore[no-untyped-def]
    if request.path != "/lease":
        request.app[WATCHDOG_KEY].activity()
    return await handler(request)


async def lease(request: web.Request) -> web.WebSocketResponse:
    """Held open by the owner for as long as it lives; nothing is exchanged."""
    watchdog = request.app[WATCHDOG_KEY]
    ws = web.WebSocketResponse(heartbeat=None)
    await ws.prepare(request)
    watchdog.lease_opened()
    try:
        async for _ in ws:
            pass
    finally:
        watchdog.lease_closed(time.monotonic())
    return ws


async def set_limits(request: web.Request) -> web.Response:
    """`PUT /lifecycle {"idle_timeout": seconds | null}`: (re)arm or disarm the idle timeout, counted from now.

    A `SandboxPool` with `idle_timeout` starts its spares without one and arms it at hand-out, so that a
    spare does not expire while it waits. Only the idle timeout can change: the lifetime and the owner
    binding are promises made at create time (and written in the container's labels).
    """
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text='the body must be JSON: {"idle_timeout": seconds or null}') from None
    if not isinstance(body, dict) or set(body) != {"idle_timeout"}:
        raise web.HTTPBadRequest(text='the body must be exactly {"idle_timeout": seconds or null}')
    value = body["idle_timeout"]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not value > 0):
        raise web.HTTPBadRequest(text=f"idle_timeout must be a positive number of seconds or null, got {value!r}")
    watchdog = request.app[WATCHDOG_KEY]
    if not watchdog.self_ending:
        raise web.HTTPConflict(
            text="this sandbox was not created to end itself (its container would be left stopped): start it "
            "with idle_timeout, max_lifetime or owner_bound to set limits"
        )
    watchdog.idle_timeout = None if value is None else float(value)
    watchdog.activity()
    return web.json_response(
        {
            "idle_timeout": watchdog.idle_timeout,
            "max_lifetime": watchdog.max_lifetime,
            "owner_grace": watchdog.owner_grace,
        }
    )


def add_routes(app: web.Application, watchdog: Watchdog) -> None:
    app[WATCHDOG_KEY] = watchdog
    app.router.add_get("/lease", lease)
    app.router.add_put("/lifecycle", set_limits)


class _KernelActivity:
    """Kernel activity as the gateway's kernel manager records it (every IOPub message, busy state)."""

    def __init__(self, kernel_manager: Any) -> None:
        self._km = kernel_manager
        self._last: Any = getattr(kernel_manager, "last_kernel_activity", None)

    def active(self) -> bool:
        last = getattr(self._km, "last_kernel_activity", None)
        changed, self._last = last != self._last, last
        if changed:
            return True
        for kernel_id in list(self._km.list_kernel_ids()):
            try:
                kernel = self._km.get_kernel(kernel_id)
            except KeyError:
                continue
            if getattr(kernel, "execution_state", None) == "busy":
                return True
        return False


async def run(watchdog: Watchdog, kernel_manager: Any, stop: Callable[[str], None]) -> None:
    """Tick until the watchdog says stop, then call `stop(reason)`."""
    kernels = _KernelActivity(kernel_manager)
    while True:
        await asyncio.sleep(TICK)
        if not watchdog.armed:  # nothing to watch (yet: `PUT /lifecycle` may arm the idle timeout)
            watchdog.tick(time.monotonic())
            continue
        try:
            if kernels.active():
                watchdog.activity()
        except Exception as exc:  # a watchdog that dies would leave the sandbox for ever
            print(f"ipybox_server: watchdog could not read kernel activity: {exc!r}", file=sys.stderr, flush=True)
        reason = watchdog.tick(time.monotonic())
        if reason is not None:
            stop(reason)
            return
