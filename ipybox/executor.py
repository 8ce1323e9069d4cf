"""ExecutionClient: runs code in a stateful IPython kernel of an ipybox container.

The front end. Underneath (each readable and testable alone):
- `ipybox._transport`: route choice, HTTP session, kernel lifecycle requests, websocket framing;
- `ipybox._router`: what kernel messages mean for each execution (no I/O);
- `ipybox._channel`: the websocket's one reader task, re-opening after cuts, the recovery check;
- `ipybox._history`: the executions remembered for `export_notebook()`;
- `ipybox._approvals`: approval requests of tool calls and shell escapes, and their decisions.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiohttp
from PIL import Image

from ipybox import _where
from ipybox._approvals import ApprovalDesk
from ipybox._channel import KernelChannel
from ipybox._errors import (
    ExecutionError,
    ExecutionTimeoutError,
    ImageError,
    InvalidStateError,
    KernelDiedError,
    ServerConnectionError,
)
from ipybox._history import History, write_notebook
from ipybox._router import STARTED, KernelState, Phase, Route, Router, Terminal, aborted_error
from ipybox._transport import FRAME_SLACK, KernelTransport
from ipybox.approvals import ApprovalPolicy
from ipybox.outputs import IMAGE_TYPES, Display, ErrorInfo, Event, Output, OutputArea, TextLog, decode_image

logger = logging.getLogger(__name__)

DEFAULT_MAX_OUTPUT_BYTES = 64 * 2**20
"""Default cap on the output one execution keeps in client memory."""
DEFAULT_MAX_HISTORY = 100
"""Default number of executions a client remembers for `export_notebook()`."""
DEFAULT_APPROVAL_TIMEOUT = 300.0
"""Default seconds a tool call or shell escape waits for the application's decision."""

_INTERRUPT_GRACE = 5.0
_FROZEN_SLICE = 0.25
"""Seconds an execution's timeout clock waits at a time; a wait that ends with the sandbox paused is not counted."""
"""Seconds an interrupted execution gets to reach idle before the kernel is restarted."""


class _Unset(enum.Enum):
    UNSET = enum.auto()


_UNSET = _Unset.UNSET


class ClientState(enum.Enum):
    """Where an `ExecutionClient` is in its life: NEW → CONNECTING → CONNECTED → CLOSED (→ CONNECTING...)."""

    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"


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


class Execution:
    """A submitted execution. Read its output with `stream()` or `events()`, or wait for `result()`.

    Its timeout clock starts when the kernel starts it: an execution queued behind others (several
    `submit()` calls before their results) waits for them without using its own timeout, and its
    timeout never interrupts another execution. The clock also stops while a call of the code waits
    for the application's approval (`ExecutionClient(approvals=...)`).
    """

    def __init__(self, client: ExecutionClient, route: Route) -> None:
        self._client = client
        self._route = route
        self._queue = route.queue
        self._log = TextLog()  # all text in order, for `text`, `stdout` and `stderr`
        self._images: list[Image.Image] = []
        self._area = OutputArea()
        self._error: Exception | None = None
        self._started = False
        self._done = False
        self._reader: str | None = None  # "stream" or "events": the one that reads this execution

    @property
    def msg_id(self) -> str:
        """The id of the `execute_request` (the `parent_header.msg_id` of its output)."""
        return self._route.msg_id

    async def result(self, timeout: float = 120, *, raise_on_error: bool = True) -> ExecutionResult:
        """Wait for the execution to finish and return its output.

        Args:
            timeout: Seconds the code may run, counted from when the kernel starts it (or from this
                call, if it already started). Waiting for executions submitted earlier does not count,
                nor does time its calls wait for the application's approval.
                On expiry the kernel is interrupted (it keeps its state); if the code does not stop
                within 5 s, the kernel is restarted (its state is lost). Then `TimeoutError` is raised.
            raise_on_error: When the code raised: True raises `ExecutionError`; False returns the
                result with `error` set (name, value, traceback).

        Raises:
            ExecutionError: The code raised an exception (only with `raise_on_error=True`).
            ExecutionAbortedError: The kernel skipped the code: an earlier execution failed.
            ExecutionTimeoutError: The code ran past `timeout` (a `TimeoutError`).
            KernelDiedError: The kernel died or was restarted while the execution was pending.
            ExecutionOutcomeUnknownError: The connection broke and the outcome could not be recovered.
            ServerConnectionError: The connection was lost (or the client disconnected) first.
        """
        async for _ in self._pump(timeout):
            pass
        failed = isinstance(self._error, ExecutionError)
        if self._error is not None and (raise_on_error or not failed):
            raise self._error
        route = self._route
        text, stdout, stderr = self._log.strings(route.marker() if route.truncated else "", self._area)
        return ExecutionResult(
            text=text or None,
            images=list(self._images),
            truncated=route.truncated,
            dropped_bytes=route.dropped,
            stdout=stdout,
            stderr=stderr,
            outputs=self._area.outputs,
            execution_count=route.execution_count,
            duration=route.duration,
            error=route.error if failed else None,
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
        """Yield typed events in arrival order: `Stdout`, `Stderr`, `Display`, `Result`, `Error`, `Clear`,
        and with approvals on `ToolCallRequest`.

        A `ToolCallRequest` is a tool call or shell escape of the code waiting for a decision; decide
        it with `await request.approve()` or `await request.deny(reason)` (the code waits meanwhile;
        that time does not count against `timeout`). One an approval policy decided comes already
        decided. Read with `stream()` or `result()` instead, requests no policy decides are denied.

        The code's exception is the `Error` event, not raised here (`result()` raises it afterwards
        unless `raise_on_error=False`). Output dropped past `max_output_bytes` yields no event
        (`result().truncated` says so). Raises every other failure as `result()` does
        (`ExecutionAbortedError`, `TimeoutError`, `KernelDiedError`, ...). An execution is read with
        either `stream()` or `events()`, not both; `result()` may follow either.
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
        """Take queued items until the end; per item its text for `stream()` and its event.

        `asyncio.timeout` around `Queue.get`, not `wait_for`: a cancelled get never loses an item.
        """
        route = self._route
        transport = self._client._transport
        # The clock: when it started, and how long calls had waited for approval by then. Time calls
        # of the code wait for approval later is added to the deadline; while one waits, none applies.
        # Time the sandbox spends paused is added too: the clock waits in slices, and a slice that
        # begins or ends with the sandbox frozen is credited (accurate to a slice, never early; the
        # freezer is read only when a slice passes without output).
        clock = time.monotonic() if self._started else None
        held_before = route.held_time()
        frozen_time = 0.0
        was_frozen = False
        while not self._done:
            if clock is None or route.holds:
                item = await self._queue.get()
                if item is STARTED and clock is None:
                    self._started = True
                    clock, held_before = time.monotonic(), route.held_time()
                    continue
            else:
                deadline = clock + timeout + route.held_time() - held_before + frozen_time
                began = time.monotonic()
                remaining = deadline - began
                try:
                    async with asyncio.timeout(max(0.0, min(remaining, _FROZEN_SLICE))):
                        item = await self._queue.get()
                except TimeoutError:
                    frozen = transport is not None and transport.frozen()
                    if frozen or was_frozen:  # frozen at its end, or at its start (resumed within it)
                        was_frozen = frozen
                        frozen_time += time.monotonic() - began
                        continue
                    if remaining > _FROZEN_SLICE:
                        continue
                    await self._stop_after_timeout(timeout)
                    raise
                was_frozen = False  # output arrived: it runs
            yield self._handle(item)

    def _handle(self, item: Any) -> tuple[str | None, Event | None]:
        if isinstance(item, Terminal):
            self._finish(item.error)
            return None, None
        kind = item[0]
        if kind == "stream":
            _, name, text = item
            self._log.stream(name, text)
            return text, self._area.stream(name, text)
        if kind == "output":
            _, msg_type, output = item
            if msg_type == "update_display_data":
                self._area.update(output)
                self._client._history.update_displays(output, self._area)
                return None, Display(output, update=True)
            text = None
            if any(mime in output.data for mime in IMAGE_TYPES):
                # An output with an image contributes its image, not its text (`<Figure ...>`).
                image = decode_image(output)
                if image is not None:
                    self._images.append(image)
                else:
                    logger.debug("an image output of execution %s could not be decoded", self.msg_id)
            elif (plain := output.text) is not None:
                text = plain if plain.endswith("\n") else plain + "\n"
                self._log.output(text)
            return text, self._area.show(output)
        if kind == "clear":
            return None, self._area.clear(item[1])
        if kind == "error":
            return None, self._area.error(item[1])
        if kind == "marker":
            return str(item[1]), None
        if kind == "approval":
            request = item[1]
            desk = self._client._desk
            if self._reader != "events" and desk is not None:
                desk.unread(request)  # no reader decides it here: denied unless a policy does
            return None, request
        if kind == "idle":
            route = self._route
            if route.aborted:
                self._finish(aborted_error(route))
            elif route.error is not None:
                self._finish(
                    ExecutionError(
                        f"{route.error.name}: {route.error.value}", route.error.traceback, kernel_id=route.kernel_id
                    )
                )
            else:
                self._finish(None)
        return None, None

    def _finish(self, error: Exception | None) -> None:
        self._done = True
        self._error = error

    async def _stop_after_timeout(self, timeout: float) -> None:
        """Interrupt the kernel, which runs this execution; restart it when the code ignores the
        interrupt. Always raises."""
        client = self._client
        if self._route.phase is Phase.RUNNING:
            # Never to a paused gateway: the request would hang there until the sandbox is resumed.
            await client._transport_or_raise().wait_thawed()
            await client.interrupt()
        # Drain until the interrupted request reaches idle, so its trailing output does not leak
        # into the next execution's result.
        deadline = time.monotonic() + _INTERRUPT_GRACE
        while not self._done and (remaining := deadline - time.monotonic()) > 0:
            try:
                async with asyncio.timeout(remaining):
                    item = await self._queue.get()
            except TimeoutError:
                break
            self._handle(item)
        if self._done:
            error = ExecutionTimeoutError(
                f"Execution did not finish within timeout={timeout} s; the kernel was interrupted and keeps "
                "its state. Pass a larger timeout to execute(), result() or stream() for longer runs.",
                restarted=False,
                kernel_id=self._route.kernel_id,
                option="timeout",
            )
        else:
            self._finish(None)
            # The code ignores SIGINT (or is stuck in C code that never checks for it): only a
            # restart stops it.
            kernel_id = self._route.kernel_id
            stuck = (
                f"Execution did not finish within timeout={timeout} s and did not stop within "
                f"{_INTERRUPT_GRACE} s of an interrupt"
            )
            try:
                await client._channel_or_raise().restart(
                    "was restarted after an execution timed out and ignored the interrupt"
                )
            except (ServerConnectionError, KernelDiedError) as exc:
                error = ExecutionTimeoutError(
                    f"{stuck}; restarting kernel {kernel_id} failed: {exc}", restarted=True, kernel_id=kernel_id
                )
                self._finish(error)
                raise error from exc
            error = ExecutionTimeoutError(
                f"{stuck}; kernel {kernel_id} was restarted and its state (variables, imports) is lost. "
                "Pass a larger timeout to execute(), result() or stream() for longer runs.",
                restarted=True,
                kernel_id=kernel_id,
                option="timeout",
            )
        self._finish(error)
        raise error


class ExecutionClient:
    """A client for one IPython kernel in an ipybox container's Kernel Gateway.

    `connect()` creates a new kernel (or, with `kernel_id`, finds a running one) and opens its
    websocket; `disconnect()` shuts the kernel down (`shutdown=False` leaves it running). Kernel
    state (variables, imports) persists across executions of one client. One reader task per
    websocket routes output to executions by request id, so several submitted executions never
    mix their output.

    Args:
        port: Host port of the container's executor port (`ExecutionContainer.executor_port`).
        host: Host name or address of the container's executor port.
        heartbeat_interval: Seconds between websocket pings; a connection that stops answering (for
            half as long) is detected and re-opened, and pending executions fail instead of hanging.
            A paused sandbox (`ExecutionContainer.pause()`) is not a silent connection: pings wait.
        token: The container's secret. Found automatically for containers started by this user
            on this machine; pass it explicitly for a container started elsewhere.
        max_output_bytes: Output bytes one execution keeps: text, images and rich outputs (each
            output also counts 64 bytes of bookkeeping); output past it is counted and dropped, and
            the result says so. A single websocket message larger than this (plus 1 MiB) is never
            read into memory. None: no limit. Override per call in `execute()` and `submit()`.
        max_history: Executions remembered for `export_notebook()`, the newest ones (0: none).
            Older ones are also forgotten once the executions before the newest hold more than
            `max_output_bytes` of output.
        approvals: Whether the application approves each MCP tool call and shell escape (`!cmd`,
            `%%bash`) of the kernel before it runs. False (default): calls run at once. True: each
            is decided by the execution's policy (`execute(approve=...)`) or the reader of
            `Execution.events()` (`ToolCallRequest`), else denied. A policy (`AllowList([...])` or
            an async callable taking the `ToolCallRequest`, returning True, False or a reason):
            the client's default policy. A denied call raises `ToolDenied` in the code
            (`ShellEscapeDenied` for a shell escape). An application-level control, not a security
            boundary: code can still run programs without a shell escape (`subprocess`).
        approval_timeout: Seconds a call waits for a decision before the sandbox refuses it
            (`ToolApprovalExpired` in the code). That time does not count against execution timeouts.
        kernel_id: Connect to this kernel, already running in the gateway (`ExecutionContainer.kernel_ids()`),
            instead of creating one: its variables and imports are there. None: a new kernel.

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
        approvals: bool | ApprovalPolicy = False,
        approval_timeout: float = DEFAULT_APPROVAL_TIMEOUT,
        kernel_id: str | None = None,
    ) -> None:
        if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 0:
            raise ValueError(f"max_history must be an int >= 0, not {max_history!r}")
        if not isinstance(approvals, bool) and not callable(approvals):
            raise TypeError(f"approvals must be True, False or a policy (AllowList or callable), not {approvals!r}")
        if (
            isinstance(approval_timeout, bool)
            or not isinstance(approval_timeout, int | float)
            or not math.isfinite(approval_timeout)
            or not 0 < approval_timeout <= 86400
        ):
            raise ValueError(f"approval_timeout must be seconds in (0, 86400], not {approval_timeout!r}")
        self.port = port
        self.host = host
        self.heartbeat_interval = heartbeat_interval
        self._attach_to = kernel_id
        self.max_output_bytes = _check_limit(max_output_bytes)
        self.max_history = max_history
        self._token = token
        self._state = ClientState.NEW
        self._transport: KernelTransport | None = None
        self._router = Router()
        self._channel: KernelChannel | None = None
        self._closing: asyncio.Task[None] | None = None
        self._history = History(max_history, self.max_output_bytes)
        self.approvals = approvals is not False
        self.approval_timeout = float(approval_timeout)
        self._policy: ApprovalPolicy | None = None if isinstance(approvals, bool) else approvals
        self._desk: ApprovalDesk | None = None

    @property
    def state(self) -> ClientState:
        """Where the client is in its life (`ClientState`)."""
        return self._state

    @property
    def healthy(self) -> bool:
        """Connected, the websocket open (not being re-opened after a cut), its reader running, the
        kernel not dead: what a pool checks before it hands a client out."""
        channel = self._channel
        return self._state is ClientState.CONNECTED and channel is not None and channel.alive and channel.transport.open

    @property
    def kernel_id(self) -> str:
        """The id of this client's kernel.

        Raises:
            InvalidStateError: The client is not connected (a `RuntimeError`).
        """
        kernel_id = self._transport.kernel_id if self._transport is not None else None
        if kernel_id is None:
            raise InvalidStateError("ExecutionClient is not connected: call connect() first")
        return kernel_id

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
        """Create a kernel (or find the one `kernel_id` names) and connect to it. Cancelled or failed,
        it leaves no kernel behind (and a kernel it was to attach to running).

        Args:
            retries: How many times to try reaching the gateway.
            retry_interval: Seconds between tries.

        Raises:
            InvalidStateError: The client is connected or connecting already.
            AuthenticationError: The gateway rejected the secret (no retry).
            KernelLimitError: The container runs its maximum number of kernels.
            RequestRefusedError: The gateway runs no kernel `kernel_id` (HTTP 404).
            ServerConnectionError: The gateway could not be reached after all tries.
        """
        if self._state in (ClientState.CONNECTING, ClientState.CONNECTED):
            raise InvalidStateError(f"ExecutionClient is already {self._state.value}")
        if self._closing is not None:
            await asyncio.shield(self._closing)
        self._state = ClientState.CONNECTING
        limit = self.max_output_bytes
        transport = KernelTransport(
            self.host,
            self.port,
            self._token,
            self.heartbeat_interval,
            # A message no execution could keep is refused by its header, before it is buffered.
            0 if limit is None else limit + FRAME_SLACK,
            self._attach_to,
        )
        try:
            await transport.connect(retries, retry_interval)
        except BaseException:
            self._state = ClientState.CLOSED
            raise
        self._transport = transport
        self._router = Router(transport.kernel_id)
        channel = self._channel = KernelChannel(transport, self._router)
        if self.approvals and not transport.v1:
            await self.disconnect()
            raise ImageError(
                f"the gateway at {transport.base_url} speaks only the legacy websocket protocol; approvals "
                "need v1.kernel.websocket.jupyter.org (an ipybox image). Rebuild it with `ipybox build`, or "
                "connect without ExecutionClient(approvals=...)",
                option="ipybox build",
            )
        if self.approvals:
            self._desk = ApprovalDesk(self._policy, self.approval_timeout, channel.send_side, self._router)
            channel.on_side = self._desk.receive
        channel.start()
        self._state = ClientState.CONNECTED
        if self._desk is not None:
            try:
                # Before any code runs: what the first execution calls is approved already.
                await self._desk.enable()
            except BaseException:
                await self.disconnect()
                raise

    async def disconnect(self, shutdown: bool = True) -> None:
        """Shut the kernel down and close the connection. Safe to call repeatedly; pending executions
        fail with `ServerConnectionError`. Runs to its end even when the caller is cancelled.

        Args:
            shutdown: False leaves the kernel running in the gateway with its state, for a later
                `ExecutionClient(port, kernel_id=...)` (this process or another, see
                `ExecutionContainer.attach`). It runs until shut down, or the container is removed.
        """
        if self._closing is None:
            if self._transport is None:
                if self._state is not ClientState.CONNECTING:
                    self._state = ClientState.CLOSED
                return
            self._closing = asyncio.create_task(self._close(shutdown))
        closing = self._closing
        await asyncio.shield(closing)

    async def _close(self, shutdown: bool = True) -> None:
        transport, self._transport = self._transport, None
        channel, self._channel = self._channel, None
        desk, self._desk = self._desk, None
        self._state = ClientState.CLOSED
        try:
            if desk is not None:
                desk.close(ServerConnectionError("the client disconnected"))
            if channel is not None:
                await channel.close(ServerConnectionError("the client disconnected"))
            if transport is not None:
                await transport.close(shutdown)
        finally:
            self._closing = None

    async def execute(
        self,
        code: str,
        timeout: float = 120,
        *,
        max_output_bytes: int | None | _Unset = _UNSET,
        raise_on_error: bool = True,
        approve: ApprovalPolicy | None = None,
    ) -> ExecutionResult:
        """Execute code and return its output.

        Args:
            code: Python code; top-level `await` works.
            timeout: Seconds the code may run, from when the kernel starts it (time its calls wait for
                the application's approval not counted). On expiry the kernel is interrupted (it keeps
                its state); if the code ignores the interrupt for 5 s, the kernel is restarted (its
                state is lost). Then `TimeoutError` is raised; its message says which happened.
            max_output_bytes: This execution's output cap; default: the client's. None: no limit.
            raise_on_error: When the code raised: True raises `ExecutionError`; False returns the
                result with `error` set (name, value, traceback).
            approve: The approval policy for this execution's tool calls and shell escapes
                (`AllowList([...])` or a callable); default: the client's. Needs
                `ExecutionClient(approvals=...)`. Calls no policy approves are denied.

        Raises:
            ExecutionError: The code raised an exception (`.message`, `.trace`), with
                `raise_on_error=True`.
            ExecutionAbortedError: The kernel skipped the code: an execution submitted before failed.
            ExecutionTimeoutError: The code ran past `timeout` (a `TimeoutError`).
            KernelDiedError: The kernel died while executing.
            ExecutionOutcomeUnknownError: The connection broke and the outcome could not be recovered.
            ServerConnectionError: The connection was lost before the execution was sent or answered.
            InvalidStateError: The client is not connected.
        """
        execution = await self.submit(code, max_output_bytes=max_output_bytes, approve=approve)
        return await execution.result(timeout=timeout, raise_on_error=raise_on_error)

    async def submit(
        self,
        code: str,
        *,
        max_output_bytes: int | None | _Unset = _UNSET,
        approve: ApprovalPolicy | None = None,
    ) -> Execution:
        """Send code for execution and return at once; read output from the returned Execution.

        Executions submitted before this one's result run first (the kernel runs one at a time);
        if one of them raises, the kernel skips the ones queued behind it (`ExecutionAbortedError`).
        Cancelled, it either sent the code or forgot it: nothing is left pending.

        Args:
            code: Python code; top-level `await` works.
            max_output_bytes: This execution's output cap; default: the client's. None: no limit.
            approve: The approval policy for this execution's tool calls and shell escapes; default:
                the client's. Needs `ExecutionClient(approvals=...)`. Without any policy, calls are
                decided by the reader of `events()` (`ToolCallRequest`), else denied.

        Raises:
            InvalidStateError: The client is not connected.
            ServerConnectionError: The connection was lost, or sending failed.
            KernelDiedError: The kernel died and could not be restarted, or did not come back.
            ValueError: `approve` was given to a client without approvals.
        """
        limit = self.max_output_bytes if isinstance(max_output_bytes, _Unset) else _check_limit(max_output_bytes)
        if approve is not None and not self.approvals:
            raise ValueError(
                "approve=... needs a client with approvals on: ExecutionClient(approvals=True) or approvals=<policy>"
            )
        channel = self._channel_or_raise()
        if not channel.alive and self._router.kernel is not KernelState.DEAD:
            # Connected, but the connection was lost (the server went away): an environment failure.
            raise ServerConnectionError(
                f"the connection to kernel {self.kernel_id}{_where.suffix(self.host, self.port)} was lost; connect a "
                "new client to go on",
                kernel_id=self.kernel_id,
            )
        if self._router.kernel is KernelState.DEAD:
            raise KernelDiedError(f"kernel {self.kernel_id} died and could not be restarted", kernel_id=self.kernel_id)
        await channel.ready_for_request()
        route = self._router.register(limit, limit if limit is not None else self.max_output_bytes)
        route.policy = approve
        await channel.send(
            route,
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
        self._history.remember(code, route, execution._area)
        return execution

    async def interrupt(self) -> None:
        """Interrupt the kernel's current execution (like Ctrl-C); the kernel keeps its state.

        The interrupted execution ends with a `KeyboardInterrupt` error (`ExecutionError`, or its
        result's `error` with `raise_on_error=False`); the kernel then skips the executions queued
        behind it (`ExecutionAbortedError`), as after any error.

        Raises:
            InvalidStateError: The client is not connected.
            ServerConnectionError: The request failed.
        """
        await self._transport_or_raise().kernel_action("interrupt", "interrupting", aiohttp.ClientTimeout(total=30))

    async def reset(self) -> None:
        """Restart the kernel: a fresh interpreter in the same container; returns once it answers.

        Variables and imports are gone; files in the container stay. Executions still pending fail
        with `KernelDiedError`. The history for `export_notebook()` is kept (execution counts start
        again at 1).

        Raises:
            InvalidStateError: The client is not connected.
            ServerConnectionError: The restart request failed.
            KernelDiedError: The kernel did not come back.
        """
        await self._channel_or_raise().restart("was reset (ExecutionClient.reset())")

    async def export_notebook(self, path: str | os.PathLike[str]) -> None:
        """Write the executions this client ran as a Jupyter notebook (`.ipynb`, nbformat 4).

        One code cell per execution, in submission order, with its execution count and its outputs
        as Jupyter shows them (streams, rich outputs with updates and clears applied, the error).
        An execution the kernel skipped has no count and an `ExecutionAbortedError` error output.
        An execution still running, or whose output was not read yet, has the outputs read so far.
        Only the newest `max_history` executions are remembered (see `ExecutionClient`); a leading
        markdown cell says how many were forgotten. Works after `disconnect()` as well.
        """
        notebook = self._history.notebook()
        await asyncio.to_thread(write_notebook, notebook, os.fspath(path))

    # -- internals --------------------------------------------------------------------------------

    @property
    def _via(self) -> str:
        """The route the client reached the gateway by (tests and logs)."""
        return self._transport.via if self._transport is not None else "not connected"

    def _channel_or_raise(self) -> KernelChannel:
        if self._channel is None or self._state is not ClientState.CONNECTED:
            raise InvalidStateError("ExecutionClient is not connected: call connect() first")
        return self._channel

    def _transport_or_raise(self) -> KernelTransport:
        if self._transport is None or self._state is not ClientState.CONNECTED:
            raise InvalidStateError("ExecutionClient is not connected: call connect() first")
        return self._transport


def _check_limit(limit: int | None) -> int | None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"max_output_bytes must be a positive int or None, not {limit!r}")
    return limit
