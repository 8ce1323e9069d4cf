"""Removes ipybox containers and the secrets recorded for them; a swarm's sandboxes (`clean_swarm`)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import aiodocker

from ipybox import _tokens
from ipybox._docker import connect, docker_errors
from ipybox._labels import CONTAINER_LABEL, EXPIRES_LABEL, OWNER_LABEL


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def process_start(pid: int) -> str:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22), or "" when unknown:
    with the boot id and pid it names one process, so a pid reused later is not taken for it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else ""


def owner_label(pid: int) -> str:
    """`boot id:pid:start time` of the owning process, for the owner label."""
    return f"{boot_id()}:{pid}:{process_start(pid)}"


def stale_reason(labels: dict[str, str], now: float, this_boot: str) -> str | None:
    """Why a sandbox is stale by its labels, or None: past its max lifetime (`expires`), or owner-bound and
    its owner gone. An owner is judged only when it ran on this machine since this boot (the label's boot
    id is this one); a live process with the owner's pid is the owner unless the label's start time
    (absent in labels of older versions) says it is another process that reused the pid."""
    expires = labels.get(EXPIRES_LABEL)
    if expires is not None:
        try:
            if float(expires) <= now:
                return "expired"
        except ValueError:
            pass
    owner = labels.get(OWNER_LABEL)
    if owner:
        boot, pid, start = (owner.split(":") + [""])[:3]
        if boot and boot == this_boot and pid.isdigit():
            if not _pid_runs(int(pid)):
                return "owner gone"
            if start and process_start(int(pid)) not in ("", start):
                return "owner gone (its pid now belongs to another process)"
    return None


async def remove_containers(ancestor: str | None = None, *, stale: bool = False) -> list[str]:
    """Force-remove ipybox containers and return their ids.

    Without `ancestor`, every container labelled as started by ipybox; with it, every container
    created from that image (labelled or not, e.g. left by an older ipybox). With `stale`, only those
    of them that `stale_reason` finds stale (paused or wedged ones that could not remove themselves).
    """
    docker = connect()
    try:
        with docker_errors("listing containers"):
            filters = {"ancestor": [ancestor]} if ancestor else {"label": [CONTAINER_LABEL]}
            found: dict[str, Any] = {
                container.id: container for container in await docker.containers.list(all=True, filters=filters)
            }
        if stale:
            now, this_boot = time.time(), boot_id()
            found = {
                container_id: container
                for container_id, container in found.items()
                if stale_reason(container["Labels"] or {}, now, this_boot) is not None
            }
        removed = []
        for container_id, container in found.items():
            try:
                await container.delete(force=True, v=True)
                removed.append(container_id)
            except aiodocker.DockerError as exc:
                # 409: an AutoRemove (a sandbox that ended itself) is removing it already.
                if exc.status != 404 and not (exc.status == 409 and "already in progress" in str(exc.message)):
                    raise
        with docker_errors("listing containers"):
            alive = {container.id for container in await docker.containers.list(all=True)}
        _tokens.remove_stale(alive)
        return removed
    finally:
        await docker.close()


async def clean_swarm(
    manager: str, node_engines: dict[str, str] | None = None, selector: list[str] | None = None, *, timeout: float = 30
) -> tuple[list[str], list[tuple[str, str]]]:
    """Remove every ipybox sandbox service of the swarm at `manager` (with all `selector` labels), then the
    leftover task containers on every node that is up; returns the services' names and `(node, container id)`
    of the containers. An unreachable manager raises `DockerUnavailableError` naming its URL."""
    import asyncio

    from ipybox._errors import DockerUnavailableError
    from ipybox._swarm import Swarm

    swarm = Swarm(manager, node_engines)
    try:
        async with asyncio.timeout(timeout):
            services = await swarm.remove_all(selector or ())
            # The nodes stop the removed services' tasks themselves; containers of those still running go
            # with them, stopped ones (a node that was down) are swept now.
            containers = await swarm.sweep(selector or ())
    except TimeoutError as exc:
        raise DockerUnavailableError(
            f"cleaning up the swarm at {manager} did not finish within {timeout} s: check that the manager's "
            "engine API answers there"
        ) from exc
    return services, containers
