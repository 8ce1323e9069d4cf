"""ExecutionClient: runs code in a stateful IPython kernel of an ipybox container."""

from __future__ import annotations

import asyncio
import base64
import enum
import io
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import aiohttp
from PIL import Image

from ipybox import _tokens, _wire
from ipybox._errors import (
    AuthenticationError,
    ExecutionError,
    ExecutionTimeoutError,
    InvalidStateError,
    KernelDiedError,
    ServerConnectionError,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_OUTPUT_BYTES = 64 * 2**20
"""Default cap on the output one execution keeps in client memory."""

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
_MAX_ESCAPE_CARRY = 4096
"""Longest unfinished escape sequence held back at the end of a stream chunk for the next one."""

# Terminal escape sequences (ECMA-48), in 7-bit and 8-bit (C1) form. No alternative can backtrack
# over more than the run up to the next ESC, so stripping stays linear on hostile input.
_STRING_SEQUENCE = r"(?:\x1b[P\]X^_]|[\x90\x98\x9d-\x9f])[^\x07\x1b\x9c]*"  # OSC, DCS, SOS, PM, APC
_ESCAPES = re.compile(
    _STRING_SEQUENCE + r"(?:\x07|\x1b\\|\x9c)?"  # ... ended by BEL or ST; unterminated: to the end
    r"|(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor movement, ...
    r"|\x1b[ -/]*[0-~]"  # other escapes: ESC c (reset), ESC 7, ESC ( B, ...
    r"|\x1b"  # a stray ESC
)
_UNFINISHED_ESCAPE = re.compile(r"(?:" + _STRING_SEQUENCE + r"|(?:\x1b\[|\x9b)[0-?]*[ -/]*|\x1b[ -/]*)\Z")
_OVERSIZE = re.compile(r"Message size (\d+)")


def _strip_escapes(text: str) -> str:
    """Remove terminal escape sequences (CSI, OSC, DCS, ...) so output cannot drive a terminal."""
    return _ESCAPES.sub("", text) if _ESCAPES.search(text) else text


def _split_unfinished_escape(text: str) -> tuple[str, str]:
    """Split off an escape sequence that the end of a stream chunk cut in two."""
    tail = text[-_MAX_ESCAPE_CARRY:]
    match = _UNFINISHED_ESCAPE.search(tail)
    if match is None:
        return text, ""
    cut = len(text) - len(tail) + match.start()
    return text[:cut], text[cut:]


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
    """The outcome of a successful execution.

    Attributes:
        text: All stdout/stderr text, `execute_result` and `display_data` text, joined in order
            and stripped, terminal escape sequences removed; None when the code produced no text.
            When output was truncated, a last line says how much was dropped.
        images: PIL images from `image/png` outputs, in order.
        truncated: Output past `max_output_bytes` was dropped.
        dropped_bytes: How many bytes of text and images were dropped (at least; see `truncated`).
    """

    text: str | None
    images: list[Image.Image] = field(default_factory=list)
    truncated: bool = False
    dropped_bytes: int = 0


class _Terminal:
    """Put into an execution's queue when it can receive no more messages (disconnect, death)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


_IDLE = ("idle", None)


class _Route:
    """The reader's side of one request: where its output goes and how much of it is kept.

    The reader task accounts for output here, before anything is queued, so an execution holds at
    most `limit` bytes however fast output arrives and however slowly (or never) it is consumed.
    Past the limit, output is counted and dropped; the request is still followed to its idle status.
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
        self.finished = False
        self.error: tuple[str, str] | None = None
        self._carry = ""

    def deliver(self, message: dict[str, Any]) -> bool:
        """Account for and queue one message; True once the request has reached idle."""
        if self.raw:
            self.queue.put_nowait(message)
            return False
        msg_type = message["msg_type"]
        content = message["content"]
        if msg_type == "stream":
            self._text(str(content.get("text", "")), stream=True)
        elif msg_type in ("execute_result", "display_data"):
            data = content.get("data") or {}
            if "image/png" in data:
                self._image(str(data["image/png"]))
            elif "text/plain" in data:
                text = str(data["text/plain"])
                self._text(text if text.endswith("\n") else text + "\n", stream=False)
        elif msg_type == "error":
            trace = _strip_escapes("\n".join(str(line) for line in content.get("traceback", [])))
            self.error = (_strip_escapes(f"{content.get('ename', 'Error')}: {content.get('evalue', '')}"), trace)
        elif msg_type == "status" and content.get("execution_state") == "idle":
            # The end of an execution is the kernel's idle status for its request, not the
            # execute_reply: output may still follow the reply.
            self.finish()
            return True
        return False

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            self._flush_carry()
            self.queue.put_nowait(_IDLE)

    def drop(self, size: int) -> None:
        self.dropped += size
        if not self.truncated:
            self.truncated = True
            self.queue.put_nowait(
                ("marker", f"\n[output truncated: output past max_output_bytes={self.cap_name} is dropped]\n")
            )

    def marker(self) -> str:
        at_least = "at least " if self.lost else ""
        return f"[output truncated: {at_least}{self.dropped:,} bytes dropped past max_output_bytes={self.cap_name}]"

    def _room(self) -> int | None:
        return None if self.limit is None else self.limit - self.used

    def _text(self, text: str, stream: bool) -> None:
        if self._carry:
            if stream:
                text = self._carry + text
                self._carry = ""
            else:
                self._flush_carry()
        if stream:
            text, self._carry = _split_unfinished_escape(text)
        self._keep_text(_strip_escapes(text))

    def _flush_carry(self) -> None:
        carry, self._carry = self._carry, ""
        if carry:
            self._keep_text(_strip_escapes(carry))

    def _keep_text(self, text: str) -> None:
        if not text:
            return
        size = _utf8_size(text)
        room = self._room()
        if room is None or size + _ITEM_OVERHEAD <= room:
            self.used += size + _ITEM_OVERHEAD
            self.queue.put_nowait(("text", text))
            return
        head = _utf8_head(text, room - _ITEM_OVERHEAD) if room > _ITEM_OVERHEAD else ""
        if head:
            kept = _utf8_size(head)
            self.used += kept + _ITEM_OVERHEAD
            self.queue.put_nowait(("text", head))
            size -= kept
        self.drop(size)

    def _image(self, encoded: str) -> None:
        size = len(encoded) * 3 // 4 - encoded[-2:].count("=")
        room = self._room()
        if room is None or size + _ITEM_OVERHEAD <= room:
            data = base64.b64decode(encoded)
            self.used += len(data) + _ITEM_OVERHEAD
            self.queue.put_nowait(("image", data))
        else:
            self.drop(size)


class Execution:
    """A submitted execution. Read its output with `stream()` or wait for `result()`."""

    def __init__(self, client: ExecutionClient, route: _Route) -> None:
        self._client = client
        self._route = route
        self._msg_id = route.msg_id
        self._queue = route.queue
        self._chunks: list[str] = []
        self._images: list[Image.Image] = []
        self._error: Exception | None = None
        self._done = False

    @property
    def msg_id(self) -> str:
        """The id of the `execute_request` (the `parent_header.msg_id` of its output)."""
        return self._msg_id

    async def result(self, timeout: float = 120) -> ExecutionResult:
        """Wait for the execution to finish and return its output.

        Args:
            timeout: Seconds to wait, counted from this call. On expiry the kernel is interrupted
                (it keeps its state); if the code does not stop within a grace period, the kernel is
                restarted (its state is lost). Then `TimeoutError` is raised.

        Raises:
            ExecutionError: The code raised an exception.
            TimeoutError: The execution did not finish within `timeout`.
            KernelDiedError: The kernel died while executing.
            ServerConnectionError: The connection to the container was lost.
        """
        async for _ in self.stream(timeout=timeout):
            pass
        route = self._route
        text = _join_stripped(self._chunks, route.marker() if route.truncated else "")
        return ExecutionResult(
            text=text or None, images=list(self._images), truncated=route.truncated, dropped_bytes=route.dropped
        )

    async def stream(self, timeout: float = 120) -> AsyncIterator[str]:
        """Yield text output as it arrives: stdout/stderr chunks and result/display text.

        Images are collected for `result()`. When output starts to be dropped (past
        `max_output_bytes`), a marker line saying so is yielded once. Raises as `result()` does,
        after yielding the output that arrived before the failure.
        """
        deadline = time.monotonic() + timeout
        while not self._done:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                event = await asyncio.wait_for(self._queue.get(), remaining)
            except TimeoutError:
                await self._stop_after_timeout(timeout)
                raise
            text = self._handle(event)
            if text:
                yield text
        if self._error is not None:
            raise self._error

    def _handle(self, event: Any) -> str | None:
        if isinstance(event, _Terminal):
            self._finish(event.error)
            return None
        kind, value = event
        if kind == "text":
            self._chunks.append(value)
            return str(value)
        if kind == "image":
            self._images.append(Image.open(io.BytesIO(value)))
        elif kind == "marker":
            return str(value)
        elif kind == "idle":
            error = self._route.error
            self._finish(None if error is None else ExecutionError(error[0], error[1], self._client._kernel_id))
        return None

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
                "its state. Pass a larger timeout to execute(), result() or stream() for longer runs."
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
                error = ExecutionTimeoutError(f"{stuck}; restarting kernel {kernel_id} failed: {exc}")
                self._done = True
                self._error = error
                raise error from exc
            error = ExecutionTimeoutError(
                f"{stuck}; kernel {kernel_id} was restarted and its state (variables, imports) is lost. "
                "Pass a larger timeout to execute(), result() or stream() for longer runs."
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
        max_output_bytes: Text and image bytes one execution keeps (each output also counts 64
            bytes of bookkeeping); output past it is counted and dropped, and the result says so.
            A single websocket message larger than this (plus 1 MiB) is never read into memory.
            None: no limit. Override per call in `execute()` and `submit()`.

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
    ) -> None:
        self.port = port
        self.host = host
        self.heartbeat_interval = heartbeat_interval
        self.max_output_bytes = _check_limit(max_output_bytes)
        self._token = token
        self._base_url = f"http://{host}:{port}"
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
        self._session = aiohttp.ClientSession(self._base_url, headers=headers)
        try:
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
        self, code: str, timeout: float = 120, *, max_output_bytes: int | None | _Unset = _UNSET
    ) -> ExecutionResult:
        """Execute code and return its output.

        Args:
            code: Python code; top-level `await` works.
            timeout: Seconds to wait. On expiry the kernel is interrupted (it keeps its state); if
                the code ignores the interrupt for 5 s, the kernel is restarted (its state is lost).
                Then `TimeoutError` is raised; its message says which happened.
            max_output_bytes: This execution's output cap; default: the client's. None: no limit.

        Raises:
            ExecutionError: The code raised an exception (`.message`, `.trace`).
            TimeoutError: The execution did not finish within `timeout`.
            KernelDiedError: The kernel died while executing.
        """
        execution = await self.submit(code, max_output_bytes=max_output_bytes)
        return await execution.result(timeout=timeout)

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
        return Execution(self, route)

    async def interrupt(self) -> None:
        """Interrupt the kernel's current execution (like Ctrl-C); the kernel keeps its state."""
        await self._kernel_action("interrupt", "interrupting", aiohttp.ClientTimeout(total=30))

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
        # Until the kernel answers again, new submissions wait for the restart lock and nudge.
        self._kernel_restarted = True
        async with self._restart_lock:
            # Requests queued behind the runaway one die with the old kernel.
            self._fail_pending(
                KernelDiedError(
                    f"kernel {self._kernel_id} was restarted after an execution timed out and ignored the "
                    "interrupt; its state (variables, imports) is lost",
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
                if isinstance(oversize, Exception):
                    error = oversize
                    break
                if oversize is None:
                    break
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
            parent_id = (message.get("parent_header") or {}).get("msg_id")
            route = self._pending.get(parent_id) if parent_id else None
            if route is not None and route.deliver(message):
                self._pending.pop(route.msg_id, None)
        return None

    def _fail_pending(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for route in pending.values():
            route.queue.put_nowait(_Terminal(error))

    def _forget(self, msg_id: str) -> None:
        self._pending.pop(msg_id, None)


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
