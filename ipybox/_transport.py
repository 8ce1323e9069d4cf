"""The transport under ExecutionClient: which route reaches the gateway, the HTTP session, the kernel's
lifecycle requests (create, interrupt, restart, shut down) and its websocket (open, re-open with
backoff, framing). It moves bytes; what messages mean is `ipybox._router`'s job.

Routes, best first (ipybox._routes): the gateway's unix socket through the container's root, the
container's own address, the published port. One quick try each; the session stays on the first
route that creates the kernel, for the websocket and every later request.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

from ipybox import _freezer, _routes, _tokens, _where, _wire
from ipybox._errors import AuthenticationError, KernelLimitError, RequestRefusedError, ServerConnectionError
from ipybox._labels import EXECUTOR_PORT

logger = logging.getLogger(__name__)

FRAME_SLACK = 2**20
"""Bytes a websocket message may exceed `max_output_bytes` by (headers, JSON quoting) and still be read."""
RECONNECT_DELAYS = (0.0, 0.1, 0.2, 0.4, 0.8, 1.6)
"""Pauses before each attempt to re-open a websocket that broke: six attempts in about 3 s."""
RECONNECT_BUDGET = 10.0
"""Seconds all attempts to re-open a broken websocket may take together."""
RECONNECT_ATTEMPT_TIMEOUT = 5.0
"""Seconds one attempt to re-open a broken websocket may take."""
_DIRECT_TIMEOUT = aiohttp.ClientTimeout(total=300, sock_connect=1)
"""aiohttp's default timeouts, but a container's own address must accept a connection within a second."""
_SHUTDOWN_TIMEOUT = aiohttp.ClientTimeout(total=5)
_THAW_POLL = 0.05
"""Seconds between looks at the freezer while a paused sandbox is waited for."""
_OVERSIZE = re.compile(r"Message size (\d+)")

_cleanups: set[asyncio.Task[None]] = set()
"""Clean-ups of cancelled connects, held here so that a second cancellation cannot stop them."""


@dataclass
class Closed:
    """How a websocket ended: a message refused as too big (`refused` bytes), an error, or a plain close."""

    refused: int | None = None
    error: Exception | None = None


class KernelTransport:
    """One kernel in one gateway: its HTTP session, lifecycle requests and websocket."""

    def __init__(
        self,
        host: str,
        port: int,
        token: str | None,
        heartbeat: float,
        max_msg_size: int,
        kernel_id: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.base_url = f"http://{host}:{port}"
        self.via = "published port"  # or the direct route open() found
        self.kernel_id: str | None = None
        self.existing = kernel_id  # connect to this kernel instead of creating one
        self.heartbeat = heartbeat
        self.heard = asyncio.Event()  # set by every frame read (pongs included): the peer is alive
        self.session_id = uuid.uuid4().hex  # the gateway keeps a session's messages across re-opens
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.v1 = False
        self._token = token
        self._max_msg_size = max_msg_size
        self._session: aiohttp.ClientSession | None = None

    @property
    def open(self) -> bool:
        return self.ws is not None and not self.ws.closed

    async def connect(self, retries: int, retry_interval: float) -> None:
        """Create a kernel and open its websocket. On any failure or cancellation nothing is left:
        a kernel created meanwhile is shut down, the session closed."""
        work = asyncio.create_task(self._connect(retries, retry_interval))
        try:
            await asyncio.shield(work)
        except BaseException:
            # Cancelled (or failed) while the gateway may be creating a kernel for us: let the
            # request finish, then shut down what it made. Held in `_cleanups`, so a second
            # cancellation of the caller cannot leave the kernel behind.
            cleanup = asyncio.create_task(self._abandon(work))
            _cleanups.add(cleanup)
            cleanup.add_done_callback(_cleanups.discard)
            await asyncio.shield(cleanup)
            raise

    async def _abandon(self, work: asyncio.Task[None]) -> None:
        if not work.done():
            try:
                await asyncio.wait_for(asyncio.shield(work), RECONNECT_ATTEMPT_TIMEOUT)
            except BaseException:  # its outcome no longer matters: only what it created
                work.cancel()
        if not work.cancelled():
            work.exception()  # retrieved, so asyncio does not log it as never retrieved
        await self.close(shutdown=self.existing is None)  # a kernel we attached to is not ours to end

    async def _connect(self, retries: int, retry_interval: float) -> None:
        token = self._token or _tokens.lookup(self.host, self.port)
        headers = {"Authorization": f"token {token}"} if token else {}
        try:
            if not await self._create_kernel_direct(headers):
                connector = _routes.published_connector(self.host, self.port, EXECUTOR_PORT)
                self._session = aiohttp.ClientSession(self.base_url, headers=headers, connector=connector)
                self.kernel_id = await self._create_kernel(retries, retry_interval)
            self.ws = await self.open_websocket()
        except aiohttp.WSServerHandshakeError as exc:
            raise status_error(exc.status, "opening the kernel websocket", self.base_url) from exc
        except aiohttp.ClientError as exc:
            raise ServerConnectionError(
                f"opening the kernel websocket at {self.base_url}{_where.suffix(self.host, self.port)} failed: {exc}"
            ) from exc
        # The gateway picks v1 when it supports it; older servers answer in legacy JSON.
        self.v1 = self.ws.protocol == _wire.V1_PROTOCOL

    async def open_websocket(self) -> aiohttp.ClientWebSocketResponse:
        assert self._session is not None
        return await self._session.ws_connect(
            f"/api/kernels/{self.kernel_id}/channels",
            params={"session_id": self.session_id},
            # No aiohttp heartbeat: a paused sandbox answers no ping, and that is not a dead peer. The
            # channel runs its own pings (KernelChannel._ping), and the reader answers the server's.
            autoping=False,
            # A message no execution could keep is refused by its header, before any of it is
            # buffered (aiohttp then closes the connection; the channel re-opens it).
            max_msg_size=self._max_msg_size,
            protocols=(_wire.V1_PROTOCOL,),
        )

    async def reopen(self, reason: str) -> aiohttp.ClientWebSocketResponse | str:
        """Re-open a websocket that broke, with the same session, so the gateway replays its buffer.

        A few attempts with growing pauses, within a budget that starts once the sandbox is not paused
        (a frozen gateway accepts connections but answers no handshake). Returns the new websocket, or
        why it could not be re-opened.
        """
        await self.wait_thawed()
        deadline = time.monotonic() + RECONNECT_BUDGET
        for delay in RECONNECT_DELAYS:
            if delay:
                await asyncio.sleep(delay)
            if self.container_ended():
                return "the sandbox's container has ended (killed, removed, or out of memory)"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                ws = await asyncio.wait_for(self.open_websocket(), min(RECONNECT_ATTEMPT_TIMEOUT, remaining))
            except aiohttp.WSServerHandshakeError as exc:
                reason = f"HTTP {exc.status}"
                if exc.status == 404:
                    return f"kernel {self.kernel_id} is gone (HTTP 404)"
                if exc.status in (401, 403):
                    break
                continue
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                reason = repr(exc)
                continue
            self.ws = ws
            logger.info("re-opened the websocket of kernel %s after it broke", self.kernel_id)
            return ws
        return reason

    def container_ended(self) -> bool:
        """Whether the container serving host:port has ended, as one procfs read tells (a container of
        this machine's engine that this user started; False when that cannot be known)."""
        recorded = _tokens.recorded_container(self.host, self.port)
        return recorded is not None and _tokens.container_ended(*recorded)

    def frozen(self) -> bool:
        """Whether the sandbox is paused (ipybox._freezer)."""
        return _freezer.frozen(self.host, self.port)

    async def wait_thawed(self) -> float:
        """Wait while the sandbox is paused; the seconds waited."""
        start = time.monotonic()
        while self.frozen():
            await asyncio.sleep(_THAW_POLL)
        return time.monotonic() - start

    async def send(self, msg_id: str, msg_type: str, content: dict[str, Any], channel: str = "shell") -> None:
        """Send a message on the current websocket: a shell request, or one on channel "ipybox" (approvals),
        which the server keeps from the kernel."""
        ws = self.ws
        if ws is None:
            raise ServerConnectionError(f"sending to kernel {self.kernel_id} failed: the client disconnected")
        request = {
            "header": {
                "msg_id": msg_id,
                "msg_type": msg_type,
                "username": "ipybox",
                "session": self.session_id,
                "date": datetime.now(UTC).isoformat(),
                "version": "5.3",
            },
            "parent_header": {},
            "metadata": {},
            "content": content,
        }
        try:
            if self.v1:
                await ws.send_bytes(_wire.encode_v1(channel, request))
            else:
                await ws.send_str(_wire.encode_json(channel, request))
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise ServerConnectionError(f"sending to kernel {self.kernel_id} failed: {exc}") from exc

    async def messages(self, ws: aiohttp.ClientWebSocketResponse) -> AsyncIterator[dict[str, Any] | Closed]:
        """The decoded messages of `ws`; the last item is always a `Closed` saying how it ended."""
        heard = self.heard
        async for frame in ws:
            heard.set()
            if frame.type is aiohttp.WSMsgType.PING:
                try:
                    await ws.pong(frame.data)
                except (aiohttp.ClientError, ConnectionError) as failure:
                    logger.debug("answering a ping of kernel %s failed: %s", self.kernel_id, failure)
                continue
            if frame.type is aiohttp.WSMsgType.PONG:
                continue
            if frame.type is aiohttp.WSMsgType.BINARY:
                channel, parts = _wire.split_v1(frame.data)
                del frame  # the frame's bytes go before the JSON is parsed: one copy of a big message less
                yield _wire.parse_v1(channel, parts)
            elif frame.type is aiohttp.WSMsgType.TEXT:
                text = frame.data
                del frame
                message = _wire.decode_json(text)
                del text  # not kept while the message is routed
                yield message
            elif frame.type is aiohttp.WSMsgType.ERROR:
                exc = frame.data
                if isinstance(exc, aiohttp.WebSocketError) and exc.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG:
                    match = _OVERSIZE.search(str(exc))
                    yield Closed(refused=int(match.group(1)) if match else 0)
                    return
                yield Closed(error=ServerConnectionError(f"the connection to kernel {self.kernel_id} failed: {exc}"))
                return
        yield Closed()

    async def kernel_action(self, action: str, doing: str, timeout: aiohttp.ClientTimeout) -> None:
        """POST /api/kernels/<id>/<action> (interrupt, restart), once the sandbox is not paused (a frozen
        gateway would hold the request, and its timeout would run, until the resume)."""
        if self._session is None or self.kernel_id is None:
            raise ServerConnectionError(f"{doing} the kernel failed: the client disconnected")
        await self.wait_thawed()
        try:
            async with self._session.post(f"/api/kernels/{self.kernel_id}/{action}", timeout=timeout) as response:
                if response.status >= 400:
                    raise status_error(response.status, f"{doing} the kernel", self.base_url)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ServerConnectionError(f"{doing} kernel {self.kernel_id} failed: {exc!r}") from exc

    async def close(self, shutdown: bool = True) -> None:
        """Close the websocket, shut the kernel down (unless `shutdown` is False), close the session.
        Safe to call repeatedly."""
        ws, self.ws = self.ws, None
        session, self._session = self._session, None
        kernel_id, self.kernel_id = self.kernel_id, None
        try:
            if ws is not None:
                await ws.close()
            if shutdown and session is not None and kernel_id is not None:
                try:
                    async with session.delete(f"/api/kernels/{kernel_id}", timeout=_SHUTDOWN_TIMEOUT):
                        pass
                except (aiohttp.ClientError, TimeoutError) as exc:
                    logger.debug("shutting down kernel %s failed: %s", kernel_id, exc)
        finally:
            if session is not None:
                await session.close()

    async def _create_kernel_direct(self, headers: dict[str, str]) -> bool:
        """Create the kernel over a direct route to the container; False when there is none that works.

        One try each with a short connect timeout, then the published port is used.
        """
        for base_url, connector, route in _routes.direct_sessions(self.host, self.port, EXECUTOR_PORT):
            session = aiohttp.ClientSession(base_url, headers=headers, timeout=_DIRECT_TIMEOUT, connector=connector)
            self._session, published = session, self.base_url
            self.base_url = base_url
            try:
                self.kernel_id = await self._create_kernel(1, 0)
                self.via = route
                return True
            except (AuthenticationError, KernelLimitError):
                raise
            except ServerConnectionError as exc:
                logger.info("direct route %s failed (%s); trying the next", route, exc)
            self._session, self.base_url = None, published
            await session.close()
        return False

    async def _create_kernel(self, retries: int, retry_interval: float) -> str:
        if self.existing is not None:
            return await self._find_kernel(self.existing, retries, retry_interval)

        async def refuse(response: aiohttp.ClientResponse) -> None:
            if response.status == 403 and "Resource Limit" in await response.text():
                raise KernelLimitError(
                    f"creating a kernel at {self.base_url} was refused: the container runs its maximum "
                    "number of kernels (ExecutionContainer max_kernels); disconnect another client first",
                    status=403,
                    option="ExecutionContainer(max_kernels=...)",
                )

        return await self._kernel_request(
            "POST", "/api/kernels", "creating a kernel", refuse, retries, retry_interval, json={"name": "python3"}
        )

    async def _find_kernel(self, kernel_id: str, retries: int, retry_interval: float) -> str:
        """Check that the gateway runs the kernel `kernel_id` (GET /api/kernels/<id>): connect to an existing one."""

        async def refuse(response: aiohttp.ClientResponse) -> None:
            if response.status == 404:
                raise RequestRefusedError(
                    f"the gateway at {self.base_url} runs no kernel {kernel_id} (HTTP 404): it was shut "
                    "down, or the sandbox is another one; ExecutionContainer.kernel_ids() lists its kernels",
                    status=404,
                    kernel_id=kernel_id,
                    option="ExecutionClient(kernel_id=...)",
                )

        return await self._kernel_request(
            "GET", f"/api/kernels/{kernel_id}", f"looking up kernel {kernel_id}", refuse, retries, retry_interval
        )

    async def _kernel_request(
        self,
        method: str,
        path: str,
        action: str,
        refuse: Callable[[aiohttp.ClientResponse], Awaitable[None]],
        retries: int,
        retry_interval: float,
        **kwargs: Any,
    ) -> str:
        """The id of the kernel model the gateway answers `method path` with, trying `retries` times.

        `refuse` raises for answers that another try cannot change; 401/403 raise too; other HTTP
        errors and connection errors are tried again.
        """
        assert self._session is not None
        last_error: Exception | None = None
        for attempt in range(max(retries, 1)):
            if attempt:
                await asyncio.sleep(retry_interval)
            try:
                async with self._session.request(method, path, **kwargs) as response:
                    await refuse(response)
                    if response.status in (401, 403):
                        raise status_error(response.status, action, self.base_url)
                    if response.status >= 400:
                        last_error = ServerConnectionError(
                            f"{action} at {self.base_url} failed: HTTP {response.status} {await response.text()}",
                            status=response.status,
                        )
                        continue
                    return str((await response.json())["id"])
            except aiohttp.ClientError as exc:
                last_error = exc
        raise ServerConnectionError(
            f"could not reach the kernel gateway at {self.base_url}{_where.suffix(self.host, self.port)} after "
            f"{max(retries, 1)} tries: {last_error}",
            option="ExecutionClient.connect(retries=..., retry_interval=...)",
        ) from last_error


def status_error(status: int, action: str, url: str) -> ServerConnectionError | AuthenticationError:
    if status in (401, 403):
        return AuthenticationError(
            f"{action} at {url} was refused (HTTP {status}): missing or wrong secret. Clients find the "
            "secret of containers started by this user automatically; for other containers pass token=...",
            status=status,
            option="ExecutionClient(token=...)",
        )
    return ServerConnectionError(f"{action} at {url} failed: HTTP {status}", status=status)
