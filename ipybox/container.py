"""ExecutionContainer: the lifecycle of one ipybox sandbox container."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import io
import ipaddress
import logging
import os
import re
import tarfile
import time
import warnings
from collections.abc import AsyncIterator, Sequence
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import TYPE_CHECKING, Any

import aiodocker
import aiohttp

from ipybox import _firewall, _freezer, _routes, _tokens, _where
from ipybox._cleanup import owner_label
from ipybox._docker import connect, docker_errors
from ipybox._errors import (
    ContainerError,
    ContainerStartError,
    FirewallError,
    InvalidStateError,
    ServerConnectionError,
)
from ipybox._labels import (
    CONTAINER_LABEL,
    EXECUTOR_PORT,
    EXECUTOR_SOCKET,
    EXPIRES_LABEL,
    GID_LABEL,
    HELPER_LABEL,
    IDLE_TIMEOUT_LABEL,
    MAX_LIFETIME_LABEL,
    OWNER_LABEL,
    READY_LINE,
    RESOURCE_PORT,
    RESOURCE_SOCKET,
    TOKEN_PATH,
    UID_LABEL,
    VERSION_LABEL,
    WORKSPACE_LABEL,
)
from ipybox._limits import parse_memory
from ipybox._process import Process
from ipybox._pull import ensure_image
from ipybox._version import __version__
from ipybox.backends import Backend, LocalEngine

if TYPE_CHECKING:  # snapshot.py and pool.py import this module
    from ipybox.executor import ExecutionClient
    from ipybox.pool import Sandbox
    from ipybox.snapshot import Snapshot

logger = logging.getLogger(__name__)

DEFAULT_TAG = "gradion-ai/ipybox"

APP_DIR = PurePosixPath("/app")

_DEFAULT_TMP_SIZE = 2**30
_DEFAULT_APP_SIZE = 2 * 2**30
_PAUSE_ATTEMPTS = 3
"""Tries of `docker pause` when the engine reports "unable to freeze" (runc gives up on a busy cgroup)."""
_KERNELS_TIMEOUT = aiohttp.ClientTimeout(total=10)
_REMOVE_TIMEOUT = 60.0
"""Seconds kill() waits for the engine to remove the container; it keeps waiting through cancellations."""
_VOLUME_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")
"""Docker's rule for volume names."""
_LEASE_TIMEOUT = 10.0
"""Seconds to open the owner lease on each route."""


class _Derived(enum.Enum):
    """The default of `tmp_size`/`app_size`: derived from `memory_limit` (None would mean no cap)."""

    TOKEN = "derived from memory_limit"


_DERIVED = _Derived.TOKEN

_warned_file_caps: set[tuple[int, int, int | None]] = set()
"""Configurations warned about in this process: a pool starts many containers of one configuration."""


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    KILLED = "killed"


class ExecutionContainer:
    """Context manager for the lifecycle of a code execution Docker container.

    A code execution container provides:

    - a Jupyter Kernel Gateway on the *executor* port, for stateful IPython kernels
      (use `ExecutionClient`);
    - a resource server on the *resource* port, for files, module sources and MCP code
      generation (use `ResourceClient`);
    - an optional egress firewall (`init_firewall`).

    Both ports require a per-container secret that ipybox generates and hands to the clients on
    its own (see docs/security.md). Ports are published on 127.0.0.1 unless `host` says otherwise.

    Args:
        tag: Name and optionally tag of the ipybox Docker image to use (format: name:tag)
        binds: A dictionary mapping host paths to container paths for bind mounts. Host paths may
            be relative or absolute (and are created when missing). Container paths must be
            relative and are created as subdirectories of /app in the container.
        env: Environment variables to set in the container
        executor_port: Host port for the container's executor port. A random port is allocated if
            not specified.
        resource_port: Host port for the container's resource port. A random port is allocated if
            not specified.
        port_allocation_timeout: Maximum time in seconds to wait for port random allocation.
        show_pull_progress: Whether to show progress (on stderr) when pulling the Docker image.
        host: Host address the ports are published on. The default, 127.0.0.1, keeps the sandbox
            unreachable from other machines; use "0.0.0.0" for remote clients.
        memory_limit: Memory limit of the container (bytes, or a string like "512m", "4g"); swap
            is limited to the same amount. None for no limit.
        cpu_limit: Number of CPUs the container may use (e.g. 1.5). None for no limit.
        pids_limit: Maximum number of processes and threads in the container. None for no limit.
        labels: Extra Docker labels for the container (e.g. to find it for cleanup).
        startup_timeout: Seconds to wait for the container's servers to become ready.
        network: Docker network to create the container on (default: Docker's default bridge). On a
            user-defined network, other containers' names resolve through Docker's embedded DNS.
            On any network, other containers (other sandboxes included) cannot open connections
            to the sandbox except to its two token-protected ports; the host can (docs/security.md).
        dns: DNS servers for the sandbox (Docker's `--dns`; on a user-defined network, the servers
            its embedded DNS forwards to). Default: the engine host's. Under `init_firewall` these
            are the only resolvers the sandbox may reach.
        open_files_limit: Maximum number of open files per process in the container.
        tmp_size: Size cap of each of `/tmp`, `/var/tmp`, `/run/lock` and the sandbox user's `$HOME`
            (tmpfs mounts; their contents count as memory). Default: a quarter of `memory_limit`,
            at most 1 GiB (1 GiB without a memory limit).
        app_size: Size cap of the container's `/app`, the kernels' working directory where the file
            API writes (a tmpfs owned by the sandbox user, `nosuid,nodev` but executable; its
            contents count as memory, and nothing lands on the host's disk). Writes beyond it fail
            with `ENOSPC`. Binds still appear under it. Anything the image itself has in `/app` is
            hidden. None: no cap, `/app` stays in the container's writable layer on the host's disk.
            Default: half of `memory_limit`, at most 2 GiB (2 GiB without a memory limit).

            So the default caps follow the memory limit: 1 GiB and 2 GiB with the default 4g, 128 MiB
            and 256 MiB with `memory_limit="512m"`, and together they never exceed it. Values given
            explicitly are used as given. A warning is logged when `app_size` plus `tmp_size`
            exceed `memory_limit` (full directories would then hit the memory limit, and the kernel
            be killed, before `ENOSPC`), once per configuration in a process, however many
            containers (e.g. of a `SandboxPool`) use it.
        allowed_hosts: Host names (besides localhost and IP addresses) that clients may use in the
            `Host` header to reach the servers, e.g. a name for remote use with `host="0.0.0.0"`.
            Other names are refused (a DNS-rebinding defence).
        max_kernels: Most kernels (one per ExecutionClient) the container runs at once; more are
            refused with HTTP 403.
        idle_timeout: Seconds without activity after which the sandbox removes itself: no kernel
            message, no busy kernel (a long silent cell counts as activity) and no resource request.
            Counted in awake time: time paused does not count. None: never.
        max_lifetime: Seconds after the start at which the sandbox removes itself, whatever it is
            doing (time paused counts). None: never. A sandbox paused at that moment cannot act on
            it: it stays until resumed or removed.
        owner_bound: Remove the sandbox when this process dies, SIGKILL included. The process holds a
            lease (a connection to the sandbox's resource server, without traffic) from `run()` until
            `kill()` or `detach()`; once the last lease has been closed for `owner_grace` seconds, the
            sandbox removes itself. A busy process (its event loop blocked) keeps its lease.
            `attach()` to an owner-bound sandbox takes a lease too, for as long as it is attached.
        owner_grace: Seconds an owner-bound sandbox waits for a lease to come back (also after the
            start, before the first lease).

        workspace: Name of a Docker volume mounted at `/app` instead of the tmpfs, so files there
            outlive the sandbox: a later sandbox with the same `workspace` finds them. Created (and
            labelled) when missing; a new volume starts as a copy of the image's `/app`, owned by the
            sandbox user. Not size-capped (its writes go to the engine host's disk and do not count as
            memory), so `app_size` cannot be given with it. `kill()` keeps it (`docker volume rm` removes
            it). One running sandbox per workspace: `run()` refuses a second.

        With any of `idle_timeout`, `max_lifetime` or `owner_bound`, the container is created with
        Docker's AutoRemove: once the sandbox ends itself (its server exits) the engine removes it,
        its logs included. Sandboxes without them are unaffected.

    Raises:
        ValueError: A container path in `binds` is absolute or contains "..", or a limit is invalid.

    Example:
        ```python
        async with ExecutionContainer(binds={"data": "data"}) as container:
            async with ExecutionClient(port=container.executor_port) as client:
                result = await client.execute("print(1 + 1)")
                print(result.text)
        ```
    """

    def __init__(
        self,
        tag: str = DEFAULT_TAG,
        binds: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        executor_port: int | None = None,
        resource_port: int | None = None,
        port_allocation_timeout: float = 10,
        show_pull_progress: bool = True,
        *,
        host: str = "127.0.0.1",
        memory_limit: int | str | None = "4g",
        cpu_limit: float | None = None,
        pids_limit: int | None = 1024,
        labels: dict[str, str] | None = None,
        startup_timeout: float = 30,
        network: str | None = None,
        open_files_limit: int = 4096,
        tmp_size: int | str | _Derived = _DERIVED,
        app_size: int | str | None | _Derived = _DERIVED,
        allowed_hosts: list[str] | None = None,
        max_kernels: int = 16,
        dns: list[str] | None = None,
        idle_timeout: float | None = None,
        max_lifetime: float | None = None,
        owner_bound: bool = False,
        owner_grace: float = 10,
        workspace: str | None = None,
        backend: Backend | None = None,
    ):
        self.tag = tag
        self.binds = binds or {}
        self.env = env or {}
        self.show_pull_progress = show_pull_progress
        self.host = host
        self.labels = labels or {}
        self.startup_timeout = startup_timeout
        if network in ("host", "none") or (network or "").startswith("container:"):
            raise ValueError(
                f"network={network!r} is not supported: a sandbox needs a network namespace of its own, where "
                "its isolation and firewall rules live; pass a bridge or user-defined network, or None"
            )
        self.network = network
        self.dns = [_dns_server(server) for server in dns or []]
        self.allowed_hosts = list(allowed_hosts or [])
        if max_kernels < 1:
            raise ValueError(f"max_kernels must be at least 1, got {max_kernels}")
        self.max_kernels = max_kernels
        for name in self.allowed_hosts:
            if not name or "," in name or any(c.isspace() for c in name):
                raise ValueError(f"allowed_hosts entry {name!r} is not a host name")

        self._memory_limit = parse_memory(memory_limit)
        if cpu_limit is not None and cpu_limit <= 0:
            raise ValueError(f"cpu_limit must be positive, got {cpu_limit}")
        if pids_limit is not None and pids_limit <= 0:
            raise ValueError(f"pids_limit must be positive, got {pids_limit}")
        self._cpu_limit = cpu_limit
        self._pids_limit = pids_limit
        if open_files_limit < 64:
            raise ValueError(f"open_files_limit must be at least 64, got {open_files_limit}")
        self._open_files_limit = open_files_limit
        for option, seconds in (("idle_timeout", idle_timeout), ("max_lifetime", max_lifetime)):
            if seconds is not None and not seconds > 0:
                raise ValueError(f"{option} must be a positive number of seconds or None, got {seconds}")
        if not owner_grace > 0:
            raise ValueError(f"owner_grace must be a positive number of seconds, got {owner_grace}")
        self.idle_timeout = idle_timeout
        self._arms_later = False  # a pool's spare: created to end itself, its idle timeout set at hand-out
        self.max_lifetime = max_lifetime
        self.owner_bound = owner_bound
        self.owner_grace = owner_grace
        if workspace is not None:
            if not isinstance(app_size, _Derived):
                raise ValueError(
                    f"app_size cannot be used with workspace={workspace!r}: a workspace volume is not size-capped; "
                    "leave app_size unset"
                )
            if not _VOLUME_NAME.fullmatch(workspace):
                raise ValueError(f"workspace {workspace!r} is not a Docker volume name ([a-zA-Z0-9][a-zA-Z0-9_.-]+)")
            app_size = None  # no tmpfs at /app: the volume is mounted there
        self.workspace = workspace
        self._tmp_size, self._app_size = _file_caps(self._memory_limit, tmp_size, app_size)
        _check_file_caps(self._memory_limit, self._tmp_size, self._app_size)
        for container_path in self.binds.values():
            _container_bind_path(container_path)  # fail early; run() checks again

        self.backend = backend if backend is not None else LocalEngine()
        self._docker: aiodocker.Docker | None = None
        self._container: Any = None
        self._placement: Any = None  # what else the backend made for this sandbox (a swarm service)
        self._executor_port = executor_port
        self._resource_port = resource_port
        self._port_allocation_timeout = port_allocation_timeout
        self._state = _State.NEW
        self._registered: list[int] = []
        self._image_id: str | None = None
        self._pid = 0
        self._server: Process | None = None  # the server process, identified at start (ipybox._process)
        self._removal: asyncio.Future[None] | None = None
        self._removal_reported = True
        self._paused = False  # as this object last paused, resumed or inspected it (the freezer, when local, wins)
        self._token: str | None = None
        self._attached = False  # made by attach(), not run()
        self._lease: _Lease | None = None
        self.backend.check(self)

    # -- public API -------------------------------------------------------------------------------

    @property
    def container_id(self) -> str | None:
        """The Docker container id while running, else None."""
        return self._container.id if self._container is not None else None

    @property
    def executor_port(self) -> int:
        """The host port of the container's executor port.

        Either an application-defined `executor_port` via the constructor or a dynamically
        allocated random port.

        Raises:
            RuntimeError: If the container is not running and an application-defined port was
                not provided.
        """
        if self._executor_port is None:
            raise InvalidStateError("Container not running: the executor port is allocated by run()")
        return self._executor_port

    @property
    def resource_port(self) -> int:
        """The host port of the container's resource port.

        Either an application-defined `resource_port` via the constructor or a dynamically
        allocated random port.

        Raises:
            RuntimeError: If the container is not running and an application-defined port was
                not provided.
        """
        if self._resource_port is None:
            raise InvalidStateError("Container not running: the resource port is allocated by run()")
        return self._resource_port

    def __del__(self) -> None:
        # A sandbox that nobody can kill any more (the seed API is not owner-bound by default): say so where
        # Python reports unclosed resources (a ResourceWarning: shown by pytest, `python -X dev`, `-W default`).
        try:
            if self._state is _State.RUNNING and self._container is not None and not self._self_ending:
                warnings.warn(
                    f"ExecutionContainer {self._container.id[:12]} was never killed: its container keeps running. "
                    "Use `async with`, kill(), or detach() to leave it running on purpose",
                    ResourceWarning,
                    stacklevel=1,  # __del__ runs wherever the last reference went: no caller to name
                    source=self,
                )
        except Exception:  # a half-built object, or interpreter shutdown
            pass

    async def __aenter__(self) -> ExecutionContainer:
        await self.run()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.kill()

    async def run(self) -> None:
        """Creates and starts a code execution Docker container.

        Returns once both servers in the container accept connections. On failure, everything
        started so far is removed before the error propagates.

        Raises:
            ImageNotFoundError: The image is not local and cannot be pulled.
            ContainerStartError: The container's servers did not come up within `startup_timeout`.
            DockerUnavailableError: No Docker engine answers.
            RuntimeError: The container was already started.
        """
        if self._state is not _State.NEW:
            raise InvalidStateError(
                f"ExecutionContainer.run() called in state {self._state.value!r}; "
                "create a new ExecutionContainer for a new container"
            )
        self._state = _State.RUNNING
        try:
            await self._run()
        except BaseException as exc:
            try:
                await self.kill()
            except Exception as removal_error:
                # The start's error is the one to see; a failed clean-up must not replace it.
                logger.warning("removing the container after %r failed: %s", exc, removal_error)
            raise

    async def kill(self) -> None:
        """Kills and removes the current code execution Docker container. Safe to call repeatedly.

        A cancelled kill() still finishes the removal before the cancellation goes on (however often it
        is cancelled), so no container is left that nothing refers to.

        Raises:
            ContainerError: The engine refused the removal, or did not finish it within 60 s.
        """
        self._state = _State.KILLED if self._state is not _State.NEW else _State.NEW
        container, self._container = self._container, None
        docker, self._docker = self._docker, None
        lease, self._lease = self._lease, None
        if lease is not None:
            await lease.release()
        if container is not None:
            _freezer.note_paused(container.id, False)
        if self._attached and container is not None:
            # Attached in the process that started it: the records were the starter's; they go too.
            self._registered = [p for p in (self._executor_port, self._resource_port) if p is not None]
        for port in self._registered:
            _tokens.unregister(self.host, port, container.id if container is not None else "")
            _where.forget(self.host, port)
        _routes.forget(self.host, [p for p in (self._executor_port, self._resource_port) if p is not None])
        self._registered.clear()
        placement, self._placement = self._placement, None
        if container is not None or docker is not None or placement is not None:
            self._removal = asyncio.ensure_future(self.backend.remove(container, docker, placement))
            self._removal_reported = False
        removal = self._removal
        if removal is None:
            return
        if await _settle(removal):
            if not removal.cancelled() and removal.exception() is not None and not self._removal_reported:
                self._removal_reported = True
                logger.warning("kill() was cancelled, and the removal it waited for failed: %s", removal.exception())
            raise asyncio.CancelledError
        if not self._removal_reported:
            self._removal_reported = True
            removal.result()

    @property
    def paused(self) -> bool:
        """Whether the sandbox is paused (its processes frozen).

        Read from the container's freezer when the engine is local (so a `docker pause` or `ipybox
        pause` from elsewhere counts), else as this object's last `pause()`, `resume()` or `attach()` left it.
        """
        if self._container is None:
            return False
        if self._pid:
            state = _freezer.frozen_pid(self._pid)
            if state is not None:
                return state
        return self._paused

    async def pause(self) -> None:
        """Freeze every process of the sandbox (`docker pause`): no CPU used, memory and kernels kept.

        Idempotent. While paused, open clients wait: executions (their timeouts stopped), heartbeats
        and resource transfers resume with the sandbox; see docs/api.md for what code in the sandbox
        sees (wall and monotonic clocks run on).

        Raises:
            InvalidStateError: The container is not running.
            ContainerError: The engine could not freeze the sandbox (after 3 tries when the freezer gave
                up on a busy cgroup); the sandbox then keeps running.
        """
        container = self._running_container()
        if self.paused:
            self._paused = True
            return
        for attempt in range(1, _PAUSE_ATTEMPTS + 1):
            try:
                with docker_errors("pausing the sandbox", container.id):
                    await container.pause()
                break
            except ContainerError as exc:
                message = str(exc)
                if "already paused" in message:
                    break
                if "unable to freeze" not in message:
                    raise
                # runc thaws the cgroup again when it does not reach FROZEN in time: check, then retry.
                if await self._inspect_paused(container):
                    break
                if attempt == _PAUSE_ATTEMPTS:
                    raise ContainerError(
                        f"pausing failed {_PAUSE_ATTEMPTS} times (the cgroup freezer gave up on busy processes); "
                        f"the sandbox keeps running. Last error: {message}",
                        container_id=container.id,
                    ) from exc
                logger.info("pausing %s: unable to freeze (try %d); retrying", container.id[:12], attempt)
        self._paused = True
        _freezer.note_paused(container.id, True)

    async def resume(self) -> None:
        """Thaw a paused sandbox (`docker unpause`); its clients continue where they were. Idempotent.

        Raises:
            InvalidStateError: The container is not running.
            ContainerError: The engine refused.
        """
        container = self._running_container()
        if self._pid and _freezer.frozen_pid(self._pid) is False:
            self._paused = False
            _freezer.note_paused(container.id, False)
            return
        try:
            with docker_errors("resuming the sandbox", container.id):
                await container.unpause()
        except ContainerError as exc:
            if "is not paused" not in str(exc):
                raise
        self._paused = False
        _freezer.note_paused(container.id, False)

    async def kernel_ids(self) -> list[str]:
        """The ids of the kernels running in the sandbox, oldest first (the gateway's `GET /api/kernels`).

        A kernel outlives the client that created it when that client disconnected with
        `disconnect(shutdown=False)` or its process died; `ExecutionClient(port, kernel_id=...)`
        connects to it again.

        Raises:
            InvalidStateError: The container is not running, or is paused.
            ServerConnectionError: The gateway could not be reached or refused.
        """
        self._running_container()
        if self.paused:
            raise InvalidStateError("the sandbox is paused: resume() it to list its kernels")
        kernels = await list_kernels(self.host, self.executor_port, self._token)
        kernels.sort(key=lambda kernel: str(kernel.get("last_activity") or ""))
        return [str(kernel["id"]) for kernel in kernels if "id" in kernel]

    @classmethod
    async def attach(cls, id_or_name: str, *, backend: Backend | None = None) -> ExecutionContainer:
        """An `ExecutionContainer` for a sandbox already running on this engine (or `backend`), started
        by this user.

        Finds the container by id (or a unique prefix of it) or name, its published ports, its secret
        (the user-only record its starter left: only the user who started a sandbox can attach) and
        the direct routes, as the starting process has them. Clients then connect as usual:
        `ExecutionClient(port=c.executor_port, host=c.host)` for a new kernel, `kernel_id=` for one of
        `await c.kernel_ids()`. On a swarm (`backend=Swarm(...)`), `id_or_name` is the task's container
        id (`container_id`) or a prefix of it, or the sandbox's service name or id.

        The returned object owns the sandbox like the one that started it: `kill()` (and leaving
        `async with`) removes it. Call `detach()` instead to let go of it and leave it running.

        Raises:
            ContainerError: No such container, not an ipybox sandbox, not running, or no secret recorded
                for it (started by another user, or on another machine).
            DockerUnavailableError: No Docker engine answers.
        """
        backend = LocalEngine() if backend is None else backend
        found = await backend.locate(id_or_name)
        docker, container, info = found.docker, found.container, found.info
        try:
            labels = (info.get("Config") or {}).get("Labels") or {}
            container_id = str(info["Id"])
            if CONTAINER_LABEL not in labels or HELPER_LABEL in labels:
                raise ContainerError(f"container {id_or_name!r} is not an ipybox sandbox", container_id=container_id)
            state = info.get("State") or {}
            if not state.get("Running"):
                raise ContainerError(
                    f"sandbox {id_or_name!r} is not running ({state.get('Status')})", container_id=container_id
                )
            token = _tokens.container_token(container_id)
            if token is None:
                raise ContainerError(
                    f"no secret is recorded for sandbox {id_or_name!r} (in {_tokens.token_dir()}): only the user "
                    "who started a sandbox, on this machine, can attach to it",
                    container_id=container_id,
                )
            host = found.host
            image = str((info.get("Config") or {}).get("Image") or DEFAULT_TAG)
            attached = cls(image, host=host, labels=labels, backend=backend)
            attached._docker, attached._container = docker, container
            attached._placement = found.placement
            attached._image_id = str(info.get("Image") or "") or None
            attached._state = _State.RUNNING
            attached._paused = bool(state.get("Paused"))
            attached._token = token
            attached._attached = True
        except BaseException:
            await docker.close()
            raise
        try:
            await attached._read_ports()
            for port in (attached.executor_port, attached.resource_port):
                if _tokens.registered(host, port, container_id):
                    continue  # this process started it: its records stay the starter's
                _tokens.register(host, port, token, container_id, attached._pid, attached._server)
                attached._registered.append(port)
                if place := backend.describe(attached):
                    _where.note(host, port, place)
            if labels.get(OWNER_LABEL):
                attached.owner_bound = True
                attached._lease = await _Lease.take(host, attached.resource_port, token)
        except BaseException:
            await attached.detach()
            raise
        return attached

    async def detach(self) -> None:
        """Let go of the sandbox and leave it running: forget its secret and routes in this process
        (the user-only record stays, for `attach()`), close the engine connection. Idempotent;
        the object cannot be used afterwards."""
        self._state = _State.KILLED if self._state is not _State.NEW else _State.NEW
        self._container = None
        docker, self._docker = self._docker, None
        lease, self._lease = self._lease, None
        if lease is not None:
            await lease.release()
        for port in self._registered:
            _tokens.forget(self.host, port)
            _where.forget(self.host, port)
        if self._registered:  # else the records are those of the object that started it, in this process
            _routes.forget(self.host, self._registered)
        self._registered.clear()
        if docker is not None:
            await docker.close()

    async def snapshot(
        self, path: str | Path | None = None, *, clients: Sequence[ExecutionClient] | None = None, timeout: float = 60
    ) -> Snapshot:
        """Snapshot this sandbox's `/app` and its kernels' namespaces (all kernels, or those of `clients`)
        into a directory on the host: `ipybox.snapshot.snapshot(self, ...)`, which says what is kept."""
        from ipybox.snapshot import snapshot

        return await snapshot(self, path, clients=clients, timeout=timeout)

    async def fork(
        self,
        n: int,
        *,
        clients: Sequence[ExecutionClient] | None = None,
        timeout: float = 60,
        **container_options: Any,
    ) -> list[Sandbox]:
        """`n` independent new sandboxes from a temporary snapshot of this one: `ipybox.snapshot.fork`."""
        from ipybox.snapshot import fork

        return await fork(self, n, clients=clients, timeout=timeout, **container_options)

    @classmethod
    async def restore(
        cls, snapshot: Snapshot | str | Path, *, timeout: float = 60, **container_options: Any
    ) -> Sandbox:
        """A new running sandbox from a snapshot (a `Snapshot` or its directory), checked before anything of
        it reaches the sandbox: `ipybox.snapshot.restore`. Returns a `Sandbox` (container and clients)."""
        from ipybox.snapshot import restore

        return await restore(snapshot, timeout=timeout, **container_options)

    async def init_firewall(self, allowed_domains: list[str] | None = None) -> None:
        """Initialize firewall rules to restrict internet access to a whitelist of allowed domains,
        IPv4 addresses, or CIDR ranges.

        Traffic policy inside the container after initialisation:

        - Outbound traffic (TCP and UDP, IPv4 and IPv6) goes only to the whitelist entries: domains
          are resolved at call time, inside the sandbox's network namespace, by DNS queries to the
          resolvers Docker configured for it (never through its /etc/hosts or /etc/resolv.conf, which
          a root image can write), to all their A records. Everything else is rejected at once
          (connection refused / unreachable), not dropped into a timeout.
        - DNS works, but only through the resolvers Docker configured for the container (the
          engine host's, or `dns=`).
        - Loopback traffic is unrestricted.
        - The host network (\\*/24 derived from the default gateway) is reachable, SSH included;
          SSH is allowed there and nowhere else. Inbound, as without a firewall, only the host
          (the gateways) may open connections to the sandbox: other containers, other sandboxes
          among them, reach only the executor and resource ports.
        - The executor and resource ports keep serving the host; replies to inbound connections
          are the only other traffic allowed out.
        - The cloud metadata range 169.254.0.0/16 is blocked unless an entry lies inside it.

        DNS failures when resolving an allowed domain yield a warning but do not stop the firewall
        initialization.

        A firewall can be initialized multiple times per container. Subsequent calls will clear
        previous firewall rules and enforce the new `allowed_domains` list; connections opened
        earlier to hosts no longer allowed stop working.

        The rules are applied by a short-lived helper container that joins the sandbox's network
        namespace with NET_ADMIN; the sandbox never holds NET_ADMIN or NET_RAW, so its code cannot
        undo them. For that reason root images (`ipybox build -r`) can be firewalled too.

        Args:
            allowed_domains: List of domains, IP addresses, or CIDR ranges that should be
                reachable from the container. If None or empty, only essential services are
                allowed.

        Raises:
            RuntimeError: If the container is not running, or firewall initialization fails
                (`FirewallError`, carrying the helper's output and saying what became of the
                sandbox: left locked down when the helper's lock-down was in place, else
                disconnected from all its networks, else removed; it is never left open).
            ValueError: An entry is malformed; no rule was changed.
        """
        if self._container is None or self._docker is None or self._image_id is None:
            raise InvalidStateError("Container not running")
        try:
            with docker_errors("initializing the firewall", self._container.id, FirewallError):
                summary = await _firewall.apply(
                    self._docker,
                    self._container,
                    self._image_id,
                    allowed_domains,
                    remove=self.kill,
                    protected=self.backend.protected_ports(),
                )
        except FirewallError:
            # A sandbox cut off its networks keeps its address in Docker's records no more, and the
            # address may go to another container: clients must not try it again.
            _routes.forget_addresses(self.host, [p for p in (self._executor_port, self._resource_port) if p])
            raise
        logger.info(
            "firewall of %s: allowed %s, host network %s, resolvers %s",
            self._container.id[:12],
            ", ".join(summary["allowed"]) or "nothing",
            summary["host_network"],
            ", ".join(summary["resolvers"]),
        )

    # -- internals --------------------------------------------------------------------------------

    async def _run(self) -> None:
        token = _tokens.new_token()
        await self.backend.start(self, token)
        assert self._docker is not None and self._container is not None and self._image_id is not None
        container_id = self._container.id
        with docker_errors("starting the container", container_id):
            # Closed to other containers before any client can reach a kernel; the helper runs while
            # the servers start, so it costs little of the start-up's time.
            isolating = asyncio.ensure_future(
                _firewall.isolate(self._docker, self._container, self._image_id, self.backend.protected_ports())
            )
            try:
                await self._wait_until_ready()
            except BaseException:
                isolating.cancel()  # the helper removes itself; run() removes the sandbox
                await _settle(isolating)
                if not isolating.cancelled():
                    isolating.exception()  # retrieved: the start's own error is the one to see
                raise
            if await _settle(isolating):
                raise asyncio.CancelledError
            isolating.result()
            await self._read_ports()

        self._token = token
        place = self.backend.describe(self)
        for port in (self.executor_port, self.resource_port):
            _tokens.register(self.host, port, token, container_id, self._pid, self._server)
            self._registered.append(port)
            if place:
                _where.note(self.host, port, place)
        if self.owner_bound:
            self._lease = await _Lease.take(self.host, self.resource_port, token)

    async def _start_on_engine(self, token: str) -> None:
        """`LocalEngine.start`: create the container on this process's engine, place the secret, start it."""
        self._docker = connect()
        with docker_errors("looking up the image"):
            image = await ensure_image(self._docker, self.tag, show_progress=self.show_pull_progress)
        self._image_id = str(image["Id"])
        sandbox_ids = image_ids(image)
        config = self._container_config(sandbox_ids, _image_home(image))
        async with contextlib.AsyncExitStack() as held:
            if self.workspace is not None:
                # Check and create under one lock: racing starts would all see the volume unused.
                await held.enter_async_context(_workspace_lock(self.workspace))
                await self._prepare_workspace(self.workspace)
            with docker_errors("creating the container"):
                creating = asyncio.ensure_future(self._docker.containers.create(config))
                # The engine creates the container even if we stop listening: a cancellation waits for its
                # id, so that kill() (run()'s clean-up) can remove it, and then goes on.
                if await _settle(creating):
                    with contextlib.suppress(Exception):
                        self._container = creating.result()
                    raise asyncio.CancelledError
                self._container = creating.result()
        container_id = self._container.id
        with docker_errors("placing the secret", container_id):
            await self._container.put_archive(str(PurePosixPath(TOKEN_PATH).parent), token_tar(token, sandbox_ids))
        with docker_errors("starting the container", container_id):
            await self._container.start()

    async def _prepare_workspace(self, name: str) -> None:
        assert self._docker is not None
        with docker_errors(f"checking workspace volume {name!r}"):
            users = await self._docker.containers.list(
                all=True, filters={"volume": [name], "status": ["created", "restarting", "running", "paused"]}
            )
        if users:
            raise ContainerError(
                f"workspace {name!r} is in use by sandbox {users[0].id[:12]}: one running sandbox per workspace; "
                "kill that one first, or use another workspace name",
                container_id=users[0].id,
            )
        with docker_errors(f"creating workspace volume {name!r}"):
            # Returns the existing volume when there is one (its labels unchanged).
            await self._docker.volumes.create(  # type: ignore[no-untyped-call]
                {"Name": name, "Labels": {WORKSPACE_LABEL: "true", VERSION_LABEL: __version__}}
            )

    @property
    def _self_ending(self) -> bool:
        return self.idle_timeout is not None or self.max_lifetime is not None or self.owner_bound or self._arms_later

    async def _arm_idle_timeout(self, seconds: float | None) -> None:
        """Set the running sandbox's idle timeout from now (`PUT /lifecycle`): a pool's hand-out.

        Only for a sandbox created to end itself (AutoRemove): an idle one's server exits and the engine
        removes the container.
        """
        self._running_container()
        if not self._self_ending:
            raise InvalidStateError("this sandbox was not created to end itself; pass idle_timeout= at creation")
        assert self._token is not None
        connector = _routes.published_connector(self.host, self.resource_port, RESOURCE_PORT)
        url = f"http://{self.host}:{self.resource_port}/lifecycle"
        headers = {"Authorization": f"token {self._token}"}
        try:
            async with aiohttp.ClientSession(headers=headers, connector=connector, timeout=_KERNELS_TIMEOUT) as session:
                async with session.put(url, json={"idle_timeout": seconds}) as response:
                    if response.status >= 400:
                        raise ServerConnectionError(
                            f"setting the idle timeout at {url} failed: HTTP {response.status} "
                            f"{_tail([await response.text()], 3)}",
                            status=response.status,
                        )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ServerConnectionError(f"setting the idle timeout at {url} failed: {exc!r}") from exc
        self.idle_timeout = seconds

    def _lifecycle_env(self) -> list[str]:
        env = []
        if self.idle_timeout is not None:
            env.append(f"IPYBOX_IDLE_TIMEOUT={self.idle_timeout:g}")
        if self.max_lifetime is not None:
            env.append(f"IPYBOX_MAX_LIFETIME={self.max_lifetime:g}")
        if self.owner_bound:
            env.append(f"IPYBOX_OWNER_GRACE={self.owner_grace:g}")
        if self._self_ending:
            # Created with AutoRemove: only then may `PUT /lifecycle` arm an idle timeout (a server that
            # exits in a container without it leaves a stopped container behind).
            env.append("IPYBOX_SELF_ENDING=1")
        return env

    def _lifecycle_labels(self) -> dict[str, str]:
        labels = {}
        if self.idle_timeout is not None:
            labels[IDLE_TIMEOUT_LABEL] = f"{self.idle_timeout:g}"
        if self.max_lifetime is not None:
            labels[MAX_LIFETIME_LABEL] = f"{self.max_lifetime:g}"
            labels[EXPIRES_LABEL] = f"{time.time() + self.max_lifetime:.0f}"
        if self.owner_bound:
            # With the pid, names the owner across reboots (a pid reused after one is another process).
            labels[OWNER_LABEL] = owner_label(os.getpid())
        return labels

    def _running_container(self) -> Any:
        if self._container is None or self._state is not _State.RUNNING:
            raise InvalidStateError("Container not running")
        return self._container

    async def _inspect_paused(self, container: Any) -> bool:
        with docker_errors("inspecting the sandbox", container.id):
            info = await container.show()
        return bool((info.get("State") or {}).get("Paused"))

    def _known_gone(self) -> bool:
        """True when the container is not running, as far as this host can tell without asking the engine.

        One procfs read: the container's init process (recorded when the engine is local) is no longer
        in the container's cgroup. With a remote engine only kill() makes it True.
        """
        if self._container is None:
            return True
        return _tokens.container_ended(self._container.id, self._pid)

    def _container_config(self, sandbox_ids: tuple[int, int], home: str | None = None) -> dict[str, Any]:
        binds = []
        for host_path, container_path in self.binds.items():
            source, target = _host_bind_path(host_path, sandbox_ids), _container_bind_path(container_path)
            # Said at start, not at the first write: a bind the sandbox user cannot write is often a
            # directory the user made as root for a non-root image.
            if (problem := _unwritable_bind(source, sandbox_ids)) is not None:
                logger.warning("bind %s -> %s: %s", source, target, problem)
            binds.append(f"{source}:{target}")
        host_config: dict[str, Any] = {
            "Binds": binds,
            "PortBindings": {
                f"{EXECUTOR_PORT}/tcp": [{"HostIp": self.host, "HostPort": _port_spec(self._executor_port)}],
                f"{RESOURCE_PORT}/tcp": [{"HostIp": self.host, "HostPort": _port_spec(self._resource_port)}],
            },
            # An init process reaps orphans that kernel code leaves behind.
            "Init": True,
            # No capabilities at all, for root images too: no raw sockets around the firewall, no
            # chown/setuid games; and no privilege gain through setuid binaries (none are left in
            # the image either). The firewall helper holds NET_ADMIN, never the sandbox.
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges:true"],
            "Ulimits": [{"Name": "nofile", "Soft": self._open_files_limit, "Hard": self._open_files_limit}],
            "Tmpfs": self._tmpfs(sandbox_ids, home),
            # Bounded logs: kernel output that reaches the container's stdout cannot fill the disk.
            "LogConfig": {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "2"}},
        }
        if self.network is not None:
            host_config["NetworkMode"] = self.network
        if self.dns:
            host_config["Dns"] = self.dns
        if self._memory_limit is not None:
            host_config["Memory"] = self._memory_limit
            host_config["MemorySwap"] = self._memory_limit
        if self._cpu_limit is not None:
            host_config["NanoCpus"] = int(self._cpu_limit * 1e9)
        if self._pids_limit is not None:
            host_config["PidsLimit"] = self._pids_limit
        labels = {**self.labels, **self._lifecycle_labels(), CONTAINER_LABEL: "true", VERSION_LABEL: __version__}
        if self.workspace is not None:
            # A named volume: `kill()`'s v=True removes anonymous volumes only, so the workspace stays.
            host_config["Mounts"] = [{"Type": "volume", "Source": self.workspace, "Target": str(APP_DIR)}]
            labels[WORKSPACE_LABEL] = self.workspace
        if self._self_ending:
            # The sandbox ends itself by its server exiting (ipybox_server.lifecycle); the engine removes it.
            host_config["AutoRemove"] = True
        return {
            "Image": self.tag,
            "Env": [f"{key}={value}" for key, value in self.env.items()]
            + [f"IPYBOX_MAX_KERNELS={self.max_kernels}"]
            + ([f"IPYBOX_ALLOWED_HOSTS={','.join(self.allowed_hosts)}"] if self.allowed_hosts else [])
            + self._lifecycle_env(),
            "ExposedPorts": {f"{EXECUTOR_PORT}/tcp": {}, f"{RESOURCE_PORT}/tcp": {}},
            "Labels": labels,
            "HostConfig": host_config,
        }

    def _tmpfs(self, sandbox_ids: tuple[int, int], home: str | None = None) -> dict[str, str]:
        uid, gid = sandbox_ids
        shared = f"rw,nosuid,nodev,mode=1777,size={self._tmp_size}"
        # Every directory the sandbox user can write outside the image's own directories is a capped
        # tmpfs (its pages count as the container's memory): /tmp, /var/tmp and /run/lock (world-writable
        # in Debian), the user's home ($HOME: uv/npm/pip caches, `uvx`/`npx` downloads; executable for
        # ~/.local/bin) and /app. Two exceptions: /run/ipybox, where the secret is handed over before the
        # start (security.md), and the user environment /opt/ipybox/user-venv, which the sandbox user
        # owns so that `pip install` works in a cell: it lives in the container's writable layer, on the
        # host's disk, not capped by these sizes (gone with the container).
        tmpfs = {"/tmp": shared, "/var/tmp": shared, "/run/lock": shared}
        if home and PurePosixPath(home) not in (PurePosixPath("/"), APP_DIR) and PurePosixPath(home).is_absolute():
            tmpfs[home] = f"rw,exec,nosuid,nodev,mode=0755,uid={uid},gid={gid},size={self._tmp_size}"
        if self._app_size is not None:
            # Owned by the sandbox user like the image's /app (0755). `exec` explicitly: Docker adds
            # noexec to every tmpfs, and users run scripts and build extensions in /app. Binds under
            # /app still work: Docker mounts by depth, so they land on top of this tmpfs.
            tmpfs[str(APP_DIR)] = f"rw,exec,nosuid,nodev,mode=0755,uid={uid},gid={gid},size={self._app_size}"
        return tmpfs

    async def _wait_until_ready(self) -> None:
        """Follow the container's stdout until the server prints its ready line.

        Following the log stream is a readiness signal without polling: it costs no retry interval
        and ends as soon as the line arrives, or when the container exits.
        """
        output: list[str] = []

        async def follow() -> bool:
            async for chunk in self._container.log(stdout=True, stderr=True, follow=True):
                output.append(chunk)
                if READY_LINE in "".join(output[-2:]):
                    return True
            return False

        try:
            ready = await asyncio.wait_for(follow(), self.startup_timeout)
        except TimeoutError:
            raise ContainerStartError(
                f"the servers did not become ready within startup_timeout={self.startup_timeout} s. "
                f"Output so far:\n{_tail(output)}",
                container_id=self._container.id,
                option="ExecutionContainer(startup_timeout=...)",
            ) from None
        if not ready:
            raise ContainerStartError(
                f"the container exited before its servers became ready. Output:\n{_tail(output)}",
                container_id=self._container.id,
            )

    async def _read_ports(self) -> None:
        deadline = time.monotonic() + self._port_allocation_timeout
        while True:
            info = await self._container.show()
            ports = (info.get("NetworkSettings") or {}).get("Ports") or {}
            executor = _published_port(ports, EXECUTOR_PORT)
            resource = _published_port(ports, RESOURCE_PORT)
            if executor is not None and resource is not None:
                self._executor_port, self._resource_port = executor, resource
                if not self.backend.direct_routes:
                    # Another machine's container (a swarm node's): its pid and its bridge address mean
                    # nothing here, and the address may be a container of this host's own bridge, which
                    # would receive the secret. Clients use the published ports only.
                    self._pid, self._server = 0, None
                    return
                pid = int((info.get("State") or {}).get("Pid") or 0)
                # Only a pid this process can check is worth keeping (a remote engine's means nothing here).
                self._pid = pid if pid and _tokens.container_runs(str(info.get("Id") or ""), pid) else 0
                self._server = _routes.record(
                    self.host,
                    {EXECUTOR_PORT: executor, RESOURCE_PORT: resource},
                    info,
                    {EXECUTOR_PORT: EXECUTOR_SOCKET, RESOURCE_PORT: RESOURCE_SOCKET},
                )
                return
            if time.monotonic() >= deadline:
                raise ContainerStartError(
                    f"host ports were not allocated within port_allocation_timeout={self._port_allocation_timeout} s",
                    container_id=self._container.id,
                    option="ExecutionContainer(port_allocation_timeout=...)",
                )
            await asyncio.sleep(0.05)


async def list_kernels(host: str, port: int, token: str | None = None) -> list[dict[str, Any]]:
    """The gateway's `GET /api/kernels` at host:port: one dict per kernel (id, name, last_activity,
    execution_state, connections)."""
    token = token or _tokens.lookup(host, port)
    headers = {"Authorization": f"token {token}"} if token else {}
    connector = _routes.published_connector(host, port, EXECUTOR_PORT)
    url = f"http://{host}:{port}/api/kernels"
    try:
        async with aiohttp.ClientSession(headers=headers, connector=connector, timeout=_KERNELS_TIMEOUT) as session:
            async with session.get(url) as response:
                if response.status >= 400:
                    hint = ""
                    if response.status == 403 and token:
                        # With a secret (a wrong one gets 401), the gateway answers 403 only to a listing
                        # it has switched off, as images built before kernel listing (issue 16) do.
                        hint = (
                            ": the sandbox's image predates kernel listing; rebuild it with `ipybox build` "
                            "and start a new sandbox"
                        )
                    raise ServerConnectionError(
                        f"listing the kernels at {url} failed: HTTP {response.status}{hint}", status=response.status
                    )
                body = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise ServerConnectionError(f"listing the kernels at {url} failed: {exc!r}") from exc
    return [kernel for kernel in body if isinstance(kernel, dict)] if isinstance(body, list) else []


def _dns_server(server: str) -> str:
    try:
        return str(ipaddress.ip_address(str(server).strip()))
    except ValueError:
        raise ValueError(f"dns entry {server!r} is not an IP address (e.g. dns=['192.0.2.53'])") from None


def _image_home(image: dict[str, Any]) -> str | None:
    """The image's $HOME (its sandbox user's home directory), if the image sets one."""
    for entry in (image.get("Config") or {}).get("Env") or []:
        name, _, value = str(entry).partition("=")
        if name == "HOME":
            return value or None
    return None


def _file_caps(
    memory_limit: int | None, tmp_size: int | str | _Derived, app_size: int | str | None | _Derived
) -> tuple[int, int | None]:
    """The tmpfs caps in bytes: explicit values as given, defaults derived from the memory limit.

    A quarter of the limit for tmp_size and a half for app_size, at most the fixed defaults: with the
    default limit of 4g that is exactly the fixed defaults, and with any limit the two fit within it.
    """
    if isinstance(tmp_size, _Derived):
        tmp = _DEFAULT_TMP_SIZE if memory_limit is None else min(_DEFAULT_TMP_SIZE, memory_limit // 4)
    else:
        parsed = parse_memory(tmp_size, "tmp_size")
        if parsed is None:
            raise ValueError("tmp_size cannot be None: /tmp is always a capped tmpfs; give a size like '1g'")
        tmp = parsed
    if isinstance(app_size, _Derived):
        app: int | None = _DEFAULT_APP_SIZE if memory_limit is None else min(_DEFAULT_APP_SIZE, memory_limit // 2)
    else:
        app = parse_memory(app_size, "app_size")
    return tmp, app


def _check_file_caps(memory_limit: int | None, tmp_size: int, app_size: int | None) -> None:
    """Warn when the tmpfs caps cannot be reached before the memory limit (their pages are memory).

    Once per configuration and process: a pool constructs a container for every sandbox it starts.
    """
    if memory_limit is None:
        return
    total = tmp_size + (app_size or 0)
    if total > memory_limit and (memory_limit, tmp_size, app_size) not in _warned_file_caps:
        _warned_file_caps.add((memory_limit, tmp_size, app_size))
        logger.warning(
            "app_size + tmp_size (%d MiB) exceed memory_limit (%d MiB): /app and /tmp are tmpfs whose "
            "contents count as the container's memory, so filling them ends in the kernel being killed "
            "for lack of memory before the size cap's ENOSPC; lower app_size/tmp_size or raise memory_limit",
            total // 2**20,
            memory_limit // 2**20,
        )


async def _settle(future: asyncio.Future[Any]) -> bool:
    """Wait until `future` is done, through any number of cancellations; True when one arrived.

    For work that must not be abandoned half-way (creating and removing a container): the caller
    raises CancelledError itself once the work is done and accounted for.
    """
    interrupted = False
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            interrupted = True
    return interrupted


async def _remove(container: Any, docker: aiodocker.Docker | None) -> None:
    try:
        if container is not None:
            try:
                async with asyncio.timeout(_REMOVE_TIMEOUT):
                    await container.delete(force=True, v=True)
            except aiodocker.DockerError as exc:
                # Already gone is what we want; 409 "removal already in progress": the engine's AutoRemove
                # of a sandbox that ended itself got there first.
                if exc.status != 404 and not _removal_in_progress(exc):
                    raise ContainerError(f"removing failed: {exc.message}", container_id=container.id) from exc
            except TimeoutError:
                raise ContainerError(
                    f"removing did not finish within {_REMOVE_TIMEOUT:.0f} s; the engine may still remove it, "
                    "else `ipybox cleanup` does",
                    container_id=container.id,
                ) from None
            except (aiohttp.ClientError, ConnectionError) as exc:
                raise ContainerError(
                    f"removing failed: the Docker engine does not answer ({exc}); `ipybox cleanup` removes it "
                    "once the engine is back",
                    container_id=container.id,
                ) from exc
    finally:
        if docker is not None:
            await docker.close()


@contextlib.asynccontextmanager
async def _workspace_lock(name: str) -> AsyncIterator[None]:
    """Held from a workspace's in-use check to its container's creation, by every process of this user on
    this machine (an flock on a file in the token directory). Starts from other users or machines
    sharing an engine are not covered: the engine offers no lock."""
    directory = _tokens.token_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(directory / f"workspace-{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        # flock locks belong to the open file description: two starts in one process exclude each other too.
        await asyncio.to_thread(fcntl.flock, descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _removal_in_progress(exc: aiodocker.DockerError) -> bool:
    return exc.status == 409 and "already in progress" in str(exc.message)


class _Lease:
    """An owner's hold on an owner-bound sandbox: a websocket to the resource server's `GET /lease`.

    Nothing is sent on it, so no task is needed and a blocked event loop does not lose it: it lives as
    socket state in the kernel, which closes it when the process dies however it dies. It is opened
    through the same verified routes as `ResourceClient` (the unix socket first, then the published port).
    """

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._session = session
        self._ws = ws

    @classmethod
    async def take(cls, host: str, port: int, token: str) -> _Lease:
        routes = [
            *_routes.direct_sessions(host, port, RESOURCE_PORT),
            (f"http://{host}:{port}", _routes.published_connector(host, port, RESOURCE_PORT), "published port"),
        ]
        last_error: BaseException | None = None
        for base_url, connector, route in routes:
            session = aiohttp.ClientSession(
                base_url,
                headers={"Authorization": f"token {token}"},
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=_LEASE_TIMEOUT),
            )
            try:
                async with asyncio.timeout(_LEASE_TIMEOUT):
                    ws = await session.ws_connect(
                        "/lease", heartbeat=None, autoping=False, timeout=aiohttp.ClientWSTimeout(ws_close=1.0)
                    )
                return cls(session, ws)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                logger.info("taking the owner lease via %s failed: %s", route, exc)
                last_error = exc
                await session.close()
            except BaseException:
                await session.close()
                raise
        raise ServerConnectionError(f"could not take the owner lease of the sandbox at {host}:{port}: {last_error}")

    async def release(self) -> None:
        # Closing the session closes the websocket's connection at once, without a close handshake that a
        # paused (frozen) server could not answer.
        await self._session.close()


def _port_spec(port: int | None) -> str:
    # An empty HostPort lets Docker pick a free port atomically (no race with other processes).
    return "" if port is None else str(port)


def _published_port(ports: dict[str, Any], container_port: int) -> int | None:
    bindings = ports.get(f"{container_port}/tcp") or []
    for binding in bindings:
        if binding.get("HostPort"):
            return int(binding["HostPort"])
    return None


def _container_bind_path(container_path: str) -> str:
    path = PurePosixPath(container_path)
    if path.is_absolute():
        raise ValueError(
            f"Container bind path {container_path!r} must be relative; it is mounted under /app "
            f"(use {str(path).lstrip('/')!r} for /app/{str(path).lstrip('/')})"
        )
    if ".." in path.parts or not path.parts or path == PurePosixPath("."):
        raise ValueError(f"Container bind path {container_path!r} must name a directory inside /app, without '..'")
    return str(APP_DIR / path)


def _host_bind_path(host_path: str, sandbox_ids: tuple[int, int]) -> str:
    path = Path(host_path).expanduser().resolve()
    if not path.exists():
        path.mkdir(parents=True)
        # ipybox made this directory, so it makes it writable for the sandbox user, whose UID may
        # differ from ours (e.g. we run as root and the image runs as 1000).
        if os.geteuid() == 0 and sandbox_ids != (0, 0):
            os.chown(path, *sandbox_ids)
    return str(path)


def _unwritable_bind(host_path: str, sandbox_ids: tuple[int, int]) -> str | None:
    """Why the sandbox user cannot write the bound directory (or file), with the fixes; None if it can.

    The sandbox holds no capability, root images included (no CAP_DAC_OVERRIDE): only the owner, group
    and other bits count. Supplementary groups and ACLs are not looked at.
    """
    try:
        info = os.stat(host_path)
    except OSError:
        return None
    uid, gid = sandbox_ids
    writable = (
        (info.st_uid == uid and info.st_mode & 0o200)
        or (info.st_gid == gid and info.st_mode & 0o020)
        or info.st_mode & 0o002
    )
    if writable:
        return None
    return (
        f"the sandbox user (uid {uid}, gid {gid}) cannot write it (owner {info.st_uid}:{info.st_gid}, mode "
        f"{info.st_mode & 0o7777:04o}), so a cell's write there fails with PermissionError. If the sandbox "
        f"should write there: `chown -R {uid}:{gid} {host_path}`, or use a root image (`ipybox build -r`) "
        "when the directory is root's; to share it read-only on purpose, nothing to do"
    )


def image_ids(image: dict[str, Any]) -> tuple[int, int]:
    """The sandbox user's uid and gid, from the labels `ipybox build` puts on the image (0, 0 without)."""
    labels = (image.get("Config") or {}).get("Labels") or {}
    return int(labels.get(UID_LABEL, "0")), int(labels.get(GID_LABEL, "0"))


def token_tar(token: str, sandbox_ids: tuple[int, int]) -> bytes:
    """A tar of the secret file (0400, the sandbox user's) for `put_archive` into `/run/ipybox`."""
    buffer = io.BytesIO()
    data = token.encode()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo(PurePosixPath(TOKEN_PATH).name)
        info.size = len(data)
        info.mode = 0o400
        info.uid, info.gid = sandbox_ids
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _tail(chunks: list[str], lines: int = 30) -> str:
    return "\n".join("".join(chunks).splitlines()[-lines:])
