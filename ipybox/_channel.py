"""The live connection to one kernel: the one reader task of its websocket, sending, re-opening after a
cut, the recovery check, and waiting for a restarted kernel.

`KernelTransport` moves the bytes, `Router` decides what each message means; this module runs the
loops and timers between them. A cut (the connection broke, or a message too big to read closed it)
is always handled the same way: re-open with the same session (the gateway replays what it kept),
then a kernel_info barrier tells which pending executions lost their end. Nothing is ever sent twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp

from ipybox import _where
from ipybox._errors import KernelDiedError, ServerConnectionError
from ipybox._router import KernelState, Route, Router, Terminal, message_number, outcome_unknown
from ipybox._transport import Closed, KernelTransport

logger = logging.getLogger(__name__)

RESTART_TIMEOUT = 30.0
"""Seconds a restarted kernel gets to answer again before the next execution fails."""
_NUDGE_INTERVAL = 0.2
"""Seconds between kernel_info nudges while waiting for a restarted kernel."""
_BARRIER_IOPUB_WAIT = 2.0
"""Seconds to wait for a barrier's IOPub status after its shell reply before nudging again."""
_GAP_GRACE = 0.5
"""Seconds an execution that reached idle after a cut waits for messages still missing before it fails."""


_FROZEN_POLL = 0.25
"""Seconds between looks at the freezer while a ping waits for its pong from a paused sandbox."""


SIDE_CHANNEL = "ipybox"
"""The websocket channel between the client and the server itself (approvals), never the kernel's."""


class KernelChannel:
    """Reads one kernel's websocket into a router and sends requests on it.

    Messages on channel "ipybox" are the server's own (approval requests): they go to `on_side`,
    never to the router (dropped when there is none).
    """

    def __init__(
        self,
        transport: KernelTransport,
        router: Router,
        on_side: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.transport = transport
        self.router = router
        self.on_side = on_side
        self.reader: asyncio.Task[None] | None = None
        self.pinger: asyncio.Task[None] | None = None
        self.restart_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()  # recoveries
        self._recovery: asyncio.Task[None] | None = None
        self._reopened = asyncio.Event()  # clear while the reader re-opens the websocket
        self._reopened.set()

    @property
    def alive(self) -> bool:
        """The reader runs, the websocket is open (or being re-opened), and the kernel is not dead."""
        return (
            self.reader is not None
            and not self.reader.done()
            and self.transport.ws is not None
            and self.router.kernel is not KernelState.DEAD
        )

    def start(self) -> None:
        ws = self.transport.ws
        assert ws is not None
        self.reader = asyncio.create_task(self._read(ws), name=f"ipybox-kernel-reader-{self.transport.kernel_id}")
        if self.transport.heartbeat and self.transport.heartbeat > 0:
            self.pinger = asyncio.create_task(self._ping(), name=f"ipybox-kernel-ping-{self.transport.kernel_id}")

    async def close(self, error: Exception) -> None:
        reader, self.reader = self.reader, None
        if reader is not None:
            reader.cancel()
        pinger, self.pinger = self.pinger, None
        if pinger is not None:
            pinger.cancel()
        for task in list(self._tasks):
            task.cancel()
        self.router.fail_all(error)
        self._reopened.set()

    async def send(self, route: Route, msg_type: str, content: dict[str, Any]) -> None:
        """Send a request whose messages the router routes to `route`.

        Waits while the reader re-opens the websocket. On failure or cancellation the route is
        forgotten: a request never sent must not be blamed for another one's output.
        """
        try:
            await self._until_open()
            await self.transport.send(route.msg_id, msg_type, content)
        except BaseException:
            self.router.forget(route)
            raise

    async def send_side(self, msg_type: str, content: dict[str, Any]) -> None:
        """Send a message to the server on channel "ipybox"; waits while the websocket is re-opened.

        Raises:
            ServerConnectionError: Sending failed.
        """
        await self._until_open()
        await self.transport.send(uuid.uuid4().hex, msg_type, content, channel=SIDE_CHANNEL)

    async def _until_open(self) -> None:
        """Wait while the reader re-opens a websocket that broke."""
        while self.transport.ws is not None and self.transport.ws.closed and self._reading():
            if self._reopened.is_set():
                await asyncio.sleep(0.01)  # the reader has not noticed the close yet
            else:
                await self._reopened.wait()

    async def await_restarted_kernel(self) -> None:
        """Wait until a restarted kernel answers on shell and its IOPub reaches us again.

        The gateway announces a restart before the new kernel runs and re-subscribes to its IOPub;
        a request sent at once could have its output published before that subscription is up, and
        its execution would wait for an idle status that never comes. So, as the gateway does for a
        new connection, nudge with kernel_info requests until one's IOPub status arrives.
        """
        terminal = await self._nudge_until_iopub()
        if terminal is not None:
            raise terminal.error

    async def restart(self, why: str) -> None:
        """Restart the kernel through the gateway and wait until it answers again."""
        kernel_id = self.transport.kernel_id
        # Until the kernel answers again, new submissions wait for the restart lock and nudge.
        self.router.kernel = KernelState.RESTARTING
        async with self.restart_lock:
            # Pending requests (those queued behind a runaway one, say) die with the old kernel.
            self.router.fail_all(
                KernelDiedError(
                    f"kernel {kernel_id} {why}; its state (variables, imports) is lost", kernel_id=kernel_id
                )
            )
            await self.transport.kernel_action("restart", "restarting", aiohttp.ClientTimeout(total=RESTART_TIMEOUT))
            await self.await_restarted_kernel()
            self.router.kernel = KernelState.ALIVE

    async def ready_for_request(self) -> None:
        """Before a new request: wait for a kernel the gateway restarted to answer again."""
        if self.router.kernel is KernelState.RESTARTING:
            async with self.restart_lock:
                if self.router.kernel is KernelState.RESTARTING:
                    await self.await_restarted_kernel()
                    self.router.kernel = KernelState.ALIVE

    async def _ping(self) -> None:
        """The heartbeat: a ping every `heartbeat` seconds, and a connection that stays silent for half
        that long after it is closed, which the reader handles as any cut (re-open, recovery).

        Any frame read counts as an answer (a pong can queue behind a big output). A paused sandbox
        answers nothing until it is resumed, and is not a dead peer: while it is frozen the ping waits.
        """
        transport = self.transport
        interval = transport.heartbeat
        while True:
            await asyncio.sleep(interval)
            ws = transport.ws
            if ws is None or ws.closed:
                continue  # being re-opened: the reader's job
            transport.heard.clear()
            try:
                await ws.ping()
            except (aiohttp.ClientError, ConnectionError, RuntimeError):
                continue  # the reader sees the broken connection
            wait = interval / 2
            while not transport.heard.is_set():
                try:
                    await asyncio.wait_for(transport.heard.wait(), wait)
                except TimeoutError:
                    if transport.frozen():
                        wait = _FROZEN_POLL
                        continue
                    if transport.ws is ws and not ws.closed:
                        logger.info(
                            "kernel %s: no answer to a ping within %.3g s; closing the connection",
                            transport.kernel_id,
                            interval / 2,
                        )
                        self._abort(ws)
                    break

    def _abort(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Close a silent websocket; the reader sees the close at once and re-opens (its close handshake
        with a dead peer may take aiohttp's close timeout, in the background)."""
        task = asyncio.create_task(self._close_quietly(ws))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _close_quietly(ws: aiohttp.ClientWebSocketResponse) -> None:
        await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY)

    def _reading(self) -> bool:
        return self.reader is not None and not self.reader.done()

    async def _nudge_until_iopub(self) -> Terminal | None:
        """Send kernel_info requests until one's IOPub status arrives; the terminal event if the wait ended."""
        deadline = time.monotonic() + RESTART_TIMEOUT
        while time.monotonic() < deadline:
            route = self.router.register(None, None, raw=True)
            try:
                await self.send(route, "kernel_info_request", {})
                wait_until = time.monotonic() + _NUDGE_INTERVAL
                while (remaining := wait_until - time.monotonic()) > 0:
                    try:
                        message = await asyncio.wait_for(route.queue.get(), remaining)
                    except TimeoutError:
                        break
                    if isinstance(message, Terminal):
                        return message
                    if message.get("channel") == "iopub":
                        return None
            finally:
                self.router.forget(route)
        kernel_id = self.transport.kernel_id
        raise KernelDiedError(
            f"kernel {kernel_id} did not come back within {RESTART_TIMEOUT} s after a restart", kernel_id=kernel_id
        )

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """The one reader of the websocket: routes each message, re-opens the websocket after a cut."""
        kernel_id = self.transport.kernel_id
        error: Exception = ServerConnectionError(
            f"the connection to kernel {kernel_id} was closed", kernel_id=kernel_id
        )
        try:
            while True:
                closed = await self._route_messages(ws)
                if self.router.kernel is KernelState.DEAD:
                    if closed.error is not None:
                        error = closed.error
                    break
                if closed.refused is not None:
                    self.router.refused(closed.refused)
                reason = f"{closed.error}" if closed.error is not None else "the server closed it"
                if closed.refused is not None:
                    reason = f"a message of {closed.refused:,} bytes was refused (max_output_bytes)"
                reopened = await self._reopen(reason)
                if isinstance(reopened, Exception):
                    error = reopened
                    break
                ws = reopened
        except Exception as exc:  # a dying reader must never leave callers waiting
            error = ServerConnectionError(f"reading from kernel {kernel_id} failed: {exc!r}", kernel_id=kernel_id)
            raise
        finally:
            self.router.fail_all(error)

    async def _route_messages(self, ws: aiohttp.ClientWebSocketResponse) -> Closed:
        async for item in self.transport.messages(ws):
            if isinstance(item, Closed):
                return item
            if item.get("channel") == SIDE_CHANNEL:
                if self.on_side is not None:
                    try:
                        self.on_side(item)
                    except Exception:  # never the reader's end: executions would fail for it
                        logger.exception("handling a message on channel %r failed", SIDE_CHANNEL)
                continue
            held = self.router.receive(item)
            if held is not None:
                self._hold(held, item)
        return Closed()

    async def _reopen(self, reason: str) -> aiohttp.ClientWebSocketResponse | Exception:
        """Re-open a websocket that broke, with the same session, so the gateway replays its buffer.

        Executions pending at the cut are followed on the new websocket; a recovery task then checks
        that none of their messages went missing. Returns the new websocket, or the error that
        pending executions get.
        """
        suspects = self.router.begin_cut()
        kernel_id = self.transport.kernel_id
        self._reopened.clear()
        try:
            reopened = await self.transport.reopen(reason)
        finally:
            self._reopened.set()
        if not isinstance(reopened, str):
            if suspects:
                self._start_recovery(suspects)
            return reopened
        self.router.window = None
        place = _where.suffix(self.transport.host, self.transport.port)
        what = f"the connection to kernel {kernel_id}{place} broke and could not be re-opened ({reopened})"
        if suspects:
            return outcome_unknown(what, kernel_id)
        return ServerConnectionError(what, kernel_id=kernel_id)

    def _start_recovery(self, suspects: list[Route]) -> None:
        if self._recovery is not None:
            # A cut during a recovery: the new one follows every execution still pending.
            self._recovery.cancel()
        window = self.router.window
        task = asyncio.create_task(self._recover(suspects, window.tag if window else None))
        self._recovery = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _recover(self, suspects: list[Route], tag: str | None) -> None:
        """Fail the executions pending at a cut whose end did not arrive with the gateway's replay.

        A kernel_info request sent now is served after every earlier request (the kernel serves shell
        requests in order); once its reply and its IOPub status are here, so is every message of the
        earlier requests that the gateway kept. An execution still unfinished then lost its end in
        the cut, or never reached the kernel, or the kernel was restarted meanwhile (its replies then
        carry another kernel session).
        """
        window = self.router.window
        restarted = False
        barrier = self.router.register(None, None, raw=True)
        try:
            await self.send(barrier, "kernel_info_request", {})
            replied = published = False
            # No deadline for the first answer: it waits for the running executions, which their own
            # timeouts bound.
            message = await barrier.queue.get()
            while not isinstance(message, Terminal):
                numbered = message_number(message)
                if tag is not None and numbered is not None and numbered[0] != tag:
                    restarted = True
                if message.get("channel") == "iopub":
                    published = True
                else:
                    replied = True
                if replied and published:
                    break
                try:
                    message = await asyncio.wait_for(barrier.queue.get(), _BARRIER_IOPUB_WAIT)
                except TimeoutError:
                    if replied:
                        # The shell reply came but its IOPub status did not: a fresh subscription.
                        await self._nudge_until_iopub()
                        break
                    message = await barrier.queue.get()
            else:
                return  # the reader failed every pending request already
        except Exception as exc:  # the suspects fail below either way
            logger.debug("recovering kernel %s after a cut failed: %r", self.transport.kernel_id, exc)
        finally:
            self.router.forget(barrier)
            if self._recovery is asyncio.current_task():
                self._recovery = None
                self.router.window = None
        self.router.recovered(suspects, window, restarted)

    def _hold(self, route: Route, idle: dict[str, Any]) -> None:
        """A suspect reached idle while messages before its idle are missing: wait for them briefly."""
        window = self.router.window
        assert window is not None
        asyncio.get_running_loop().call_later(_GAP_GRACE, self.router.settle, route, idle, window)
