"""Snapshots of a sandbox: its files and its kernels' namespaces, on the host; restore and fork from them.

A snapshot is a directory on the host (`Snapshot`): `/app` as a tar (binds under `/app` left out: they
are host directories, mounted again by the restore's own `binds`) and, for each kernel, one pickle of its
user namespace (variables, functions, classes, instances; modules by name), made in the kernel with the
image's own cloudpickle. What could not be captured is named with the reason (`Snapshot.kernels[i].skipped`:
generators, sockets, threads, open files, locks, anything that refuses to pickle). Processes, threads and
the user venv's installs are not part of a snapshot.

**Trust boundary.** A pickle is a program for the unpickler. The host never unpickles a snapshot: the
pickles are loaded only by the kernel of the new sandbox, so restoring runs the snapshot's own code there,
with the restore's options (its binds, its env with its secrets, its network). Restore only snapshots
made by you, into options you would give that code. Every snapshot is sealed with an HMAC-SHA256 of its
manifest (which holds every file's size and SHA-256) under a per-user key (`~/.config/ipybox/snapshot.key`,
0600, or `IPYBOX_SNAPSHOT_KEY_FILE`); a restore checks the seal and every file before anything of the
snapshot reaches a sandbox, and hashes again what it uploads before the namespace is loaded. A snapshot
that was truncated, changed, or sealed with another key raises `SnapshotError` and runs nothing. Env
values are never written into a snapshot (only their names).

Example:
    ```python
    async with ExecutionContainer() as container:
        async with ExecutionClient(port=container.executor_port) as client:
            await client.execute("import pandas as pd; df = pd.DataFrame({'a': [1, 2]})")
            snap = await snapshot(container, clients=[client])
    async with await restore(snap) as sandbox:
        print((await sandbox.client.execute("print(df.a.sum())")).text)  # 3
    ```
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from ipybox import _snapshot_format as fmt
from ipybox import _wire
from ipybox._errors import IpyboxError, SnapshotError
from ipybox._version import __version__
from ipybox.container import APP_DIR, ExecutionContainer
from ipybox.executor import ExecutionClient
from ipybox.pool import Sandbox, _client_host, start_sandbox
from ipybox.resource._files import _NO_COMPRESSION, _READ_BUFSIZE, _url
from ipybox.resource._http import Link, raise_for_response, transfer
from ipybox.resource._mcp import check_server_params
from ipybox.resource.client import ResourceClient

logger = logging.getLogger(__name__)

_TEMP_PREFIX = ".ipybox-snapshot-"
_MAX_REPLY = 16 << 20
_NAMESPACE = '__import__("ipybox_server.namespace").namespace'
_OPTIONS = ("memory_limit", "cpu_limit", "pids_limit", "open_files_limit", "tmp_size", "app_size", "max_kernels")


@dataclasses.dataclass(frozen=True)
class KernelReport:
    """What a snapshot holds of one kernel's namespace.

    Attributes:
        captured: Names of the values in the pickle.
        modules: Modules by the name they had (`{"pd": "pandas"}`), imported again on restore.
        skipped: Names left out, each with the reason (e.g. `"socket: an open connection cannot be captured"`).
        distributions: `{name: version}` of the installed distributions whose modules the kernel had
            imported; a restore that misses one names it (`pip install name==version`).
    """

    captured: list[str]
    modules: dict[str, str]
    skipped: dict[str, str]
    distributions: dict[str, str] = dataclasses.field(default_factory=dict)


class Snapshot:
    """A snapshot on disk, its manifest verified (`Snapshot.load`). Made by `snapshot()`.

    Attributes:
        path: The snapshot's directory.
        id: Its name (the directory's name when made with the default path).
        created: When it was made (ISO 8601, UTC).
        image: `{"tag": ..., "id": ...}` of the sandbox it was made from; a restore uses that image.
        kernels: One `KernelReport` per kernel, in the order of the clients.
        mcp_servers: Names of the MCP servers registered in the sandbox (by `generate_mcp_sources`). Their
            params are not in the snapshot (they may hold secrets): a restore registers them again from
            its `mcp_servers` argument.
        size: Bytes of its files.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self._manifest = manifest
        self.id = str(manifest.get("id", path.name))
        self.created = str(manifest.get("created", ""))
        self.image: dict[str, str] = dict(manifest.get("image", {}))
        self.kernels = [
            KernelReport(
                list(k.get("captured", [])),
                dict(k.get("modules", {})),
                dict(k.get("skipped", {})),
                dict(k.get("distributions", {})),
            )
            for k in manifest.get("kernels", [])
        ]
        self.mcp_servers: list[str] = [str(name) for name in manifest.get("mcp_servers", [])]
        self.size = sum(int(meta["size"]) for meta in manifest.get("files", {}).values())

    @classmethod
    def load(cls, path: str | Path) -> Snapshot:
        """Open the snapshot at `path`, checking its seal and its files' sizes (not yet their contents).

        Raises:
            SnapshotError: Missing, incomplete, truncated, tampered with, or sealed with another key.
        """
        path = Path(path)
        return cls(path, fmt.verify_manifest(path))

    @property
    def skipped(self) -> dict[str, str]:
        """What was not captured and why, of every kernel (`"name"`; `"name (kernel 1)"` past the first)."""
        merged: dict[str, str] = {}
        for index, kernel in enumerate(self.kernels):
            for name, why in kernel.skipped.items():
                merged[name if index == 0 else f"{name} (kernel {index})"] = why
        return merged

    async def restore(self, *, timeout: float = 60, **container_options: Any) -> Sandbox:
        """`restore(self, ...)`: a new sandbox from this snapshot."""
        return await restore(self, timeout=timeout, **container_options)

    async def fork(self, n: int, *, timeout: float = 60, **container_options: Any) -> list[Sandbox]:
        """`fork(self, n, ...)`: `n` independent new sandboxes from this snapshot."""
        return await fork(self, n, timeout=timeout, **container_options)

    def delete(self) -> None:
        """Remove the snapshot's directory."""
        shutil.rmtree(self.path, ignore_errors=True)

    def __repr__(self) -> str:
        return f"Snapshot({str(self.path)!r}, kernels={len(self.kernels)}, size={self.size})"


def list_snapshots(directory: str | Path | None = None) -> list[Snapshot]:
    """The snapshots in `directory` (default `~/.local/share/ipybox/snapshots`) that verify, oldest first.

    Unfinished ones (`*.partial-*`) and ones that fail their check are left out (logged).
    """
    root = Path(directory) if directory is not None else fmt.default_directory()
    found = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if fmt.PARTIAL in path.name or not (path / fmt.MANIFEST).exists():
            continue
        try:
            found.append(Snapshot.load(path))
        except SnapshotError as exc:
            logger.warning("skipping %s: %s", path, exc)
    return sorted(found, key=lambda s: s.created)


async def snapshot(
    source: ExecutionContainer | Sandbox,
    path: str | Path | None = None,
    *,
    clients: Sequence[ExecutionClient] | None = None,
    timeout: float = 60,
) -> Snapshot:
    """Snapshot a running sandbox: its `/app` and the namespace of each client's kernel.

    Each kernel is captured by a silent request on a connection of the snapshot's own (no execution
    count, no history, nothing in the clients' results); it queues behind a cell that is running. A
    paused sandbox is resumed for the snapshot and paused again. The
    namespaces are captured first, then `/app` is read: a cell or a background thread running meanwhile
    can change files in between (nothing is stopped).

    Args:
        source: The sandbox: an `ExecutionContainer` (then pass `clients`) or a pool's `Sandbox`.
        path: The snapshot's directory, which must not exist (default: a new one under
            `~/.local/share/ipybox/snapshots/`).
        clients: Connected clients whose kernels to capture, in the order a restore recreates them.
            Default: a `Sandbox`'s clients; for a container, every kernel it runs
            (`ExecutionContainer.kernel_ids()`, oldest first). `[]`: files only.
        timeout: Seconds for the whole snapshot, waiting behind a running cell included.

    Returns:
        The `Snapshot`; `snapshot.kernels[i].skipped` names what was not captured and why.

    Raises:
        SnapshotError: A kernel failed to capture (the message names the exception; a full `/app`
            gives `OSError: No space left`: the pickle is written there first), or `timeout` passed.
        IpyboxError: The sandbox could not be reached.
    """
    container, kernels = _source(source, clients)
    if container.container_id is None:
        raise SnapshotError("the container is not running: nothing to snapshot")
    paused = container.paused
    if paused:
        await container.resume()  # the kernels and the resource server must run to be read
    try:
        async with _kernel_clients(
            container, kernels, isinstance(source, ExecutionContainer) and clients is None
        ) as found:
            return await _snapshot(container, found, path, timeout)
    finally:
        if paused:
            await container.pause()


@contextlib.asynccontextmanager
async def _kernel_clients(
    container: ExecutionContainer, clients: list[ExecutionClient], find: bool
) -> AsyncIterator[list[ExecutionClient]]:
    """`clients`, or (`find`) clients of our own for every kernel the gateway runs, left running after."""
    if not find:
        yield clients
        return
    found: list[ExecutionClient] = []
    try:
        for kernel_id in await container.kernel_ids():
            client = ExecutionClient(
                port=container.executor_port, host=_client_host(container.host), kernel_id=kernel_id
            )
            await client.connect()
            found.append(client)
        yield found
    finally:
        await asyncio.gather(*(client.disconnect(shutdown=False) for client in found), return_exceptions=True)


async def _snapshot(
    container: ExecutionContainer, kernels: list[ExecutionClient], path: str | Path | None, timeout: float
) -> Snapshot:
    created = datetime.now(UTC)
    snap_id = f"{created:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
    final = Path(path) if path is not None else fmt.default_directory() / snap_id
    partial = await asyncio.to_thread(fmt.new_partial, final)
    temp = _TEMP_PREFIX + secrets.token_hex(6)
    try:
        async with asyncio.timeout(timeout):
            manifest = await _capture(container, kernels, partial, temp, time.time() + timeout)
        manifest.update(
            {
                "format": fmt.FORMAT,
                "id": final.name,
                "created": created.isoformat(),
                "ipybox": __version__,
                "image": {"tag": container.tag, "id": container._image_id or ""},
                "options": await _container_options(container),
                "env_names": sorted(container.env),
            }
        )
        manifest = await asyncio.to_thread(fmt.seal, partial, final, manifest)
    except TimeoutError:
        raise SnapshotError(
            f"the snapshot did not finish within timeout={timeout} s (a running cell delays it)",
            container_id=container.container_id,
            option="snapshot(timeout=...)",
        ) from None
    finally:
        await asyncio.to_thread(shutil.rmtree, partial, True)
    return Snapshot(final, manifest)


async def restore(
    snapshot: Snapshot | str | Path,
    *,
    timeout: float = 60,
    mcp_servers: Mapping[str, dict[str, Any]] | None = None,
    **container_options: Any,
) -> Sandbox:
    """Start a new sandbox from a snapshot: its files in `/app`, one kernel per captured kernel.

    The sandbox gets the snapshot's image (by id: another image under the same tag is refused unless
    `tag=` is given explicitly) and its limits; `container_options` (as `ExecutionContainer` takes them:
    `binds`, `env`, `network`, limits, ...) are added or override. Env values and binds are never in a
    snapshot: pass them again. The snapshot is verified completely before anything of it reaches the
    sandbox (its seal and every file's checksum, checked while the container starts).

    Args:
        snapshot: A `Snapshot` or the path of one.
        timeout: Seconds the kernels may take to load their namespaces.
        mcp_servers: `{name: server_params}` registered in the new sandbox before its kernels load, so
            that the snapshot's generated MCP packages can call their servers (`Snapshot.mcp_servers`
            names the ones its sandbox had; params are never stored in a snapshot).
        **container_options: Options for the new `ExecutionContainer`, and `firewall` (a list of
            allowed destinations, as `SandboxPool` takes it) applied before anything is restored.
            A `memory_limit` given here also re-derives `tmp_size`/`app_size` unless they are given.

    Returns:
        A running `Sandbox` (`sandbox.clients`: one connected client per kernel, in snapshot order;
        `sandbox.client` is the first). The caller closes it.

    Raises:
        SnapshotError: The snapshot is missing, truncated or tampered with, sealed with another key, of
            another image, or a namespace failed to load (e.g. a module the image lacks). The sandbox
            is removed first.
        IpyboxError: The sandbox could not be started.
    """
    snap = _loaded(snapshot)
    servers = _checked_servers(mcp_servers)
    return (await _restore_fresh(snap, 1, timeout, container_options, servers))[0]


async def fork(
    source: Snapshot | str | Path | ExecutionContainer | Sandbox,
    n: int,
    *,
    clients: Sequence[ExecutionClient] | None = None,
    timeout: float = 60,
    mcp_servers: Mapping[str, dict[str, Any]] | None = None,
    **container_options: Any,
) -> list[Sandbox]:
    """`n` independent sandboxes restored from one snapshot, started concurrently.

    From a running sandbox (`ExecutionContainer` with `clients`, or a `Sandbox`), a snapshot is taken
    into a temporary directory first and deleted afterwards. Each fork has its own container, files and
    kernels: nothing is shared. For forks in milliseconds of container start, use `SandboxPool.fork`.

    Raises:
        SnapshotError, IpyboxError: As `snapshot()` and `restore()`; every fork already started is removed.
        ValueError: `n` is below 1.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    servers = _checked_servers(mcp_servers)
    if isinstance(source, ExecutionContainer | Sandbox):
        work = await asyncio.to_thread(_temp_directory)
        try:
            snap = await snapshot(source, work / "snapshot", clients=clients, timeout=timeout)
            return await _restore_fresh(snap, n, timeout, container_options, servers)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
    return await _restore_fresh(_loaded(source), n, timeout, container_options, servers)


# -- capture ---------------------------------------------------------------------------------------------


def _source(
    source: ExecutionContainer | Sandbox, clients: Sequence[ExecutionClient] | None
) -> tuple[ExecutionContainer, list[ExecutionClient]]:
    if isinstance(source, Sandbox):
        return source.container, list(source.clients if clients is None else clients)
    return source, list(clients or [])


async def _container_options(container: ExecutionContainer) -> dict[str, Any]:
    """The limits the container really runs with: from the engine (an attached container's object only
    has defaults), else from the object."""
    options: dict[str, Any] = {
        "memory_limit": container._memory_limit,
        "cpu_limit": container._cpu_limit,
        "pids_limit": container._pids_limit,
        "open_files_limit": container._open_files_limit,
        "tmp_size": container._tmp_size,
        "app_size": container._app_size,
        "max_kernels": container.max_kernels,
    }
    try:
        info = await container._container.show()
    except Exception as exc:  # the object's view is the fallback
        logger.debug("inspecting %s for its limits failed: %s", container.container_id, exc)
        return options
    host = info.get("HostConfig") or {}
    options["memory_limit"] = host.get("Memory") or None
    options["cpu_limit"] = (host.get("NanoCpus") or 0) / 1e9 or None
    options["pids_limit"] = host.get("PidsLimit") if (host.get("PidsLimit") or 0) > 0 else None
    for limit in host.get("Ulimits") or []:
        if limit.get("Name") == "nofile":
            options["open_files_limit"] = limit.get("Soft")
    tmpfs = host.get("Tmpfs") or {}
    options["tmp_size"] = _tmpfs_size(tmpfs.get("/tmp")) or options["tmp_size"]
    options["app_size"] = _tmpfs_size(tmpfs.get(str(APP_DIR)))
    for entry in (info.get("Config") or {}).get("Env") or []:
        name, _, value = str(entry).partition("=")
        if name == "IPYBOX_MAX_KERNELS" and value.isdigit():
            options["max_kernels"] = int(value)
    return options


def _tmpfs_size(mount_options: str | None) -> int | None:
    for option in (mount_options or "").split(","):
        name, _, value = option.partition("=")
        if name == "size" and value.isdigit():
            return int(value)
    return None


async def _capture(
    container: ExecutionContainer, clients: list[ExecutionClient], partial: Path, temp: str, not_after: float
) -> dict[str, Any]:
    reports = []
    async with _resources(container) as link:
        try:
            for index, client in enumerate(clients):
                target = str(APP_DIR / temp / f"{index}.pkl")
                code = f"{_NAMESPACE}.capture({target!r}, {not_after!r})"
                reports.append(await _silent(client, code))
                await _download(link, f"files/{temp}/{index}.pkl", partial / "kernels" / f"{index}.pkl")
            query = [("exclude_mounts", "true"), ("exclude", temp)]
            await _download(link, "directories/", partial / fmt.FILES, query)
            servers = await _registered_servers(link)
        finally:
            if clients:
                with contextlib.suppress(IpyboxError, OSError, TimeoutError):
                    # Not waited for long: queued behind a running cell, it still runs once that ends.
                    await asyncio.wait_for(_silent(clients[0], f"{_NAMESPACE}.discard({str(APP_DIR / temp)!r})"), 2)
    kernels = [
        {
            "file": f"kernels/{index}.pkl",
            "captured": report.get("captured", []),
            "modules": report.get("modules", {}),
            "distributions": report.get("distributions", {}),
            "skipped": report.get("skipped", {}),
            "python": report.get("python", ""),
            "cloudpickle": report.get("cloudpickle", ""),
            "execution_count": report.get("execution_count", 0),
        }
        for index, report in enumerate(reports)
    ]
    return {"kernels": kernels, "mcp_servers": servers}


async def _registered_servers(link: Link) -> list[str]:
    """Names of the MCP servers registered in the sandbox itself (a ToolHost's are the host's to offer)."""
    action = "listing the sandbox's MCP servers"
    async with transfer(link, action):
        async with link.session.get("/tools/servers") as response:
            if response.status == 404:  # an image without the tool service
                return []
            await raise_for_response(response, action)
            servers = (await response.json()).get("servers", {})
    return sorted(name for name, info in servers.items() if info.get("where") == "sandbox")


async def _download(link: Link, path: str, dest: Path, query: list[tuple[str, str]] | None = None) -> None:
    kind, _, relpath = path.partition("/")
    action = f"snapshot download of {path!r}"
    async with transfer(link, action):
        async with link.session.get(
            _url(kind, relpath), params=query, headers=_NO_COMPRESSION, read_bufsize=_READ_BUFSIZE
        ) as response:
            await raise_for_response(response, action)
            file = await asyncio.to_thread(dest.open, "wb")
            try:
                async for chunk in response.content.iter_chunked(fmt._CHUNK):
                    await asyncio.to_thread(file.write, chunk)
            finally:
                await asyncio.to_thread(file.close)


# -- restore ---------------------------------------------------------------------------------------------


def _loaded(snapshot: Snapshot | str | Path) -> Snapshot:
    return snapshot if isinstance(snapshot, Snapshot) else Snapshot.load(snapshot)


def _temp_directory() -> Path:
    root = fmt.default_directory()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    work = root / f"fork{fmt.PARTIAL}{secrets.token_hex(6)}"
    work.mkdir(mode=0o700)
    return work


def _restore_options(snap: Snapshot, options: dict[str, Any]) -> dict[str, Any]:
    recorded = dict(snap._manifest.get("options", {}))
    if "memory_limit" in options:
        # The recorded caps may have been derived from the old limit: derive them from the new one.
        for name in ("tmp_size", "app_size"):
            recorded.pop(name, None)
    merged: dict[str, Any] = {name: recorded[name] for name in _OPTIONS if name in recorded}
    merged["tag"] = snap.image.get("tag") or merged.get("tag")
    merged.update(options)
    return merged


async def _restore_fresh(
    snap: Snapshot, n: int, timeout: float, options: dict[str, Any], servers: dict[str, dict[str, Any]]
) -> list[Sandbox]:
    opts = _restore_options(snap, options)
    firewall = opts.pop("firewall", None)
    verifying = asyncio.ensure_future(asyncio.to_thread(fmt.verify_files, snap.path, snap._manifest))
    starting = [asyncio.ensure_future(_start(opts, firewall, len(snap.kernels))) for _ in range(n)]
    sandboxes: list[Sandbox] = []
    try:
        await verifying
        for task in starting:
            sandboxes.append(await task)
        await asyncio.gather(*(_load_into(s, snap, timeout, "tag" in options, servers) for s in sandboxes))
    except BaseException:
        verifying.cancel()
        for task in starting:
            task.cancel()
        results = await asyncio.gather(*starting, return_exceptions=True)
        await asyncio.gather(*(s.close() for s in results if isinstance(s, Sandbox)), return_exceptions=True)
        raise
    return sandboxes


async def _start(options: dict[str, Any], firewall: list[str] | None, kernels: int) -> Sandbox:
    sandbox = await start_sandbox(options, firewall)
    try:
        await _add_clients(sandbox, kernels)
    except BaseException:
        await sandbox.close()
        raise
    return sandbox


async def _add_clients(sandbox: Sandbox, kernels: int) -> None:
    """Connect clients to the sandbox until it has one per kernel of the snapshot."""
    container = sandbox.container
    while len(sandbox.clients) < kernels:
        client = ExecutionClient(
            port=container.executor_port, host=_client_host(container.host), **sandbox._client_options
        )
        await client.connect()
        sandbox._extra_clients.append(client)


async def _load_into(
    sandbox: Sandbox,
    snap: Snapshot,
    timeout: float,
    any_image: bool = False,
    servers: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Put the snapshot into a running sandbox: `/app`'s files, the MCP `servers`' registrations, then
    each kernel's namespace.

    Every file is hashed while it is uploaded and checked before any namespace is loaded. Used by
    `restore`, `fork` and `SandboxPool.restore`/`fork`, which verified the snapshot already.
    """
    manifest = snap._manifest
    container = sandbox.container
    image = snap.image.get("id")
    if not any_image and image and container._image_id and container._image_id != image:
        raise SnapshotError(
            f"{snap.path} was made in image {image[:19]} ({snap.image.get('tag')}), this sandbox runs "
            f"{container._image_id[:19]}: its pickles may not load there. Rebuild or pull that image, or pass "
            "tag=... to restore into another image on purpose",
            container_id=container.container_id,
            option="restore(tag=...)",
        )
    await _add_clients(sandbox, len(snap.kernels))
    temp = _TEMP_PREFIX + secrets.token_hex(6)
    async with _resources(container) as link:
        uploads = [(fmt.HashedFile(snap.path, fmt.FILES, manifest), "directories/", "application/x-tar")]
        for index, kernel in enumerate(manifest.get("kernels", [])):
            uploads.append(
                (
                    fmt.HashedFile(snap.path, kernel["file"], manifest),
                    f"files/{temp}-{index}/namespace.pkl",
                    "application/octet-stream",
                )
            )
        for file, target, content_type in uploads:
            await _upload(link, file, target, content_type)
        for file, _, _ in uploads:
            file.check()  # nothing is loaded unless every byte sent is the snapshot's
        await _register_servers(link, servers or {})
    missing = sorted(set(snap.mcp_servers) - set(servers or {}))
    if missing:
        logger.warning(
            "the snapshot's sandbox had the MCP servers %s registered; their params are not in a snapshot, so "
            "their packages' calls fail until they are registered again: restore(..., mcp_servers={name: params})",
            ", ".join(missing),
        )
    async with asyncio.timeout(timeout):
        await asyncio.gather(
            *(
                _silent(
                    client,
                    # A directory per kernel: each load removes its own when done.
                    f"{_NAMESPACE}.restore({str(APP_DIR / f'{temp}-{index}' / 'namespace.pkl')!r}, "
                    f"{json.dumps(kernel.get('modules', {})).encode().hex()!r}"
                    # Only when recorded: a snapshot of an older image restores with that image's two-argument form.
                    + (
                        f", {json.dumps(kernel['distributions']).encode().hex()!r})"
                        if kernel.get("distributions")
                        else ")"
                    ),
                )
                for index, (client, kernel) in enumerate(
                    zip(sandbox.clients, manifest.get("kernels", []), strict=False)
                )
            )
        )


def _checked_servers(mcp_servers: Mapping[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """The restore's `mcp_servers`, each checked as `generate_mcp_sources` checks params: before any start."""
    if mcp_servers is None:
        return {}
    if not isinstance(mcp_servers, Mapping):
        raise TypeError("mcp_servers must be a mapping of server name to server params")
    return {str(name): check_server_params(params, f"mcp_servers[{name!r}]") for name, params in mcp_servers.items()}


async def _register_servers(link: Link, servers: dict[str, dict[str, Any]]) -> None:
    for name, params in servers.items():
        action = f"registering the MCP server {name!r}"
        async with transfer(link, action):
            async with link.session.put(f"/tools/servers/{quote(name, safe='')}", json=params) as response:
                await raise_for_response(response, action)


async def _upload(link: Link, file: fmt.HashedFile, target: str, content_type: str) -> None:
    kind, _, relpath = target.partition("/")
    action = f"snapshot upload of {file.name}"

    async def body() -> AsyncIterator[bytes]:
        chunks = file.chunks()
        try:
            while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                yield chunk
        finally:
            await asyncio.to_thread(chunks.close)

    headers = {"Content-Type": content_type}
    if kind == "files":
        headers["Content-Length"] = str(file.size)
    async with transfer(link, action) as watch:
        async with link.session.put(_url(kind, relpath), data=watch.body(body()), headers=headers) as response:
            await raise_for_response(response, action)


# -- the snapshot's own connections ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _resources(container: ExecutionContainer) -> AsyncIterator[Link]:
    async with ResourceClient(port=container.resource_port, host=_client_host(container.host)) as resources:
        yield resources._connected()


async def _silent(client: ExecutionClient, code: str) -> dict[str, Any]:
    """Run `code` as a silent request on a websocket of our own to the client's kernel; the report it left.

    Silent: no execution count, no history, no execute_input; the client's own router drops the output
    of a request that is not its own. The report comes back as a user expression (hex of JSON).
    """
    transport = client._transport_or_raise()
    session, kernel_id = transport._session, transport.kernel_id
    assert session is not None and kernel_id is not None
    try:
        ws = await session.ws_connect(
            f"/api/kernels/{kernel_id}/channels",
            params={"session_id": uuid.uuid4().hex},
            max_msg_size=_MAX_REPLY,
            protocols=(_wire.V1_PROTOCOL,),
        )
    except aiohttp.ClientError as exc:
        raise SnapshotError(f"connecting to kernel {kernel_id} failed: {exc}", kernel_id=kernel_id) from exc
    try:
        v1 = ws.protocol == _wire.V1_PROTOCOL
        msg_id = uuid.uuid4().hex
        request = {
            "header": {
                "msg_id": msg_id,
                "msg_type": "execute_request",
                "username": "ipybox",
                "session": uuid.uuid4().hex,
                "date": datetime.now(UTC).isoformat(),
                "version": "5.3",
            },
            "parent_header": {},
            "metadata": {},
            "content": {
                "code": code,
                "silent": True,
                "store_history": False,
                "user_expressions": {"report": f"{_NAMESPACE}.report()"},
                "allow_stdin": False,
                "stop_on_error": False,
            },
        }
        await (
            ws.send_bytes(_wire.encode_v1("shell", request)) if v1 else ws.send_str(_wire.encode_json("shell", request))
        )
        content = await _reply(ws, msg_id)
    finally:
        await ws.close()
    if content.get("status") != "ok":
        raise SnapshotError(
            f"kernel {kernel_id}: {content.get('ename', 'error')}: {str(content.get('evalue', ''))[:2000]}",
            kernel_id=kernel_id,
        )
    expression = (content.get("user_expressions") or {}).get("report") or {}
    text = str((expression.get("data") or {}).get("text/plain", "")).strip("'\"")
    try:
        report = json.loads(bytes.fromhex(text))
    except ValueError as exc:
        raise SnapshotError(
            f"kernel {kernel_id} sent no readable report: {expression!r:.300}", kernel_id=kernel_id
        ) from exc
    return report if isinstance(report, dict) else {}


async def _reply(ws: aiohttp.ClientWebSocketResponse, msg_id: str) -> dict[str, Any]:
    async for frame in ws:
        if frame.type is aiohttp.WSMsgType.BINARY:
            channel, parts = _wire.split_v1(frame.data)
            if channel != "shell":
                continue
            message = _wire.parse_v1(channel, parts)
        elif frame.type is aiohttp.WSMsgType.TEXT:
            message = _wire.decode_json(frame.data)
        else:
            break
        if (
            message.get("parent_header", {}).get("msg_id") == msg_id
            and message.get("msg_type", (message.get("header") or {}).get("msg_type")) == "execute_reply"
        ):
            return dict(message.get("content") or {})
    raise SnapshotError("the connection to the kernel closed before it answered the snapshot's request")
