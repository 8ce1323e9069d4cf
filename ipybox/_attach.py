"""`ipybox ps`: the sandboxes on this engine, with what a user needs to pick one to attach to.

One list call and one inspect per container; memory from the container's cgroup file (instant; the
engine's stats take 1-2 s per container); kernels and idle time from the gateway's kernel listing,
asked with the user-only secret of sandboxes this user started and only while they run unpaused (a
frozen gateway answers nothing).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipybox import _tokens
from ipybox._docker import connect, docker_errors
from ipybox._errors import IpyboxError
from ipybox._labels import CONTAINER_LABEL, EXECUTOR_PORT, HELPER_LABEL, RESOURCE_PORT
from ipybox._swarm import _hostname

if TYPE_CHECKING:
    from ipybox._swarm import Swarm
    from ipybox.backends import Backend

logger = logging.getLogger(__name__)
_PROC = Path("/proc")
_CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class SandboxInfo:
    """One row of `ipybox ps`. Times in seconds; None where unknown."""

    id: str
    name: str
    image: str
    state: str  # running | paused | exited | created ...
    age: float | None  # since the start
    idle: float | None  # since the newest kernel activity (None: paused, not ours, or no kernel)
    memory: int | None  # bytes in use (cgroup), None when not readable here
    kernels: int | None  # None: not asked (paused, not ours, unreachable)
    executor_port: int | None
    resource_port: int | None
    attachable: bool  # this user holds its secret
    node: str = ""  # the swarm node it runs on ("" on this engine)
    host: str = ""  # where its published ports are reached ("" : this machine)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def cgroup_memory(pid: int, proc: Path = _PROC, root: Path = _CGROUP_ROOT) -> int | None:
    """Bytes the cgroup of process `pid` uses: v1 `memory.usage_in_bytes`, v2 `memory.current`."""
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates: list[Path] = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        if "memory" in fields[1].split(","):
            candidates.insert(0, root / "memory" / fields[2].lstrip("/") / "memory.usage_in_bytes")
        elif fields[0] == "0" and fields[1] == "":
            candidates.append(root / fields[2].lstrip("/") / "memory.current")
    for path in candidates:
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def _since(iso: str | None, now: datetime) -> float | None:
    if not iso or iso.startswith("0001-"):
        return None
    try:
        # Docker writes nanoseconds; fromisoformat takes microseconds.
        text = iso.replace("Z", "+00:00")
        head, _, tail = text.partition(".")
        if tail:
            digits = "".join(ch for ch in tail if ch.isdigit())
            zone = tail[len(digits) :]
            text = f"{head}.{digits[:6]}{zone}"
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (now - moment).total_seconds())


def _port(info: dict[str, Any], container_port: int) -> tuple[str, int] | None:
    ports = (info.get("NetworkSettings") or {}).get("Ports") or {}
    for binding in ports.get(f"{container_port}/tcp") or []:
        if binding.get("HostPort"):
            return str(binding.get("HostIp") or "127.0.0.1"), int(binding["HostPort"])
    return None


async def _kernels(host: str, port: int, token: str, now: datetime) -> tuple[int, float | None] | None:
    from ipybox.container import list_kernels

    try:
        kernels = await list_kernels(host, port, token)
    except IpyboxError:
        return None
    idle = [_since(str(k.get("last_activity") or ""), now) for k in kernels]
    busy = any(k.get("execution_state") == "busy" for k in kernels)
    known = [value for value in idle if value is not None]
    return len(kernels), (0.0 if busy else min(known) if known else None)


async def _row(container: Any, now: datetime, node: str = "", node_address: str = "") -> SandboxInfo | None:
    """The row of one container; `node`/`node_address`: a swarm node's, whose published ports are reached
    at `node_address`."""
    info = await container.show()
    labels = (info.get("Config") or {}).get("Labels") or {}
    if HELPER_LABEL in labels:
        return None
    state = info.get("State") or {}
    container_id = str(info["Id"])
    status = "paused" if state.get("Paused") else str(state.get("Status") or "unknown")
    pid = int(state.get("Pid") or 0)
    executor, resource = _port(info, EXECUTOR_PORT), _port(info, RESOURCE_PORT)
    token = _tokens.container_token(container_id) if state.get("Running") else None
    kernels: int | None = None
    idle: float | None = None
    if token is not None and executor is not None and status == "running":
        host = node_address or (executor[0] if executor[0] not in ("0.0.0.0", "::") else "127.0.0.1")
        found = await _kernels(host, executor[1], token, now)
        if found is not None:
            kernels, idle = found
    return SandboxInfo(
        id=container_id,
        name=str(info.get("Name") or "").lstrip("/"),
        image=str((info.get("Config") or {}).get("Image") or ""),
        state=status,
        age=_since(state.get("StartedAt"), now) if state.get("Running") else None,
        idle=idle,
        # Only the pid of a container of this machine's engine names its process here: another engine's
        # (remote, or a swarm node's) would read some other process's cgroup.
        memory=cgroup_memory(pid) if pid and _tokens.container_runs(container_id, pid) else None,
        kernels=kernels,
        executor_port=executor[1] if executor else None,
        resource_port=resource[1] if resource else None,
        attachable=token is not None,
        node=node,
        host=node_address,
    )


async def list_sandboxes(all_states: bool = False) -> list[SandboxInfo]:
    """The ipybox sandboxes of this engine (running and paused; with `all_states`, stopped ones too),
    oldest first."""
    docker = connect()
    try:
        with docker_errors("listing sandboxes"):
            containers = await docker.containers.list(all=all_states, filters={"label": [CONTAINER_LABEL]})
            now = datetime.now(UTC)
            rows = await asyncio.gather(*(_row(container, now) for container in containers))
    finally:
        await docker.close()
    found = [row for row in rows if row is not None]
    found.sort(key=lambda row: -(row.age or 0.0))
    return found


async def list_swarm_sandboxes(swarm: Swarm, all_states: bool = False) -> list[SandboxInfo]:
    """The ipybox sandboxes of every node of `swarm` that is up, through each node's engine, oldest first."""
    nodes = await swarm.ready_nodes()
    now = datetime.now(UTC)

    async def of_node(node: Any) -> list[SandboxInfo | None]:
        hostname = _hostname(node)
        url = swarm._node_engine_url(node)
        docker = swarm._engine(url)
        try:
            with docker_errors(f"listing sandboxes on node {hostname!r} at {url}"):
                containers = await docker.containers.list(all=all_states, filters={"label": [CONTAINER_LABEL]})
                return await asyncio.gather(*(_row(c, now, hostname, swarm._node_address(node)) for c in containers))
        except IpyboxError as exc:  # one node's engine must not hide the others' sandboxes
            logger.warning("%s", exc)
            return []
        finally:
            await docker.close()

    per_node = await asyncio.gather(*(of_node(node) for node in nodes))
    found = [row for rows in per_node for row in rows if row is not None]
    found.sort(key=lambda row: -(row.age or 0.0))
    return found


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _size(size: int | None) -> str:
    if size is None:
        return "-"
    if size < 2**30:
        return f"{size / 2**20:.0f}MiB"
    return f"{size / 2**30:.1f}GiB"


def table(rows: list[SandboxInfo]) -> str:
    """`ipybox ps` as text: one line per sandbox under a header."""
    on_nodes = any(row.node for row in rows)
    header = ("ID", "NAME", "IMAGE", "AGE", "IDLE", "MEM", "STATE", "KERNELS") + (("NODE",) if on_nodes else ())
    lines = [header] + [
        (
            row.id[:12],
            row.name,
            row.image,
            _duration(row.age),
            _duration(row.idle),
            _size(row.memory),
            row.state,
            "-" if row.kernels is None else str(row.kernels),
        )
        + ((row.node,) if on_nodes else ())
        for row in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines
    )


async def set_paused(id_or_name: str, paused: bool, backend: Backend | None = None) -> str:
    """Pause or resume the sandbox `id_or_name` (`ipybox pause|resume`, on `backend`: default this
    engine); its full id."""
    from ipybox.container import ExecutionContainer

    container = await ExecutionContainer.attach(id_or_name, backend=backend)
    try:
        if paused:
            await container.pause()
        else:
            await container.resume()
        return container.container_id or id_or_name
    finally:
        await container.detach()
