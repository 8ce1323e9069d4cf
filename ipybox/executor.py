"""ExecutionClient: runs code in a stateful IPython kernel of an ipybox container."""

from __future__ import annotations

import asyncio
import base64
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

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_INTERRUPT_GRACE = 5.0
"""Seconds an interrupted execution gets to reach idle before the timeout error is raised anyway."""
_RESTART_TIMEOUT = 30.0
"""Seconds a restarted kernel gets to answer again before the next execution fails."""
_NUDGE_INTERVAL = 0.2
"""Seconds between kernel_info nudges while waiting for a restarted kernel."""


@dataclass
class ExecutionResult:
    """The outcome of a successful execution.

    Attributes:
        text: All stdout/stderr text, `execute_result` and `display_data` text, joined in order
            and stripped; None when the code produced no text.
        images: PIL images from `image/png` outputs, in order.
    """

    text: str | None
    images: list[Image.Image] = field(default_factory=list)


class _Terminal:
    """Put into an execution's queue when it can receive no more messages (disconnect, death)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class Execution:
    """A submitted execution. Read its output with `stream()` or wait for `result()`."""

    def __init__(self, client: ExecutionClient, msg_id: str, queue: asyncio.Queue[Any]) -> None:
        self._client = client
        self._msg_id = msg_id
        self._queue = queue
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
                (it keeps its state) and `TimeoutError` is raised.

        Raises:
            ExecutionError: The code raised an exception.
            TimeoutError: The execution did not finish within `timeout`.
            KernelDiedError: The kernel died while executing.
            ServerConnectionError: The connection to the container was lost.
        """
        async for _ in self.stream(timeout=timeout):
            pass
        text = "".join(self._chunks).strip()
        return ExecutionResult(text=text or None, images=list(self._images))

    async def stream(self, timeout: float = 120) -> AsyncIterator[str]:
        """Yield text output as it arrives: stdout/stderr chunks and result/display text.

        Images are collected for `result()`. Raises as `result()` does, after yielding the output
        that arrived before the failure.
        """
        deadline = time.monotonic() + timeout
        while not self._done:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(self._queue.get(), remaining)
            except TimeoutError:
                await self._interrupt_after_timeout(timeout)
                raise
            text = self._handle(message)
            if text:
                self._chunks.append(text)
                yield text
        if self._error is not None:
            raise self._error

    def _handle(self, message: Any) -> str | None:
        if isinstance(message, _Terminal):
            self._finish(message.error)
            return None
        msg_type = message["msg_type"]
        content = message["content"]
        if msg_type == "stream":
            return str(content.get("text", ""))
        if msg_type in ("execute_result", "display_data"):
            data = content.get("data", {})
            if "image/png" in data:
                self._images.append(Image.open(io.BytesIO(base64.b64decode(data["image/png"]))))
                return None
            if "text/plain" in data:
                text = str(data["text/plain"])
                return text if text.endswith("\n") else text + "\n"
            return None
        if msg_type == "error":
            trace = _ANSI.sub("", "\n".join(content.get("traceback", [])))
            self._error = ExecutionError(
                f"{content.get('ename', 'Error')}: {content.get('evalue', '')}", trace, self._client.kernel_id
            )
        elif msg_type == "status" and content.get("execution_state") == "idle":
            # The end of an execution is the kernel's idle status for its request, not the
            # execute_reply: output may still follow the reply.
            self._finish(self._error)
        return None

    def _finish(self, error: Exception | None) -> None:
        self._done = True
        self._error = error
        self._client._forget(self._msg_id)

    async def _interrupt_after_timeout(self, timeout: float) -> None:
        error = ExecutionTimeoutError(
            f"Execution did not finish within timeout={timeout} s; the kernel was interrupted and keeps "
            "its state. Pass a larger timeout to execute(), result() or stream() for longer runs."
        )
        await self._client.interrupt()
        # Drain until the interrupted request reaches idle, so its trailing output does not leak
        # into the next execution's result.
        deadline = time.monotonic() + _INTERRUPT_GRACE
        while not self._done and (remaining := deadline - time.monotonic()) > 0:
            try:
                self._handle(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        self._done = True
        self._error = error
        self._client._forget(self._msg_id)
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
    ) -> None:
        self.port = port
        self.host = host
        self.heartbeat_interval = heartbeat_interval
        self._token = token
        self._base_url = f"http://{host}:{port}"
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._kernel_id: str | None = None
        self._session_id = uuid.uuid4().hex
        self._pending: dict[str, asyncio.Queue[Any]] = {}
        self._v1 = False
        self._kernel_restarted = False
        self._kernel_dead = False
        self._restart_lock = asyncio.Lock()

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
            self._ws = await self._session.ws_connect(
                f"/api/kernels/{self._kernel_id}/channels",
                params={"session_id": self._session_id},
                heartbeat=self.heartbeat_interval,
                # Output is never truncated here: a 10 MB print arrives as one 10 MB message.
                max_msg_size=0,
                protocols=(_wire.V1_PROTOCOL,),
            )
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
        self._fail_pending(ServerConnectionError("the client disconnected"))
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

    async def execute(self, code: str, timeout: float = 120) -> ExecutionResult:
        """Execute code and return its output.

        Args:
            code: Python code; top-level `await` works.
            timeout: Seconds to wait. On expiry the kernel is interrupted (it keeps its state) and
                `TimeoutError` is raised.

        Raises:
            ExecutionError: The code raised an exception (`.message`, `.trace`).
            TimeoutError: The execution did not finish within `timeout`.
            KernelDiedError: The kernel died while executing.
        """
        execution = await self.submit(code)
        return await execution.result(timeout=timeout)

    async def submit(self, code: str) -> Execution:
        """Send code for execution and return at once; read output from the returned Execution.

        Raises:
            KernelDiedError: The kernel died and could not be restarted, or did not come back.
        """
        if self._ws is None or self._ws.closed:
            raise InvalidStateError("ExecutionClient is not connected: call connect() first")
        if self._kernel_dead:
            raise KernelDiedError(f"kernel {self._kernel_id} died and could not be restarted", self._kernel_id)
        if self._kernel_restarted:
            async with self._restart_lock:
                if self._kernel_restarted:
                    await self._await_restarted_kernel()
                    self._kernel_restarted = False
        msg_id, queue = self._register()
        await self._send(
            msg_id,
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
        return Execution(self, msg_id, queue)

    async def interrupt(self) -> None:
        """Interrupt the kernel's current execution (like Ctrl-C); the kernel keeps its state."""
        if self._session is None or self._kernel_id is None:
            raise InvalidStateError("ExecutionClient is not connected: call connect() first")
        try:
            async with self._session.post(f"/api/kernels/{self._kernel_id}/interrupt") as response:
                if response.status >= 400:
                    raise _status_error(response.status, "interrupting the kernel", self._base_url)
        except aiohttp.ClientError as exc:
            raise ServerConnectionError(f"interrupting kernel {self._kernel_id} failed: {exc}") from exc

    # -- internals --------------------------------------------------------------------------------

    async def _create_kernel(self, retries: int, retry_interval: float) -> str:
        assert self._session is not None
        last_error: Exception | None = None
        for attempt in range(max(retries, 1)):
            if attempt:
                await asyncio.sleep(retry_interval)
            try:
                async with self._session.post("/api/kernels", json={"name": "python3"}) as response:
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

    def _register(self) -> tuple[str, asyncio.Queue[Any]]:
        msg_id = uuid.uuid4().hex
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._pending[msg_id] = queue
        return msg_id, queue

    async def _send(self, msg_id: str, msg_type: str, content: dict[str, Any]) -> None:
        """Send a shell request whose output the reader routes to `self._pending[msg_id]`."""
        assert self._ws is not None
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
                await self._ws.send_bytes(_wire.encode_v1("shell", request))
            else:
                await self._ws.send_str(_wire.encode_json("shell", request))
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
        deadline = time.monotonic() + _RESTART_TIMEOUT
        while time.monotonic() < deadline:
            msg_id, queue = self._register()
            try:
                await self._send(msg_id, "kernel_info_request", {})
                wait_until = time.monotonic() + _NUDGE_INTERVAL
                while (remaining := wait_until - time.monotonic()) > 0:
                    try:
                        message = await asyncio.wait_for(queue.get(), remaining)
                    except TimeoutError:
                        break
                    if isinstance(message, _Terminal):
                        raise message.error
                    if message.get("channel") == "iopub":
                        return
            finally:
                self._pending.pop(msg_id, None)
        raise KernelDiedError(
            f"kernel {self._kernel_id} did not come back within {_RESTART_TIMEOUT} s after a restart",
            self._kernel_id,
        )

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """The one reader of the websocket: routes each message to its execution's queue."""
        error: Exception = ServerConnectionError(f"the connection to kernel {self._kernel_id} was closed")
        try:
            async for frame in ws:
                if frame.type is aiohttp.WSMsgType.BINARY:
                    message = _wire.decode_v1(frame.data)
                elif frame.type is aiohttp.WSMsgType.TEXT:
                    message = _wire.decode_json(frame.data)
                else:
                    if frame.type is aiohttp.WSMsgType.ERROR:
                        error = ServerConnectionError(
                            f"the connection to kernel {self._kernel_id} failed: {frame.data}"
                        )
                    continue
                state = message["content"].get("execution_state") if message.get("msg_type") == "status" else None
                if state in ("restarting", "dead"):
                    # The gateway reports a kernel death with a status message that has no parent:
                    # every pending execution is lost.
                    self._kernel_restarted = state == "restarting"
                    self._kernel_dead = state == "dead"
                    what = "was restarted" if state == "restarting" else "could not be restarted"
                    self._fail_pending(
                        KernelDiedError(
                            f"kernel {self._kernel_id} died during execution and {what}; its state "
                            "(variables, imports) is lost",
                            self._kernel_id,
                        )
                    )
                    continue
                parent_id = (message.get("parent_header") or {}).get("msg_id")
                queue = self._pending.get(parent_id) if parent_id else None
                if queue is not None:
                    queue.put_nowait(message)
        except Exception as exc:  # a dying reader must never leave callers waiting
            error = ServerConnectionError(f"reading from kernel {self._kernel_id} failed: {exc!r}")
            raise
        finally:
            self._fail_pending(error)

    def _fail_pending(self, error: Exception) -> None:
        pending, self._pending = self._pending, {}
        for queue in pending.values():
            queue.put_nowait(_Terminal(error))

    def _forget(self, msg_id: str) -> None:
        self._pending.pop(msg_id, None)


def _status_error(status: int, action: str, url: str) -> ServerConnectionError:
    if status in (401, 403):
        return AuthenticationError(
            f"{action} at {url} was refused (HTTP {status}): missing or wrong secret. Clients find the "
            "secret of containers started by this user automatically; for other containers pass token=..."
        )
    return ServerConnectionError(f"{action} at {url} failed: HTTP {status}")
