"""Removes ipybox containers and the secrets recorded for them."""

from __future__ import annotations

from typing import Any

import aiodocker

from ipybox import _tokens
from ipybox._docker import connect, docker_errors
from ipybox._labels import CONTAINER_LABEL


async def remove_containers(ancestor: str | None = None) -> list[str]:
    """Force-remove ipybox containers and return their ids.

    Without `ancestor`, every container labelled as started by ipybox; with it, every container
    created from that image (labelled or not, e.g. left by an older ipybox).
    """
    docker = connect()
    try:
        with docker_errors("listing containers"):
            filters = {"ancestor": [ancestor]} if ancestor else {"label": [CONTAINER_LABEL]}
            found: dict[str, Any] = {
                container.id: container for container in await docker.containers.list(all=True, filters=filters)
            }
        removed = []
        for container_id, container in found.items():
            try:
                await container.delete(force=True, v=True)
                removed.append(container_id)
            except aiodocker.DockerError as exc:
                if exc.status != 404:
                    raise
        with docker_errors("listing containers"):
            alive = {container.id for container in await docker.containers.list(all=True)}
        _tokens.remove_stale(alive)
        return removed
    finally:
        await docker.close()
