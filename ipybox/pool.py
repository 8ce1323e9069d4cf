"""SandboxPool: sandboxes started ahead of time, handed out in milliseconds, each used once."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ipybox._errors import InvalidStateError, IpyboxError
from ipybox.container import ExecutionContainer
from ipybox.executor import ExecutionClient

if TYPE_CHECKING:
    from ipybox.snapshot import Snapshot

logger = logging.getLogger(__name__)

_RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
_PRUNE_INTERVAL = 1.0  # s between checks of the spares (a dead one is replaced at once, not at hand-out)
"""Seconds the pool waits before starting again after consecutive failed starts."""


class Sandbox:
    """One sandbox: a running `ExecutionContainer` and an `ExecutionClient` connected to its kernel.

    Handed out by `SandboxPool`, and made by `ipybox.snapshot.restore`/`fork` (then with one client per
    kernel of the snapshot: `clients`); the kernel has answered once already, so the first `execute`
    runs at once. Closing it (or leaving `async with`) disconnects the client and removes the container:
    a sandbox is never given to anyone else.

    Attributes:
        container: The running container (ports, `init_firewall`, `container_id`).
        client: The connected execution client (`execute`, `submit`).
    """

    def __init__(
        self, container: ExecutionContainer, client: ExecutionClient, client_options: dict[str, Any] | None = None
    ) -> None:
        self.container = container
        self.client = client
        self._client_options = dict(client_options or {})  # for further clients (a restore's kernels)
        self._extra_clients: list[ExecutionClient] = []  # a restore's kernels past the first
        self._closed = False
        self._on_close: list[Any] = []

    @property
    def clients(self) -> list[ExecutionClient]:
        """Every connected client: `client` first, then (in a sandbox restored from a snapshot of several
        kernels) one per further kernel, in the snapshot's order."""
        return [self.client, *self._extra_clients]

    @property
    def closed(self) -> bool:
        """True once `close()` was called."""
        return self._closed

    def healthy(self) -> bool:
        """False when the client's connection to the kernel is gone, or the container is known to be gone."""
        # The container check first: a client whose container died may still be re-opening its websocket
        # (it then counts as healthy), and a local engine's container is checked with one procfs read.
        return not self._closed and not self.container._known_gone() and _connected(self.client)

    async def pause(self) -> None:
        """Freeze the sandbox (`ExecutionContainer.pause()`); its clients wait, timeouts stopped."""
        await self.container.pause()

    async def resume(self) -> None:
        """Thaw the sandbox (`ExecutionContainer.resume()`)."""
        await self.container.resume()

    async def snapshot(self, path: str | Path | None = None, *, timeout: float = 60) -> Snapshot:
        """Snapshot this sandbox's `/app` and its clients' namespaces: `ipybox.snapshot.snapshot(self, ...)`,
        which returns a `Snapshot`."""
        from ipybox.snapshot import snapshot

        return await snapshot(self, path, timeout=timeout)

    async def close(self) -> None:
        """Disconnect the client and remove the container. Safe to call repeatedly."""
        if self._closed:
            return
        self._closed = True
        for callback in self._on_close:
            callback(self)
        try:
            # The kernels go with the container: no shutdown request (to a sandbox on a node that is down,
            # it waited its full timeout for every sandbox closed).
            results = await asyncio.gather(
                *(client.disconnect(shutdown=False) for client in self.clients), return_exceptions=True
            )
        finally:
            await self.container.kill()
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class _Waiter:
    """An `acquire()` waiting for a sandbox; `failure` is a failed start meant for it alone."""

    __slots__ = ("failure",)

    def __init__(self) -> None:
        self.failure: Exception | None = None


class SandboxPool:
    """Keeps `size` sandboxes started and ready, and hands each one out exactly once.

    A sandbox in the pool is a running container whose kernel has already answered a (silent, empty)
    request, with a connected `ExecutionClient`: acquiring one costs a queue hand-off, not a container
    start. The pool starts a replacement in the background for every sandbox it hands out. Handed-out
    sandboxes are never returned or reused: the caller closes them (which removes the container), and
    the pool removes any that are still open when it shuts down.

    Args:
        size: How many ready sandboxes to keep (at least 1).
        firewall: None (default) for no firewall; otherwise a list of allowed domains, IP addresses
            or CIDR ranges that `ExecutionContainer.init_firewall` applies before a sandbox is
            handed out (an empty list allows only the essential services).
        max_starting: How many containers the pool starts at the same time.
        client_options: Options for each sandbox's `ExecutionClient` (`approvals`, `approval_timeout`,
            `max_output_bytes`, `max_history`, `heartbeat_interval`), applied when the spare connects:
            a pool with `{"approvals": AllowList([...])}` hands out sandboxes whose tool calls and shell
            escapes already wait for that policy. Not `port`, `host`, `token` or `kernel_id`.
        **container_options: Options for every `ExecutionContainer` (tag, binds, env, limits,
            labels, network, ...), as `ExecutionContainer` accepts them. Fixed `executor_port` and
            `resource_port` are refused: the pool's containers would collide on them; so is
            `workspace` (one sandbox per workspace). `idle_timeout` counts from the hand-out: spares
            wait without it and `acquire()` arms it.

    Raises:
        ValueError: `size` or `max_starting` is below 1, a fixed port was given, or an option is
            invalid (checked at once, before any container starts).
        TypeError: An option is not one of `ExecutionContainer`'s.

    Example:
        ```python
        async with SandboxPool(size=4, memory_limit="1g") as pool:
            async with pool.sandbox() as sandbox:
                result = await sandbox.client.execute("print(1 + 1)")
        ```
    """

    def __init__(
        self,
        size: int = 1,
        *,
        firewall: list[str] | None = None,
        max_starting: int = 2,
        client_options: dict[str, Any] | None = None,
        **container_options: Any,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        if max_starting < 1:
            raise ValueError(f"max_starting must be at least 1, got {max_starting}")
        for name in ("executor_port", "resource_port"):
            if container_options.get(name) is not None:
                raise ValueError(
                    f"{name}={container_options[name]} cannot be used with a pool: its containers would all "
                    f"need the same host port; leave {name} unset (a free port is chosen for each)"
                )
        if container_options.get("workspace") is not None:
            raise ValueError(
                f"workspace={container_options['workspace']!r} cannot be used with a pool: a workspace is mounted "
                "by one running sandbox at a time; use ExecutionContainer(workspace=...)"
            )
        # Fail on bad options now, not in a background start (the constructors do no I/O).
        ExecutionContainer(**container_options)
        client_options = dict(client_options or {})
        fixed = sorted(set(client_options) & {"port", "host", "token", "kernel_id"})
        if fixed:
            raise ValueError(
                f"client_options cannot set {', '.join(fixed)}: each sandbox's client gets its own container's "
                "port, host and secret, and a new kernel"
            )
        ExecutionClient(1, **client_options)
        if firewall is not None:
            from ipybox._firewall import parse_entries

            parse_entries(firewall)
        self.size = size
        self.firewall = None if firewall is None else list(firewall)
        self.max_starting = max_starting
        self.client_options = client_options
        self.container_options = dict(container_options)
        # Spares start without it (their timer would run while they wait) and get it at hand-out.
        self._idle_timeout: float | None = self.container_options.pop("idle_timeout", None)
        self._state = _State.NEW
        self._ready: asyncio.Queue[Sandbox] = asyncio.Queue()
        self._starting: set[asyncio.Task[None]] = set()
        self._handed_out: set[Sandbox] = set()
        # Oldest first. A failed start is given to the oldest waiter without one, and goes away with that
        # waiter: it is never raised by a later, unrelated acquire().
        self._waiters: list[_Waiter] = []
        self._changed = asyncio.Condition()
        self._consecutive_failures = 0
        self._refill: asyncio.Task[None] | None = None
        self._closing: asyncio.Future[None] | None = None
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(max_starting)
        self._holds = 0  # restores in progress: no refill meanwhile (they need the CPU), waiters excepted
        self._discarding: set[asyncio.Future[None]] = set()  # dead spares being removed

    @property
    def ready(self) -> int:
        """How many sandboxes are ready to be handed out now."""
        return self._ready.qsize()

    async def start(self) -> None:
        """Begin starting sandboxes in the background; returns at once.

        Raises:
            InvalidStateError: The pool was started before or is closed.
        """
        if self._state is not _State.NEW:
            raise InvalidStateError(f"SandboxPool.start() called in state {self._state.value!r}")
        self._state = _State.RUNNING
        self._refill = asyncio.create_task(self._keep_filled(), name="ipybox-pool-refill")

    async def wait_ready(self, count: int | None = None, timeout: float | None = None) -> None:
        """Wait until `count` (default: `size`) sandboxes are ready.

        Raises:
            TimeoutError: Not enough sandboxes were ready within `timeout` seconds.
            InvalidStateError: The pool is not running.
        """
        wanted = self.size if count is None else min(count, self.size)

        async def filled() -> None:
            while self.ready < wanted:
                self._check_running()
                await asyncio.sleep(0.01)

        await asyncio.wait_for(filled(), timeout)

    async def acquire(self) -> Sandbox:
        """Take a ready sandbox out of the pool; waits for one when none is ready.

        The caller owns the sandbox and closes it (`await sandbox.close()` or `async with`).

        Raises:
            InvalidStateError: The pool is not running.
            IpyboxError: No ready sandbox, and starting one failed (the error of that start, e.g.
                `ImageNotFoundError` or `ContainerStartError`). The pool keeps retrying in the background.
        """
        self._check_running()
        while True:
            sandbox = await self._next()
            if sandbox.healthy():
                self._handed_out.add(sandbox)
                sandbox._on_close.append(self._handed_out.discard)
                self._wake.set()
                if self._idle_timeout is not None:
                    try:
                        await sandbox.container._arm_idle_timeout(self._idle_timeout)
                    except BaseException:
                        await sandbox.close()
                        raise
                return sandbox
            self._discard(sandbox)

    async def restore(
        self,
        snapshot: Snapshot | str | Path,
        *,
        timeout: float = 60,
        mcp_servers: Mapping[str, dict[str, Any]] | None = None,
    ) -> Sandbox:
        """A pooled sandbox with a snapshot restored into it: `fork(snapshot, 1)[0]`."""
        return (await self.fork(snapshot, 1, timeout=timeout, mcp_servers=mcp_servers))[0]

    async def fork(
        self,
        snapshot: Snapshot | str | Path,
        n: int,
        *,
        timeout: float = 60,
        mcp_servers: Mapping[str, dict[str, Any]] | None = None,
    ) -> list[Sandbox]:
        """`n` pooled sandboxes, each with the snapshot's files and namespaces restored into it.

        The snapshot (a `Snapshot` or its path) is verified completely first; the sandboxes are taken
        from the pool and restored concurrently, and the pool starts no replacements until they are done
        (the starts would compete with the restores for the CPU). The pool's options apply (its image
        must be the snapshot's: checked by image id), not the snapshot's limits. The caller owns the
        sandboxes (`close()`). `mcp_servers` as `ipybox.snapshot.restore` takes it.

        Raises:
            SnapshotError: The snapshot is incomplete, tampered with, of another image, or a namespace
                failed to load; the sandboxes taken for it are removed.
            InvalidStateError: The pool is not running.
            ValueError: `n` is below 1.
        """
        from ipybox import _snapshot_format
        from ipybox.snapshot import Snapshot, _checked_servers, _load_into

        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        servers = _checked_servers(mcp_servers)
        self._check_running()
        snap = snapshot if isinstance(snapshot, Snapshot) else Snapshot.load(snapshot)
        await asyncio.to_thread(_snapshot_format.verify_files, snap.path, snap._manifest)
        self._holds += 1
        sandboxes: list[Sandbox] = []
        try:
            acquiring = [asyncio.ensure_future(self.acquire()) for _ in range(n)]
            try:
                for task in acquiring:
                    sandboxes.append(await task)
            except BaseException:
                for task in acquiring:
                    task.cancel()
                for result in await asyncio.gather(*acquiring, return_exceptions=True):
                    if isinstance(result, Sandbox) and result not in sandboxes:
                        sandboxes.append(result)
                raise
            await asyncio.gather(*(_load_into(sandbox, snap, timeout, servers=servers) for sandbox in sandboxes))
        except BaseException:
            await asyncio.gather(*(sandbox.close() for sandbox in sandboxes), return_exceptions=True)
            raise
        finally:
            self._holds -= 1
            self._wake.set()
        return sandboxes

    @contextlib.asynccontextmanager
    async def sandbox(self) -> AsyncIterator[Sandbox]:
        """`async with pool.sandbox() as sandbox:` acquires a sandbox and removes it on exit."""
        sandbox = await self.acquire()
        async with sandbox:
            yield sandbox

    async def close(self) -> None:
        """Stop refilling and remove every sandbox the pool started, handed out or not.

        Idempotent; a call while another is in progress waits for that one to finish (a signal handler
        that closes the pool and then exits the process must not exit before the containers are gone).
        """
        if self._closing is None:
            self._state = _State.CLOSED
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        tasks = [task for task in [self._refill, *self._starting] if task is not None]
        for task in tasks:
            task.cancel()
        # Starts cancelled mid-way remove their own containers (ExecutionContainer.run cleans up).
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._announce()  # waiting callers see the pool closed
        sandboxes = list(self._handed_out)
        while not self._ready.empty():
            sandboxes.append(self._ready.get_nowait())
        await asyncio.gather(*self._discarding, return_exceptions=True)
        results = await asyncio.gather(*(sandbox.close() for sandbox in sandboxes), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                logger.warning("removing a pooled sandbox failed: %s", result)

    async def __aenter__(self) -> SandboxPool:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- internals --------------------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._state is not _State.RUNNING:
            hint = "use `async with SandboxPool(...)` or call start()" if self._state is _State.NEW else "it is closed"
            raise InvalidStateError(f"SandboxPool is not running: {hint}")

    async def _next(self) -> Sandbox:
        """The next ready sandbox; raises the error of a failed start that happens while waiting."""
        async with self._changed:
            # Counted until this task takes a sandbox, so the refill starts one for every waiter.
            waiter = _Waiter()
            self._waiters.append(waiter)
            self._wake.set()
            try:
                while True:
                    # A sandbox is the better answer, even when a failure was meant for this waiter too.
                    if not self._ready.empty():
                        return self._ready.get_nowait()
                    if waiter.failure is not None:
                        raise waiter.failure
                    self._check_running()
                    await self._changed.wait()
            finally:
                self._waiters.remove(waiter)

    async def _announce(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _discard(self, sandbox: Sandbox) -> None:
        """Remove a dead spare in the background: the refill and the callers do not wait for it."""
        logger.warning("discarding pooled sandbox %s: its kernel connection is gone", sandbox.container.container_id)
        task = asyncio.ensure_future(sandbox.close())
        self._discarding.add(task)
        task.add_done_callback(self._discarding.discard)
        task.add_done_callback(lambda done: done.cancelled() or done.exception())  # logged by close(), not raised
        self._wake.set()

    def _prune(self) -> None:
        """Take spares whose connection died out of the queue, so `ready` counts only live ones and the
        refill replaces them now (a node of a swarm went down), not when an acquire() reaches them."""
        alive = []
        while not self._ready.empty():
            sandbox = self._ready.get_nowait()
            if sandbox.healthy():
                alive.append(sandbox)
            else:
                self._discard(sandbox)
        for sandbox in alive:
            self._ready.put_nowait(sandbox)

    async def _keep_filled(self) -> None:
        while True:
            self._prune()
            while self._ready.qsize() + len(self._starting) < (0 if self._holds else self.size) + len(self._waiters):
                task = asyncio.create_task(self._start_one(), name="ipybox-pool-start")
                self._starting.add(task)
                task.add_done_callback(self._starting.discard)
                task.add_done_callback(lambda _task: self._wake.set())
            self._wake.clear()
            # asyncio.timeout, not wait_for: 3.11's wait_for could leave this task cancelling for ever
            # when close() cancelled it (seen: the pool's close hung).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_PRUNE_INTERVAL):
                    await self._wake.wait()
            if self._consecutive_failures:
                delay = _RETRY_DELAYS[min(self._consecutive_failures, len(_RETRY_DELAYS)) - 1]
                await asyncio.sleep(delay)

    async def _start_one(self) -> None:
        async with self._slots:
            try:
                sandbox = await self._new_sandbox()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._consecutive_failures += 1
                logger.warning("starting a pooled sandbox failed (%d in a row): %s", self._consecutive_failures, exc)
                waiter = next((w for w in self._waiters if w.failure is None), None)
                if waiter is not None:
                    waiter.failure = exc
                    await self._announce()
                return
        self._consecutive_failures = 0
        if self._state is not _State.RUNNING:
            await sandbox.close()
            return
        self._ready.put_nowait(sandbox)
        await self._announce()

    async def _new_sandbox(self) -> Sandbox:
        return await start_sandbox(
            self.container_options,
            self.firewall,
            arms_later=self._idle_timeout is not None,
            client_options=self.client_options,
        )


async def start_sandbox(
    container_options: dict[str, Any],
    firewall: list[str] | None = None,
    *,
    arms_later: bool = False,
    client_options: dict[str, Any] | None = None,
) -> Sandbox:
    """Start one sandbox now: the container, its firewall (unless None), a connected, answering client
    (made with `client_options`).

    `arms_later`: created to end itself (AutoRemove), its idle timeout set later (a pool's hand-out).
    On failure everything started is removed; errors other than ipybox's are raised as IpyboxError.
    """
    container = ExecutionContainer(**container_options)
    container._arms_later = arms_later
    client: ExecutionClient | None = None
    try:
        await container.run()
        if firewall is not None:
            await container.init_firewall(firewall)
        client = ExecutionClient(
            port=container.executor_port, host=_client_host(container.host), **(client_options or {})
        )
        await client.connect()
        # An empty cell: the kernel answers once, so the first real cell does not wait for it. IPython
        # does not count empty cells, so the caller's first cell is still [1].
        await client.execute("", timeout=container.startup_timeout)
    except BaseException as exc:
        try:
            if client is not None:
                await client.disconnect()
        finally:
            # Also when the disconnect is cancelled (a second cancellation): the container must go.
            await container.kill()
        if isinstance(exc, Exception) and not isinstance(exc, IpyboxError):
            raise IpyboxError(f"starting a sandbox failed: {exc}") from exc
        raise
    return Sandbox(container, client, client_options)


def _connected(client: ExecutionClient) -> bool:
    return client.healthy


def _client_host(bind_host: str) -> str:
    """The address a client on this machine uses for ports published on `bind_host`."""
    return "localhost" if bind_host in ("0.0.0.0", "::", "") else bind_host
