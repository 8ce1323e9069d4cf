"""ExecutionClient: runs code in a stateful IPython kernel of an ipybox container."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import json
import logging
import os
import re
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import aiohttp
import nbformat
from PIL import Image

from ipybox import _routes, _tokens, _wire
from ipybox._errors import (
    AuthenticationError,
    ExecutionError,
    ExecutionOutcomeUnknownError,
    ExecutionTimeoutError,
    InvalidStateError,
    KernelDiedError,
    ServerConnectionError,
)
from ipybox._escapes import split_unfinished_escape, strip_escapes
from ipybox._labels import EXECUTOR_PORT
from ipybox.outputs import (
    IMAGE_TYPES,
    Display,
    ErrorInfo,
    Event,
    Output,
    OutputArea,
    decode_image,
    error_info,
    output_from_content,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_OUTPUT_BYTES = 64 * 2**20
"""Default cap on the output one execution keeps in client memory."""
DEFAULT_MAX_HISTORY = 100
"""Default number of executions a client remembers for `export_notebook()`."""

_INTERRUPT_GRACE = 5.0
"""Seconds an interrupted execution gets to reach idle before the kernel is restarted."""
_RESTART_TIMEOUT = 30.0
"""Seconds a restarted kernel gets to answer again before the next execution fails."""
_NUDGE_INTERVAL = 0.2
"""Seconds between kernel_info nudges while waiting for a restarted kernel."""
_FRAME_SLACK = 2**20
"""Bytes a websocket message may exceed `max_output_bytes` by (headers, JSON quoting) and still be read."""
_ITEM_OVERHEAD = 64
"""Bytes each kept output is charged besides its content: the bookkeeping of a tiny output is
larger than its text, and a flood of tiny outputs must hit the cap as well."""
_BARRIER_IOPUB_WAIT = 2.0
"""Seconds to wait for a barrier's IOPub status after its shell reply before nudging again."""
_RECONNECT_DELAYS = (0.0, 0.1, 0.2, 0.4, 0.8, 1.6)
"""Pauses before each attempt to re-open a websocket that broke: six attempts in about 3 s."""
_RECONNECT_BUDGET = 10.0
"""Seconds all attempts to re-open a broken websocket may take together."""
_RECONNECT_ATTEMPT_TIMEOUT = 5.0
"""Seconds one attempt to re-open a broken websocket may take."""
_DIRECT_TIMEOUT = aiohttp.ClientTimeout(total=300, sock_connect=1)
"""aiohttp's default timeouts, but a container's own address must accept a connection within a second."""
_GAP_GRACE = 0.5
"""Seconds an execution that reached idle after a cut waits for messages still missing before it fails."""

_OVERSIZE = re.compile(r"Message size (\d+)")


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _utf8_head(text: str, size: int) -> str:
    """The longest prefix of `text` whose UTF-8 encoding has at most `size` bytes."""
    if text.isascii():
        return text[:size]
    return text.encode("utf-8", "surrogatepass")[:size].decode("utf-8", "ignore")


def _join_stripped(chunks: list[str], suffix: str) -> str:
    """`"".join(chunks).strip()` plus `suffix` on its own line, with one copy of the text, not three."""
    start, end = 0, len(chunks)
    while start < end and (not chunks[start] or chunks[start].isspace()):
        start += 1
    while end > start and (not chunks[end - 1] or chunks[end - 1].isspace()):
        end -= 1
    if start == end:
        return suffix
    if end - start == 1:
        parts = [chunks[start].strip()]
    else:
        parts = [chunks[start].lstrip(), *chunks[start + 1 : end - 1], chunks[end - 1].rstrip()]
    if suffix:
        parts.append("\n" + suffix)
    return "".join(parts)


class _Unset(enum.Enum):
    UNSET = enum.auto()


_UNSET = _Unset.UNSET


@dataclass
class ExecutionResult:
    """The outcome of an execution.

    Attributes:
        text: All stdout/stderr text, `execute_result` and `display_data` text, joined in order
            and stripped, terminal escape sequences removed; None when the code produced no text.
            An output with an image contributes its image to `images`, not its text. When output was
            truncated, a last line says how much was dropped.
        images: PIL images from `image/png` and `image/jpeg` outputs, in order.
        truncated: Output past `max_output_bytes` was dropped.
        dropped_bytes: How many bytes of output were dropped (at least; see `truncated`).
        stdout: The text written to stdout, escapes removed, not stripped.
        stderr: The text written to stderr, escapes removed, not stripped.
        outputs: The rich outputs (MIME bundles) as Jupyter shows them at the end: `execute_result`
            and `display_data` in order, with `update_display_data` and `clear_output` applied.
        execution_count: The kernel's number for this execution (`In [n]`); None when unknown.
        duration: Seconds from submitting the code to the kernel's idle status for it.
        error: The exception the code raised, when `raise_on_error=False` was asked for; else None.
    """

    text: str | None
    images: list[Image.Image] = field(default_factory=list)
    truncated: bool = False
    dropped_bytes: int = 0
    stdout: str = ""
    stderr: str = ""
    outputs: list[Output] = field(default_factory=list)
    execution_count: int | None = None
    duration: float = 0.0
    error: ErrorInfo | None = None


class _Terminal:
    """Put into an execution's queue when it can receive no more messages (disconnect, death)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


_IDLE = ("idle", None)


class _CutWindow:
    """What the reader saw of the kernel's numbered messages since the websocket broke.

    jupyter_client numbers every message a kernel sends (`header.msg_id` is
    `<session>_<pid>_<n>`, n counting up over all channels). While an execution runs, every
    message the kernel sends comes to this client, so a number missing between the last one seen
    before the cut and an execution's idle is a message lost in the cut. The exception: the kernel_info
    requests with which the gateway nudges a new websocket (on the control channel too, so served at
    once). Their replies go to the gateway, and it swallows the first IOPub message after a nudge;
    each such request excuses those of its three messages (busy, reply, idle) not seen.
    """

    def __init__(self, tag: str | None, mark: int) -> None:
        self.tag = tag  # "<session>_<pid>" of the kernel before the cut; None: never saw one
        self.mark = mark  # the highest number seen before the cut
        self.seen: set[int] = set()
        self.ours: set[str] = set()  # ids of this client's requests pending at or sent since the cut
        # (number, is idle) of each message seen for a kernel_info request of the gateway. Its
        # requests cannot be told apart by id (each new connection numbers them from 0 again); each
        # ends with one idle status, so the idle statuses count them.
        self.foreign: list[tuple[int, bool]] = []
        self.shutdown = False  # the kernel announced its shutdown (a restart) since the cut

    def complete_through(self, message: dict[str, Any]) -> bool:
        """True unless a message numbered between the cut and this one never arrived."""
        numbered = _numbered(message)
        if self.tag is None or numbered is None or numbered[0] != self.tag:
            return True
        last = numbered[1]
        missing = sum(1 for n in range(self.mark + 1, last + 1) if n not in self.seen)
        if not missing:
            return True
        foreign = [idle for number, idle in self.foreign if number <= last]
        return missing <= 3 * sum(foreign) - len(foreign)

    def note(self, message: dict[str, Any], number: int) -> None:
        self.seen.add(number)
        if message.get("msg_type") == "shutdown_reply":
            self.shutdown = True
        parent = message.get("parent_header") or {}
        if parent.get("msg_type") == "kernel_info_request" and parent.get("msg_id") not in self.ours:
            self.foreign.append((number, _is_idle(message)))


def _numbered(message: dict[str, Any]) -> tuple[str, int] | None:
    """("<session>_<pid>", n) from a jupyter_client message id, or None for another format."""
    tag, _, number = str((message.get("header") or {}).get("msg_id", "")).rpartition("_")
    return (tag, int(number)) if tag and number.isdigit() else None


def _is_idle(message: dict[str, Any]) -> bool:
    return message.get("msg_type") == "status" and message["content"].get("execution_state") == "idle"


class _Route:
    """The reader's side of one request: where its output goes and how much of it is kept.

    The reader task accounts for output here, before anything is queued, so an execution holds at
    most `limit` bytes however fast output arrives and however slowly (or never) it is consumed.
    Past the limit, output is counted and dropped; the request is still followed to its idle status.

    Queue items: ("stream", name, text), ("output", msg_type, Output), ("clear", wait),
    ("error", ErrorInfo), ("marker", text), ("idle", None), or a `_Terminal`.
    """

    def __init__(self, msg_id: str, limit: int | None, cap_name: int | None, raw: bool) -> None:
        self.msg_id = msg_id
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.limit = limit
        self.cap_name = cap_name
        self.raw = raw  # kernel_info nudges: whole messages, no accounting
        self.used = 0
        self.dropped = 0
        self.truncated = False
        self.lost = False  # messages went missing while the websocket was re-opened
        self.suspect = False  # pending when the websocket broke: its end is checked for lost messages
        self.held = False  # a suspect whose idle came while messages before it are still missing
        self.finished = False
        self.error: tuple[str, str] | None = None
        self.error_info: ErrorInfo | None = None
        self.execution_count: int | None = None
        self.started = time.monotonic()
        self.ended: float | None = None
        self._carry: dict[str, str] = {}  # per stream: an escape sequence cut at the end of its last chunk
        self._last_clear = False  # the last item queued was a clear_output

    @property
    def duration(self) -> float:
        return (time.monotonic() if self.ended is None else self.ended) - self.started

    def deliver(self, message: dict[str, Any]) -> bool:
        """Account for and queue one message; True once the request has reached idle."""
        if self.raw:
            self.queue.put_nowait(message)
            return False
        msg_type = message["msg_type"]
        content = message["content"]
        if msg_type == "stream":
            self._stream(str(content.get("name", "stdout")), str(content.get("text", "")))
        elif msg_type in ("execute_result", "display_data", "update_display_data"):
            self._flush_carry()
            self._output(msg_type, output_from_content(content, msg_type))
        elif msg_type == "clear_output":
            self._flush_carry()
            self._clear(bool(content.get("wait")))
        elif msg_type == "error":
            self._flush_carry()
            self._error(error_info(content))
        elif msg_type in ("execute_input", "execute_reply"):
            count = content.get("execution_count")
            if self.execution_count is None and isinstance(count, int) and not isinstance(count, bool):
                self.execution_count = count
        elif msg_type == "status" and content.get("execution_state") == "idle":
            # The end of an execution is the kernel's idle status for its request, not the
            # execute_reply: output may still follow the reply.
            self.finish()
            return True
        return False

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.ended = time.monotonic()
            self._flush_carry()
            self.queue.put_nowait(_IDLE)

    def drop(self, size: int) -> None:
        self.dropped += size
        if not self.truncated:
            self.truncated = True
            self._put(("marker", f"\n[output truncated: output past max_output_bytes={self.cap_name} is dropped]\n"))

    def marker(self) -> str:
        at_least = "at least " if self.lost else ""
        return f"[output truncated: {at_least}{self.dropped:,} bytes dropped past max_output_bytes={self.cap_name}]"

    def _put(self, item: tuple[Any, ...]) -> None:
        self._last_clear = item[0] == "clear"
        self.queue.put_nowait(item)

    def _room(self) -> int | None:
        return None if self.limit is None else self.limit - self.used

    def _fits(self, size: int) -> bool:
        room = self._room()
        return room is None or size + _ITEM_OVERHEAD <= room

    def _stream(self, name: str, text: str) -> None:
        carry = self._carry.pop(name, "")
        text, held = split_unfinished_escape(carry + text if carry else text)
        if held:
            self._carry[name] = held
        self._keep_text(name, strip_escapes(text))

    def _flush_carry(self) -> None:
        """Any other output ends the held escape sequences: what is held is stripped and kept."""
        if self._carry:
            carries, self._carry = self._carry, {}
            for name, carry in carries.items():
                self._keep_text(name, strip_escapes(carry))

    def _keep_text(self, name: str, text: str) -> None:
        if not text:
            return
        size = _utf8_size(text)
        if self._fits(size):
            self.used += size + _ITEM_OVERHEAD
            self._put(("stream", name, text))
            return
        head = self._head(text)
        if head:
            kept = _utf8_size(head)
            self.used += kept + _ITEM_OVERHEAD
            self._put(("stream", name, head))
            size -= kept
        self.drop(size)

    def _head(self, text: str) -> str:
        """The longest head of `text` that fits the room left."""
        room = self._room()
        if room is None:
            return text
        return _utf8_head(text, room - _ITEM_OVERHEAD) if room > _ITEM_OVERHEAD else ""

    def _output(self, msg_type: str, output: Output) -> None:
        """A MIME bundle is kept whole when it fits. One that does not fit is reduced to (the head of)
        its text/plain, marked `truncated`, unless it carries an image or is an update: those are
        dropped whole."""
        size = _bundle_size(output)
        if self._fits(size):
            self.used += size + _ITEM_OVERHEAD
            self._put(("output", msg_type, output))
            return
        plain = output.data.get("text/plain")
        image = any(mime in output.data for mime in IMAGE_TYPES)
        head = "" if image or msg_type == "update_display_data" or not isinstance(plain, str) else self._head(plain)
        if head:
            kept = _utf8_size(head)
            self.used += kept + _ITEM_OVERHEAD
            reduced = dataclasses.replace(output, data={"text/plain": head}, metadata={}, truncated=True)
            self._put(("output", msg_type, reduced))
            size -= kept
        self.drop(size)

    def _clear(self, wait: bool) -> None:
        if self._fits(0):
            self.used += _ITEM_OVERHEAD
            self._put(("clear", wait))
        elif not self._last_clear:
            # Past the cap a clear is still applied (it only shrinks what is shown); consecutive
            # ones are queued once, so a flood of them cannot grow the queue.
            self._put(("clear", wait))

    def _error(self, info: ErrorInfo) -> None:
        first = self.error_info is None
        self.error_info = info
        self.error = (f"{info.name}: {info.value}", info.traceback)
        size = _utf8_size(info.traceback) + _utf8_size(info.value)
        if first or self._fits(size):
            # A request has one error; its event is always queued. Further ones (only code that
            # forges kernel messages sends them) are accounted like any output.
            self.used += size + _ITEM_OVERHEAD
            self._put(("error", info))
        else:
            self.drop(size)


def _bundle_size(output: Output) -> int:
    """The bytes a MIME bundle is charged: images decoded, text as UTF-8, JSON values as JSON.

    text/plain and images are charged as they always were (text/plain with the newline `text` gives
    it, images at their decoded size), so `dropped_bytes` keeps its meaning for them; the names of
    other MIME types count too, so a bundle of many empty types cannot slip past the cap.
    """
    size = 0
    for mime, value in output.data.items():
        if mime == "text/plain" and isinstance(value, str):
            size += _utf8_size(value) + (0 if value.endswith("\n") else 1)
        elif mime in IMAGE_TYPES and isinstance(value, str):
            size += _b64_size(value)
        elif isinstance(value, str):
            size += len(mime) + _utf8_size(value)
        else:
            size += len(mime) + len(json.dumps(value, separators=(",", ":"), default=str))
    if output.metadata:
        size += len(json.dumps(output.metadata, separators=(",", ":"), default=str))
    return size


def _b64_size(encoded: str) -> int:
    return len(encoded) * 3 // 4 - encoded[-2:].count("=")


class Execution:
    """A submitted execution. Read its output with `stream()` or `events()`, or wait for `result()`."""

    def __init__(self, client: ExecutionClient, route: _Route) -> None:
        self._client = client
        self._route = route
        self._msg_id = route.msg_id
        self._queue = route.queue
        # The text lists share their strings: `_chunks` is all text in order (for `text`).
        self._chunks: list[str] = []
        self._stdout: list[str] = []
        self._stderr: list[str] = []
        self._images: list[Image.Image] = []
        self._area = OutputArea()
        self._error: Exception | None = None
        self._done = False
        self._reader: str | None = None  # "stream" or "events": the one that reads this execution

    @property
    def msg_id(self) -> str:
        """The id of the `execute_request` (the `parent_header.msg_id` of its output)."""
        return self._msg_id

    async def result(self, timeout: float = 120, *, raise_on_error: bool = True) -> ExecutionResult:
        """Wait for the execution to finish and return its output.

        Args:
            timeout: Seconds to wait, counted from this call. On expiry the kernel is interrupted
                (it keeps its state); if the code does not stop within a grace period, the kernel is
                restarted (its state is lost). Then `TimeoutError` is raised.
            raise_on_error: When the code raised: True raises `ExecutionError`; False returns the
                result with `error` set (name, value, traceback).

        Raises:
            ExecutionError: The code raised an exception (only with `raise_on_error=True`).
            TimeoutError: The execution did not finish within `timeout`.
            KernelDiedError: The kernel died while executing.
            ServerConnectionError: The connection to the container was lost.
        """
        async for _ in self._pump(timeout):
            pass
        failed = isinstance(self._error, ExecutionError)
        if self._error is not None and (raise_on_error or not failed):
            raise self._error
        route = self._route
        text = _join_stripped(self._chunks, route.marker() if route.truncated else "")
        return ExecutionResult(
            text=text or None,
            images=list(self._images),
            truncated=route.truncated,
            dropped_bytes=route.dropped,
            stdout="".join(self._stdout),
            stderr="".join(self._stderr),
            outputs=self._area.outputs,
            execution_count=route.execution_count,
            duration=route.duration,
            error=route.error_info if failed else None,
        )

    async def stream(self, timeout: float = 120) -> AsyncIterator[str]:
        """Yield text output as it arrives: stdout/stderr chunks and result/display text.

        Images are collected for `result()`. When output starts to be dropped (past
        `max_output_bytes`), a marker line saying so is yielded once. Raises as `result()` does,
        after yielding the output that arrived before the failure. An execution is read with
        either `stream()` or `events()`, not both; `result()` may follow either.
        """
        self._claim("stream")
        async for text, _ in self._pump(timeout):
            if text:
                yield text
        if self._error is not None:
            raise self._error

    async def events(self, timeout: float = 120) -> AsyncIterator[Event]:
        """Yield typed events in arrival order: `Stdout`, `Stderr`, `Display`, `Result`, `Error`, `Clear`.

        The code's exception is the `Error` event, not raised here (`result()` raises it afterwards
        unless `raise_on_error=False`). Output dropped past `max_output_bytes` yields no event
        (`result().truncated` says so). Raises `TimeoutError`, `KernelDiedError` and
        `ServerConnectionError` as `result()` does. An execution is read with either `stream()` or
        `events()`, not both; `result()` may follow either.
        """
        self._claim("events")
        async for _, event in self._pump(timeout):
            if event is not None:
                yield event
        if self._error is not None and not isinstance(self._error, ExecutionError):
            raise self._error

    def _claim(self, reader: str) -> None:
        if self._reader not in (None, reader):
            raise InvalidStateError(
                f"this execution is read with {self._reader}(); read an execution with either stream() or "
                "events(), not both (result() may follow either)"
            )
        self._reader = reader

    async def _pump(self, timeout: float) -> AsyncIterator[tuple[str | None, Event | None]]:
        """Take queued items until the end; per item its text for `stream()` and its event."""
        deadline = time.monotonic() + timeout
        while not self._done:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                item = await asyncio.wait_for(self._queue.get(), remaining)
            except TimeoutError:
                await self._stop_after_timeout(timeout)
                raise
            yield self._handle(item)

    def _handle(self, item: Any) -> tuple[str | None, Event | None]:
        if isinstance(item, _Terminal):
            self._finish(item.error)
            return None, None
        kind = item[0]
        if kind == "stream":
            _, name, text = item
            self._chunks.append(text)
            (self._stderr if name == "stderr" else self._stdout).append(text)
            return text, self._area.stream(name, text)
        if kind == "output":
            _, msg_type, output = item
            if msg_type == "update_display_data":
                self._area.update(output)
                self._client._update_displays(output, self._area)
                return None, Display(output, update=True)
            text = None
            if any(mime in output.data for mime in IMAGE_TYPES):
                # An output with an image contributes its image, not its text (`<Figure ...>`).
                image = decode_image(output)
                if image is not None:
                    self._images.append(image)
                else:
                    logger.debug("an image output of execution %s could not be decoded", self._msg_id)
            elif (plain := output.text) is not None:
                text = plain if plain.endswith("\n") else plain + "\n"
                self._chunks.append(text)
            return text, self._area.show(output)
        if kind == "clear":
            return None, self._area.clear(item[1])
        if kind == "error":
            return None, self._area.error(item[1])
        if kind == "marker":
            return str(item[1]), None
        if kind == "idle":
            error = self._route.error
            self._finish(None if error is None else ExecutionError(error[0], error[1], self._client._kernel_id))
        return None, None

    def _finish(self, error: Exception | None) -> None:
        self._done = True
        self._error = error
        self._client._forget(self._msg_id)

    async def _stop_after_timeout(self, timeout: float) -> None:
        """Interrupt the kernel; restart it when the code ignores the interrupt. Always raises."""
        await self._client.interrupt()
        # Drain until the interrupted request reaches idle, so its trailing output does not leak
        # into the next execution's result.
        deadline = time.monotonic() + _INTERRUPT_GRACE
        while not self._done and (remaining := deadline - time.monotonic()) > 0:
            try:
                self._handle(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        if self._done:
            error = ExecutionTimeoutError(
                f"Execution did not finish within timeout={timeout} s; the kernel was interrupted and keeps "
                "its state. Pass a larger timeout to execute(), result() or stream() for longer runs.",
                restarted=False,
            )
        else:
            self._finish(None)
            # The code ignores SIGINT (or is stuck in C code that never checks for it): only a
            # restart stops it.
            kernel_id = self._client._kernel_id
            stuck = (
                f"Execution did not finish within timeout={timeout} s and did not stop within "
                f"{_INTERRUPT_GRACE} s of an interrupt"
            )
            try:
                await self._client._restart_after_timeout()
            except (ServerConnectionError, KernelDiedError) as exc:
                error = ExecutionTimeoutError(f"{stuck}; restarting kernel {kernel_id} failed: {exc}", restarted=True)
                self._done = True
                self._error = error
                raise error from exc
            error = ExecutionTimeoutError(
                f"{stuck}; kernel {kernel_id} was restarted and its state (variables, imports) is lost. "
                "Pass a larger timeout to execute(), result() or stream() for longer runs.",
                restarted=True,
            )
        self._done = True
        self._error = error
        raise error


class ExecutionClient:
    """A client for one IPython kernel in an ipybox container's Kernel Gateway.

    `connect()` creates a new kernel and opens its websocket; `disconnect()` shuts the kernel
    down. Kernel state (variables, imports) persists across executions of one client. One reader
    task per websocket routes output to executions by request id, so several submitted
    executions never mix their output.

    Args:
        port: Host port of the container's executor port (`ExecutionContainer.executor_port`).
        host: Host name or address of the container's executor port.
        heartbeat_interval: Seconds between websocket pings; a connection that stops answering is
            detected and pending executions fail instead of hanging.
        token: The container's secret. Found automatically for containers started by this user
            on this machine; pass it explicitly for a container started elsewhere.
        max_output_bytes: Output bytes one execution keeps: text, images and rich outputs (each
            output also counts 64 bytes of bookkeeping); output past it is counted and dropped, and
            the result says so. A single websocket message larger than this (plus 1 MiB) is never
            read into memory. None: no limit. Override per call in `execute()` and `submit()`.
        max_history: Executions remembered for `export_notebook()`, the newest ones (0: none).
            Older ones are also forgotten once the executions before the newest hold more than
            `max_output_bytes` of output.

    Example:
        ```python
        async with ExecutionClient(port=container.executor_port) as client:
            await client.execute("x = 41")
            result = await client.execute("print(x + 1)")
            assert result.text == "42"
        ```
    """

    def __init__(
        self,
        port: int,
        host: str = "localhost",
        heartbeat_interval: float = 10,
        *,
        token: str | None = None,
        max_output_bytes: int | None = DEFAULT_MAX_OUTPUT_BYTES,
        max_history: int = DEFAULT_MAX_HISTORY,
    ) -> None:
        if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 0:
            raise ValueError(f"max_history must be an int >= 0, not {max_history!r}")
        self.port = port
        self.host = host
        self.heartbeat_interval = heartbeat_interval
        self.max_output_bytes = _check_limit(max_output_bytes)
        self._token = token
        self._base_url = f"http://{host}:{port}"
        self._via = "published port"  # or the direct route connect() found (ipybox._routes)
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._resyncs: set[asyncio.Task[None]] = set()
        self._kernel_id: str | None = None
        self._session_id = uuid.uuid4().hex
        self._pending: dict[str, _Route] = {}
        self._v1 = False
        self._kernel_restarted = False
        self._kernel_dead = False
        self._restart_lock = asyncio.Lock()
        self._reopened = asyncio.Event()
        self._reopened.set()
        # The kernel's message ids count up ("<session>_<pid>_<n>"): the tag and the highest n seen.
        self._kernel_tag: str | None = None
        self._last_counter = -1
        self._window: _CutWindow | None = None
        self._recovery: asyncio.Task[None] | None = None
        self.max_history = max_history
        self._history: collections.deque[_Cell] = collections.deque()
        self._history_dropped = 0  # executions forgotten by the history's limits

    @property
    def kernel_id(self) -> str:
        """The id of this client's kernel.

        Raises:
            RuntimeError: The client is not connected.
        """
        if self._kernel_id is None:
            raise InvalidStateError("ExecutionClient is not connected: call connect() first")
        return self._kernel_id

    async def __aenter__(self) -> ExecutionClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()

    async def connect(self, retries: int = 10, retry_interval: float = 1.0) -> None:
        """Create a kernel and connect to it.

        Args:
            retries: How many times to try reaching the gateway.
            retry_interval: Seconds between tries.

        Raises:
            AuthenticationError: The gateway rejected the secret (no retry).
            ServerConnectionError: The gateway could not be reached after all tries.
        """
        if self._session is not None:
            raise InvalidStateError("ExecutionClient is already connected")
        token = self._token or _tokens.lookup(self.host, self.port)
        headers = {"Authorization": f"token {token}"} if token else {}
        try:
            self._kernel_id = await self._create_kernel_direct(headers)
            if self._kernel_id is None:
                self._session = aiohttp.ClientSession(self._base_url, headers=headers)
                self._kernel_id = await self._create_kernel(retries, retry_interval)
            self._ws = await self._open_channels()
            # The gateway picks v1 when it supports it; older servers answer in legacy JSON.
            self._v1 = self._ws.protocol == _wire.V1_PROTOCOL
        except BaseException as exc:
            await self.disconnect()
            if isinstance(exc, aiohttp.WSServerHandshakeError):
                raise _status_error(exc.status, "opening the kernel websocket", self._base_url) from exc
            if isinstance(exc, aiohttp.ClientError):
                raise ServerConnectionError(f"opening the kernel websocket at {self._base_url} failed: {exc}") from exc
            raise
        self._reader = asyncio.create_task(self._read(self._ws), name=f"ipybox-kernel-reader-{self._kernel_id}")

    async def disconnect(self) -> None:
        """Shut the kernel down and close the connection. Safe to call repeatedly."""
        reader, self._reader = self._reader, None
        ws, self._ws = self._ws, None
        session, self._session = self._session, None
        kernel_id, self._kernel_id = self._kernel_id, None
        if reader is not None:
            reader.cancel()
        for task in list(self._resyncs):
            task.cancel()
        self._fail_pending(ServerConnectionError("the client disconnected"))
        self._reopened.set()
        try:
            if ws is not None:
                await ws.close()
            if session is not None and kernel_id is not None:
                try:
                    async with session.delete(f"/api/kernels/{kernel_id}", timeout=aiohttp.ClientTimeout(total=5)):
                        pass
                except (aiohttp.ClientError, TimeoutError) as exc:
                    logger.debug("shutting down kernel %s failed: %s", kernel_id, exc)
        finally:
            if session is not None:
                await session.close()

    async def execute(
        self,
        code: str,
        timeout: float = 120,
        *,
        max_output_bytes: int | None | _Unset = _UNSET,
        raise_on_error: bool = True,
    ) -> ExecutionResult:
        """Execute code and return its output.

        Args:
            code: Python code; top-level `await` works.
            timeout: Seconds to wait. On expiry the kernel is interrupted (it keeps its state); if
                the code ignores the interrupt for 5 s, the kernel is restarted (its state is lost).
                Then `TimeoutError` is raised; its message says which happened.
            max_output_bytes: This execution's output cap; default: the client's. None: no limit.
            raise_on_error: When the code raised: True raises `ExecutionError`; False returns the
                result with `error` set (name, value, traceback).

        Raises:
            ExecutionError: The code raised an exception (`.message`, `.trace`), with
                `raise_on_error=True`.
            TimeoutError: The execution did not finish within `timeout`.
            KernelDiedError: The kernel died while executing.
        """
        execution = await self.submit(code, max_output_bytes=max_output_bytes)
        return await execution.result(timeout=timeout, raise_on_error=raise_on_error)

    async def submit(self, code: str, *, max_output_bytes: int | None | _Unset = _UNSET) -> Execution:
        """Send code for execution and return at once; read output from the returned Execution.

        Args:
            code: Python code; top-level `await` works.
            max_output_bytes: This execution's output cap; default: the client's. None: no limit.

        Raises:
            RuntimeError: The client is not connected.
            ServerConnectionError: Sending failed.
            KernelDiedError: The kernel died and could not be restarted, or did not come back.
        """
        limit = self.max_output_bytes if isinstance(max_output_bytes, _Unset) else _check_limit(max_output_bytes)
        if self._ws is None or self._reader is None:
            raise InvalidStateError("ExecutionClient is not connected: call connect() first")
        if self._reader.done():
            # Connected, but the connection was lost (the server went away): an environment failure.
            raise ServerConnectionError(
                f"the connection to kernel {self._kernel_id} was lost; connect a new client to go on"
            )
        if self._kernel_dead:
            raise KernelDiedError(f"kernel {self._kernel_id} died and could not be restarted", self._kernel_id)
        if self._kernel_restarted:
            async with self._restart_lock:
                if self._kernel_restarted:
                    await self._await_restarted_kernel()
                    self._kernel_restarted = False
        route = self._register(limit)
        await self._send(
            route.msg_id,
            "execute_request",
            {
                "code": code,
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": False,
                "stop_on_error": True,
            },
        )
        execution = Execution(self, route)
        self._remember(code, execution)
        return execution

    async def interrupt(self) -> None:
        """Interrupt the kernel's current execution (like Ctrl-C); the kernel keeps its state.

        The interrupted execution ends with a `KeyboardInterrupt` error (`ExecutionError`, or its
        result's `error` with `raise_on_error=False`). Executions queued behind it still run.
        """
        await self._kernel_action("interrupt", "interrupting", aiohttp.ClientTimeout(total=30))

    async def reset(self) -> None:
        """Restart the kernel: a fresh interpreter in the same container; returns once it answers.

        Variables and imports are gone; files in the container stay. Executions still pending fail
        with `KernelDiedError`. The history for `export_notebook()` is kept (execution counts start
        again at 1).

        Raises:
            RuntimeError: The client is not connected.
            ServerConnectionError: The restart request failed.
            KernelDiedError: The kernel did not come back.
        """
        await self._restart("was reset (ExecutionClient.reset())")

    async def export_notebook(self, path: str | os.PathLike[str]) -> None:
        """Write the executions this client ran as a Jupyter notebook (`.ipynb`, nbformat 4).

        One code cell per execution, in submission order, with its execution count and its outputs
        as Jupyter shows them (streams, rich outputs with updates and clears applied, the error).
        An execution still running, or whose output was not read yet, has the outputs read so far.
        Only the newest `max_history` executions are remembered (see `ExecutionClient`); a leading
        markdown cell says how many were forgotten. Works after `disconnect()` as well.
        """
        notebook = self._notebook()
        await asyncio.to_thread(_write_notebook, notebook, os.fspath(path))

    # -- internals --------------------------------------------------------------------------------

    async def _kernel_action(self, action: str, doing: str, timeout: aiohttp.ClientTimeout) -> None:
        if self._session is None or self._kernel_id is None:
            raise InvalidStateError("ExecutionClient is not connected: call connect() first")
        try:
            async with self._session.post(f"/api/kernels/{self._kernel_id}/{action}", timeout=timeout) as response:
                if response.status >= 400:
                    raise _status_error(response.status, f"{doing} the kernel", self._base_url)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ServerConnectionError(f"{doing} kernel {self._kernel_id} failed: {exc!r}") from exc

    async def _restart_after_timeout(self) -> None:
        """Restart a kernel that ignored an interrupt and wait until it answers again."""
        await self._restart("was restarted after an execution timed out and ignored the interrupt")

    async def _restart(self, why: str) -> None:
        """Restart the kernel through the gateway and wait until it answers again."""
        if self._session is None or self._kernel_id is None:
            raise InvalidStateError("ExecutionClient is not connected: call connect() first")
        # Until the kernel answers again, new submissions wait for the restart lock and nudge.
        self._kernel_restarted = True
        async with self._restart_lock:
            # Pending requests (those queued behind a runaway one, say) die with the old kernel.
            self._fail_pending(
                KernelDiedError(
                    f"kernel {self._kernel_id} {why}; its state (variables, imports) is lost",
                    self._kernel_id,
                )
            )
            await self._kernel_action("restart", "restarting", aiohttp.ClientTimeout(total=_RESTART_TIMEOUT))
            await self._await_restarted_kernel()
            self._kernel_restarted = False

    async def _open_channels(self) -> aiohttp.ClientWebSocketResponse:
        assert self._session is not None
        limit = self.max_output_bytes
        return await self._session.ws_connect(
            f"/api/kernels/{self._kernel_id}/channels",
            params={"session_id": self._session_id},
            heartbeat=self.heartbeat_interval,
            # A message no execution could keep is refused by its header, before any of it is
            # buffered (aiohttp then closes the connection; the reader re-opens it).
            max_msg_size=0 if limit is None else limit + _FRAME_SLACK,
            protocols=(_wire.V1_PROTOCOL,),
        )

    async def _create_kernel_direct(self, headers: dict[str, str]) -> str | None:
        """Create the kernel over a direct route to the container (ipybox._routes); None when there is none.

        The gateway's unix socket first, then the container's own address; one try each with a short
        connect timeout, then the published port is used. On success the session stays on that route,
        for the websocket and every later request.
        """
        for base_url, connector, route in _routes.direct_sessions(self.host, self.port, EXECUTOR_PORT):
            session = aiohttp.ClientSession(base_url, headers=headers, timeout=_DIRECT_TIMEOUT, connector=connector)
            self._session, published = session, self._base_url
            self._base_url = base_url
            try:
                kernel_id = await self._create_kernel(1, 0)
                self._via = route
                return kernel_id
            except AuthenticationError:
                raise
            except ServerConnectionError as exc:
                logger.info("direct route %s failed (%s); trying the next", route, exc)
            self._session, self._base_url = None, published
            await session.close()
        return None

    async def _create_kernel(self, retries: int, retry_interval: float) -> str:
        assert self._session is not None
        last_error: Exception | None = None
        for attempt in range(max(retries, 1)):
            if attempt:
                await asyncio.sleep(retry_interval)
            try:
                async with self._session.post("/api/kernels", json={"name": "python3"}) as response:
                    if response.status == 403 and "Resource Limit" in await response.text():
                        raise ServerConnectionError(
                            f"creating a kernel at {self._base_url} was refused: the container runs its maximum "
                            "number of kernels (ExecutionContainer max_kernels); disconnect another client first"
                        )
                    if response.status in (401, 403):
                        raise _status_error(response.status, "creating a kernel", self._base_url)
                    if response.status >= 400:
                        last_error = ServerConnectionError(
                            f"creating a kernel at {self._base_url} failed: HTTP {response.status} "
                            f"{await response.text()}"
                        )
                        continue
                    return str((await response.json())["id"])
            except aiohttp.ClientError as exc:
                last_error = exc
        raise ServerConnectionError(
            f"could not reach the kernel gateway at {self._base_url} after {max(retries, 1)} tries "
            f"(retries={retries}, retry_interval={retry_interval}): {last_error}"
        ) from last_error

    def _register(self, limit: int | None = None, raw: bool = False) -> _Route:
        msg_id = uuid.uuid4().hex
        cap_name = limit if limit is not None else self.max_output_bytes
        route = _Route(msg_id, limit, cap_name, raw)
        self._pending[msg_id] = route
        return route

    async def _send(self, msg_id: str, msg_type: str, content: dict[str, Any]) -> None:
        """Send a shell request whose output the reader routes to `self._pending[msg_id]`."""
        ws = self._ws
        while ws is not None and ws.closed and self._reader is not None and not self._reader.done():
            # The reader is re-opening a connection that a refused message closed.
            if self._reopened.is_set():
                await asyncio.sleep(0.01)
            else:
                await self._reopened.wait()
            ws = self._ws
        if ws is None:
            self._pending.pop(msg_id, None)
            raise ServerConnectionError(f"sending to kernel {self._kernel_id} failed: the client disconnected")
        if self._window is not None:
            self._window.ours.add(msg_id)
        request = {
            "header": {
                "msg_id": msg_id,
                "msg_type": msg_type,
                "username": "ipybox",
                "session": self._session_id,
                "date": datetime.now(UTC).isoformat(),
                "version": "5.3",
            },
            "parent_header": {},
            "metadata": {},
            "content": content,
        }
        try:
            if self._v1:
                await ws.send_bytes(_wire.encode_v1("shell", request))
            else:
                await ws.send_str(_wire.encode_json("shell", request))
        except (aiohttp.ClientError, ConnectionError) as exc:
            self._pending.pop(msg_id, None)
            raise ServerConnectionError(f"sending to kernel {self._kernel_id} failed: {exc}") from exc

    async def _await_restarted_kernel(self) -> None:
        """Wait until a restarted kernel answers on shell and its IOPub reaches us again.

        The gateway announces a restart before the new kernel runs and re-subscribes to its IOPub;
        a request sent at once could have its output published before that subscription is up, and
        its execution would wait for an idle status that never comes. So, as the gateway does for a
        new connection, nudge with kernel_info requests until one's IOPub status arrives.
        """
        terminal = await self._nudge_until_iopub()
        if terminal is not None:
            raise terminal.error

    async def _nudge_until_iopub(self) -> _Terminal | None:
        """Send kernel_info requests until one's IOPub status arrives; the terminal event if the wait ended."""
        deadline = time.monotonic() + _RESTART_TIMEOUT
        while time.monotonic() < deadline:
            route = self._register(raw=True)
            try:
                await self._send(route.msg_id, "kernel_info_request", {})
                wait_until = time.monotonic() + _NUDGE_INTERVAL
                while (remaining := wait_until - time.monotonic()) > 0:
                    try:
                        message = await asyncio.wait_for(route.queue.get(), remaining)
                    except TimeoutError:
                        break
                    if isinstance(message, _Terminal):
                        return message
                    if message.get("channel") == "iopub":
                        return None
            finally:
                self._pending.pop(route.msg_id, None)
        raise KernelDiedError(
            f"kernel {self._kernel_id} did not come back within {_RESTART_TIMEOUT} s after a restart",
            self._kernel_id,
        )

    async def _resynchronize(self, suspects: list[_Route]) -> None:
        """Finish the requests whose idle status was lost while the websocket was re-opened.

        Messages the gateway had already written to the old connection are gone. The kernel serves
        shell requests in order, so once a kernel_info request sent now has been answered (and its
        IOPub status arrived), every earlier request has ended: one still unfinished lost its idle.
        """
        barrier = self._register(raw=True)
        try:
            await self._send(barrier.msg_id, "kernel_info_request", {})
            # No deadline for the first answer: it waits for the running execution, which its own
            # timeout bounds.
            message = await barrier.queue.get()
            while not isinstance(message, _Terminal) and message.get("channel") != "iopub":
                try:
                    message = await asyncio.wait_for(barrier.queue.get(), _BARRIER_IOPUB_WAIT)
                except TimeoutError:
                    # The shell reply came but its IOPub status did not: a fresh subscription.
                    await self._nudge_until_iopub()
                    break
        except Exception as exc:  # the suspects are finished below either way
            logger.debug("resynchronizing with kernel %s failed: %r", self._kernel_id, exc)
        finally:
            self._pending.pop(barrier.msg_id, None)
        for route in suspects:
            if not route.finished:
                route.lost = True
                route.truncated = True
                route.finish()
                self._pending.pop(route.msg_id, None)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """The one reader of the websocket: routes each message to its request's route."""
        error: Exception = ServerConnectionError(f"the connection to kernel {self._kernel_id} was closed")
        try:
            while True:
                oversize = await self._route_messages(ws)
                if not isinstance(oversize, int):
                    # The connection broke (or the server closed it) without our asking.
                    if oversize is not None:
                        error = oversize
                    if self._kernel_dead:
                        break
                    reopened = await self._reconnect(oversize)
                    if isinstance(reopened, Exception):
                        error = reopened
                        break
                    ws = reopened
                    continue
                # The refused message belongs to the request the kernel is running: the oldest one.
                suspects = [route for route in self._pending.values() if not route.raw]
                if suspects:
                    suspects[0].drop(oversize)
                    suspects[0].lost = True
                self._reopened.clear()
                try:
                    # The gateway buffers the kernel's messages for this session until it is back.
                    ws = self._ws = await self._open_channels()
                finally:
                    self._reopened.set()
                if suspects:
                    task = asyncio.create_task(self._resynchronize(suspects))
                    self._resyncs.add(task)
                    task.add_done_callback(self._resyncs.discard)
        except Exception as exc:  # a dying reader must never leave callers waiting
            error = ServerConnectionError(f"reading from kernel {self._kernel_id} failed: {exc!r}")
            raise
        finally:
            self._fail_pending(error)

    async def _reconnect(self, cause: Exception | None) -> aiohttp.ClientWebSocketResponse | Exception:
        """Re-open a websocket that broke, with the same session, so the gateway replays its buffer.

        The gateway keeps a session's messages while it has no websocket and sends them to the next
        websocket of the same session. Executions pending at the cut are followed on the new
        websocket; a recovery task then checks that none of their messages went missing. Nothing is
        ever sent again. Returns the new websocket, or the error that pending executions get.
        """
        suspects = [route for route in self._pending.values() if not route.raw]
        if suspects and self._window is None:
            self._window = _CutWindow(self._kernel_tag, self._last_counter)
        if self._window is not None:
            self._window.ours.update(self._pending)
        for route in suspects:
            route.suspect = True
        kernel_id = self._kernel_id
        reason = f"{cause}" if cause is not None else "the server closed it"
        self._reopened.clear()
        try:
            deadline = time.monotonic() + _RECONNECT_BUDGET
            for delay in _RECONNECT_DELAYS:
                if delay:
                    await asyncio.sleep(delay)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    ws = await asyncio.wait_for(self._open_channels(), min(_RECONNECT_ATTEMPT_TIMEOUT, remaining))
                except aiohttp.WSServerHandshakeError as exc:
                    reason = f"HTTP {exc.status}"
                    if exc.status == 404:
                        reason = f"kernel {kernel_id} is gone (HTTP 404)"
                        break
                    if exc.status in (401, 403):
                        break
                    continue
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    reason = repr(exc)
                    continue
                self._ws = ws
                logger.info("re-opened the websocket of kernel %s after it broke", kernel_id)
                if suspects:
                    self._start_recovery(suspects)
                return ws
        finally:
            self._reopened.set()
        self._window = None
        what = f"the connection to kernel {kernel_id} broke and could not be re-opened ({reason})"
        if suspects:
            return _outcome_unknown(what, kernel_id)
        return ServerConnectionError(what)

    def _start_recovery(self, suspects: list[_Route]) -> None:
        if self._recovery is not None:
            # A cut during a recovery: the new one follows every execution still pending.
            self._recovery.cancel()
        task = asyncio.create_task(self._recover(suspects, self._window.tag if self._window else None))
        self._recovery = task
        self._resyncs.add(task)
        task.add_done_callback(self._resyncs.discard)

    async def _recover(self, suspects: list[_Route], tag: str | None) -> None:
        """Fail the executions pending at a cut whose end did not arrive with the gateway's replay.

        A kernel_info request sent now is served after every earlier request (the kernel serves shell
        requests in order); once its reply and its IOPub status are here, so is every message of the
        earlier requests that the gateway kept. An execution still unfinished then lost its end in
        the cut, or never reached the kernel, or the kernel was restarted meanwhile (its replies then
        carry another kernel session).
        """
        kernel_id = self._kernel_id
        window = self._window
        restarted = False
        barrier = self._register(raw=True)
        try:
            await self._send(barrier.msg_id, "kernel_info_request", {})
            replied = published = False
            # No deadline for the first answer: it waits for the running executions, which their own
            # timeouts bound.
            message = await barrier.queue.get()
            while not isinstance(message, _Terminal):
                numbered = _numbered(message)
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
            logger.debug("recovering kernel %s after a cut failed: %r", kernel_id, exc)
        finally:
            self._pending.pop(barrier.msg_id, None)
            if self._recovery is asyncio.current_task():
                self._recovery = None
                self._window = None
        if window is not None and restarted:
            window.shutdown = True
        why = self._cut_reason(window, lost=False)
        for route in suspects:
            if not route.finished and not route.held and self._pending.get(route.msg_id) is route:
                self._fail_route(route, _outcome_unknown(why, kernel_id))

    def _cut_reason(self, window: _CutWindow | None, lost: bool) -> str:
        cut = f"the connection to kernel {self._kernel_id} broke during the execution"
        if window is not None and (window.shutdown or (window.tag is not None and self._kernel_tag != window.tag)):
            return f"{cut} and the kernel was restarted meanwhile (its state, variables and imports, is lost)"
        if lost:
            return f"{cut} and messages of it were lost (its output and whether it raised are unknown)"
        return f"{cut} and its end did not come with the messages the gateway kept"

    def _hold(self, route: _Route, idle: dict[str, Any], window: _CutWindow) -> None:
        """A suspect reached idle while messages before its idle are missing: wait for them briefly."""
        route.held = True

        def settle() -> None:
            if route.finished or self._pending.get(route.msg_id) is not route:
                return
            if window.complete_through(idle):
                route.deliver(idle)
                self._pending.pop(route.msg_id, None)
            else:
                self._fail_route(route, _outcome_unknown(self._cut_reason(window, lost=True), self._kernel_id))

        asyncio.get_running_loop().call_later(_GAP_GRACE, settle)

    def _fail_route(self, route: _Route, error: Exception) -> None:
        route.finished = True
        self._pending.pop(route.msg_id, None)
        route.queue.put_nowait(_Terminal(error))

    def _note(self, message: dict[str, Any]) -> None:
        """Follow the numbers of the kernel's messages (see `_CutWindow`)."""
        numbered = _numbered(message)
        if numbered is None:
            return
        tag, number = numbered
        if tag != self._kernel_tag:
            self._kernel_tag, self._last_counter = tag, number  # the first message, or a new kernel
        elif number > self._last_counter:
            self._last_counter = number
        window = self._window
        if window is not None and tag == window.tag:
            window.note(message, number)

    async def _route_messages(self, ws: aiohttp.ClientWebSocketResponse) -> int | Exception | None:
        """Route messages until the connection closes.

        Returns the size of a message refused as too big (it closed the connection), the error that
        closed it, or None for a plain close.
        """
        async for frame in ws:
            if frame.type is aiohttp.WSMsgType.BINARY:
                message = _wire.decode_v1(frame.data)
            elif frame.type is aiohttp.WSMsgType.TEXT:
                message = _wire.decode_json(frame.data)
            else:
                if frame.type is aiohttp.WSMsgType.ERROR:
                    exc = frame.data
                    if isinstance(exc, aiohttp.WebSocketError) and exc.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG:
                        match = _OVERSIZE.search(str(exc))
                        return int(match.group(1)) if match else 0
                    return ServerConnectionError(f"the connection to kernel {self._kernel_id} failed: {exc}")
                continue
            state = message["content"].get("execution_state") if message.get("msg_type") == "status" else None
            if state in ("restarting", "dead"):
                # The gateway reports a kernel death with a status message that has no parent:
                # every pending execution is lost.
                self._kernel_restarted = state == "restarting"
                self._kernel_dead = state == "dead"
                what = "was restarted" if state == "restarting" else "could not be restarted"
                # The server adds why, when it knows (the container's OOM killer).
                reason = message["content"].get("ipybox_reason")
                cause = f" ({reason}; raise the container's memory_limit)" if reason == "out of memory" else ""
                self._fail_pending(
                    KernelDiedError(
                        f"kernel {self._kernel_id} died during execution{cause} and {what}; its state "
                        "(variables, imports) is lost",
                        self._kernel_id,
                    )
                )
                continue
            self._note(message)
            parent_id = (message.get("parent_header") or {}).get("msg_id")
            route = self._pending.get(parent_id) if parent_id else None
            if route is None or route.held:
                continue
            window = self._window
            if route.suspect and window is not None and _is_idle(message) and not window.complete_through(message):
                self._hold(route, message, window)
            elif route.deliver(message):
                self._pending.pop(route.msg_id, None)
        return None

    def _fail_pending(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for route in pending.values():
            route.queue.put_nowait(_Terminal(error))

    def _forget(self, msg_id: str) -> None:
        self._pending.pop(msg_id, None)

    # -- history for export_notebook() ------------------------------------------------------------

    def _remember(self, code: str, execution: Execution) -> None:
        """Add an execution to the history, then forget the oldest beyond the history's limits.

        The history holds each execution's output area (output already accounted against the
        execution's cap), never the Execution itself. Beyond `max_history` executions, and while the
        executions before the newest hold more than `max_output_bytes`, the oldest are forgotten.
        """
        if self.max_history == 0:
            self._history_dropped += 1
            return
        self._history.append(_Cell(code, execution._route, execution._area))
        budget = self.max_output_bytes
        older = sum(cell.route.used for cell in self._history) - self._history[-1].route.used
        while len(self._history) > self.max_history or (
            budget is not None and len(self._history) > 1 and older > budget
        ):
            forgotten = self._history.popleft()
            older -= forgotten.route.used
            self._history_dropped += 1

    def _update_displays(self, output: Output, area: OutputArea) -> None:
        """An update_display_data also updates that display in earlier executions, as Jupyter does."""
        for cell in self._history:
            if cell.area is not area:
                cell.area.update(output)

    def _notebook(self) -> nbformat.NotebookNode:
        v4: Any = nbformat.v4  # nbformat's functions carry no annotations
        nbformat_from_dict: Any = nbformat.from_dict
        cells = []
        if self._history_dropped:
            cells.append(
                v4.new_markdown_cell(
                    f"*{self._history_dropped} earlier execution(s) of this client are not in this notebook: "
                    f"the client remembers the newest {self.max_history} (ExecutionClient max_history) and "
                    "forgets older ones once they hold more than max_output_bytes of output.*"
                )
            )
        for cell in self._history:
            cells.append(
                v4.new_code_cell(
                    source=cell.code,
                    execution_count=cell.route.execution_count,
                    outputs=nbformat_from_dict(cell.area.nbformat()),
                )
            )
        notebook: nbformat.NotebookNode = v4.new_notebook(
            cells=cells,
            metadata={
                "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
                "language_info": {"name": "python"},
            },
        )
        return notebook


@dataclass
class _Cell:
    """One execution in the history: its code, its route (count, output size), its output area."""

    code: str
    route: _Route
    area: OutputArea


def _write_notebook(notebook: nbformat.NotebookNode, path: str) -> None:
    """Write atomically: a temporary file next to `path`, then renamed over it."""
    text: str = nbformat.writes(notebook)  # type: ignore[no-untyped-call]
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".ipybox-", suffix=".ipynb", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _outcome_unknown(why: str, kernel_id: str | None) -> ExecutionOutcomeUnknownError:
    return ExecutionOutcomeUnknownError(
        f"{why}; the outcome of the execution is unknown: its code may or may not have run (fully or in "
        "part). It was not executed again; check the sandbox's state before running it again.",
        kernel_id,
    )


def _check_limit(limit: int | None) -> int | None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"max_output_bytes must be a positive int or None, not {limit!r}")
    return limit


def _status_error(status: int, action: str, url: str) -> ServerConnectionError:
    if status in (401, 403):
        return AuthenticationError(
            f"{action} at {url} was refused (HTTP {status}): missing or wrong secret. Clients find the "
            "secret of containers started by this user automatically; for other containers pass token=..."
        )
    return ServerConnectionError(f"{action} at {url} failed: HTTP {status}")
