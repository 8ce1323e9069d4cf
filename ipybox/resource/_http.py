"""The one place where resource-server HTTP responses and aiohttp errors become ipybox errors.

The server answers errors as JSON `{"error": "<message>"}` with a status: 400 a refused path, 401 a
missing or wrong secret, 404 a missing file, directory or module, 422 a request the server could not
carry out (e.g. an MCP server that cannot be reached), 500 anything else.

Requests have no total time limit, so a transfer may take as long as its data keeps moving. What is
bounded is inactivity (`ResourceClient(inactivity_timeout=...)`): connecting, each wait for response
bytes (aiohttp's `sock_connect` and `sock_read`), and each wait for the connection to take the next
chunk of an upload (`transfer()`'s watch). A stall becomes a ServerConnectionError naming the
operation, the route and the option.

A paused sandbox (`ExecutionContainer.pause()`) moves no data, and that is no stall: a request waits
for the sandbox to be resumed before it is sent, and an upload's watch does not run while the sandbox
is frozen. aiohttp's own wait for response bytes cannot be held, so a request already sent when the
sandbox is paused fails after `inactivity_timeout` (60 s by default) of pause, saying so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import aiohttp

from ipybox._errors import (
    AuthenticationError,
    RemoteFileNotFoundError,
    RemotePathError,
    ResourceError,
    ServerConnectionError,
    TransferStalledError,
)

_FROZEN_POLL = 0.25
"""Seconds between looks at the freezer while a request waits for a paused sandbox."""

DEFAULT_INACTIVITY_TIMEOUT = 60.0
"""Seconds a transfer may go without progress before it is given up (ResourceClient's default)."""


def client_timeout(inactivity_timeout: float | None, read_timeout: float | None = None) -> aiohttp.ClientTimeout:
    """No total limit (aiohttp's default is 300 s for the whole request, body included), only inactivity.

    `read_timeout` overrides the wait for response bytes (default: `inactivity_timeout`). Waiting for
    a free connection of the session's pool is not limited: that is not the server stalling.
    """
    read = inactivity_timeout if read_timeout is None else read_timeout
    return aiohttp.ClientTimeout(total=None, sock_connect=inactivity_timeout, sock_read=read)


@dataclass(frozen=True)
class Link:
    """A connected ResourceClient's session, with what its requests need to notice and report a stall."""

    session: aiohttp.ClientSession
    where: str  # the base URL and the route taken, for messages
    inactivity_timeout: float | None
    frozen: Callable[[], bool] = lambda: False  # is the sandbox paused? (ipybox._freezer)


class UploadWatch:
    """Gives up a request when the connection takes no chunk of its body for `inactivity_timeout` s.

    aiohttp applies `sock_read` only once the body is sent; while it is sent, a server that stops
    reading blocks the writer forever. The deadline runs while aiohttp holds a chunk (writing it,
    waiting for the socket to drain) and stops while the next one is read from local disk.
    """

    def __init__(self, timeout: asyncio.Timeout, seconds: float | None) -> None:
        self._timeout = timeout
        self._seconds = seconds
        self._open = True
        self._armed = False

    def arm(self) -> None:
        if self._open and self._seconds is not None:
            self._armed = True
            self._timeout.reschedule(asyncio.get_running_loop().time() + self._seconds)

    def disarm(self) -> None:
        if self._open:
            self._armed = False
            self._timeout.reschedule(None)

    def hold(self) -> None:
        """The sandbox is paused: the running deadline starts again (called while it stays frozen)."""
        if self._armed:
            self.arm()

    def close(self) -> None:
        """The request is over; a body writer still running must not touch the deadline any more."""
        self._open = False

    def body(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """`chunks`, as an upload body whose every chunk must be taken within the timeout."""
        return _WatchedBody(chunks, self)


class _WatchedBody:
    # A plain iterator, not an async generator: `chunks` keeps its own clean-up (finalised as before),
    # and no second generator races it for aclose() when both are collected together.

    def __init__(self, chunks: AsyncIterator[bytes], watch: UploadWatch) -> None:
        self._chunks = chunks
        self._watch = watch

    def __aiter__(self) -> _WatchedBody:
        return self

    async def __anext__(self) -> bytes:
        self._watch.disarm()  # aiohttp asks for the next chunk: the connection took the last one
        chunk = await self._chunks.__anext__()  # local disk: not the server's stall
        self._watch.arm()
        return chunk


def _stalled(link: Link, action: str, what: str, seconds: float | None) -> TransferStalledError:
    limit = f" for {seconds:g} s" if seconds is not None else ""
    return TransferStalledError(
        f"{action} via {link.where} stalled: {what}{limit}; for a slower link raise "
        "ResourceClient(inactivity_timeout=...), or pass None for no limit",
        option="ResourceClient(inactivity_timeout=...)",
    )


@asynccontextmanager
async def transfer(link: Link, action: str, read_timeout: float | None = None) -> AsyncIterator[UploadWatch]:
    """Map what goes wrong during the request `action` to ipybox errors, stalls included.

    `read_timeout`: the request's `sock_read` when it is not the link's inactivity timeout. The request
    is sent once the sandbox is not paused; while it is paused, the upload watch is held.
    """
    while link.frozen():
        await asyncio.sleep(_FROZEN_POLL)
    timeout = asyncio.timeout(None)
    watch = UploadWatch(timeout, link.inactivity_timeout)
    paused = [0.0]
    holder = asyncio.create_task(_hold_while_frozen(link, watch, paused)) if link.inactivity_timeout else None
    try:
        async with timeout:
            try:
                yield watch
            finally:
                watch.close()
                if holder is not None:
                    holder.cancel()
    except (TimeoutError, aiohttp.ClientError) as exc:
        if paused[0] and isinstance(exc, aiohttp.ServerTimeoutError) and not timeout.expired():
            raise _stalled(
                link,
                action,
                f"the sandbox was paused for {paused[0]:.0f} s while the request waited",
                link.inactivity_timeout if read_timeout is None else read_timeout,
            ) from exc
        if timeout.expired():
            raise _stalled(link, action, "the server took no data", link.inactivity_timeout) from exc
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            raise _stalled(link, action, "no connection", link.inactivity_timeout) from exc
        if isinstance(exc, aiohttp.ServerTimeoutError):
            seconds = link.inactivity_timeout if read_timeout is None else read_timeout
            raise _stalled(link, action, "no data arrived", seconds) from exc
        if isinstance(exc, aiohttp.ClientError):
            raise ServerConnectionError(f"{action}: the resource server does not answer: {exc}") from exc
        raise


async def _hold_while_frozen(link: Link, watch: UploadWatch, paused: list[float]) -> None:
    """Keep restarting the upload watch while the sandbox is paused; count the paused time in `paused[0]`."""
    while True:
        began = time.monotonic()
        await asyncio.sleep(_FROZEN_POLL)
        if link.frozen():
            watch.hold()
            paused[0] += time.monotonic() - began


async def raise_for_response(response: aiohttp.ClientResponse, action: str) -> None:
    """Raise the ipybox error for an error response; return quietly for 2xx."""
    if response.status < 400:
        return
    try:
        body = await response.json(content_type=None)
        detail = str(body.get("error", body)) if isinstance(body, dict) else str(body)
    except (ValueError, aiohttp.ClientError):
        detail = (await response.text())[:500]
    message = f"{action} failed: {detail} (HTTP {response.status})"
    if response.status in (401, 403):
        raise AuthenticationError(
            f"{action} was refused (HTTP {response.status}): missing or wrong secret; pass token=... for "
            "containers not started by this user"
        )
    if response.status == 400:
        raise RemotePathError(message, status=response.status)
    if response.status == 404:
        raise RemoteFileNotFoundError(message, status=response.status)
    raise ResourceError(message, status=response.status)


@contextmanager
def connection_errors(action: str) -> Iterator[None]:
    """Turn aiohttp's connection failures during `action` into ServerConnectionError."""
    try:
        yield
    except aiohttp.ClientError as exc:
        raise ServerConnectionError(f"{action}: the resource server does not answer: {exc}") from exc
