"""The one place where Docker engine errors become ipybox errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import aiodocker
import aiohttp

from ipybox._errors import ContainerError, DockerUnavailableError

ENGINE_HINT = (
    "Start a Docker engine (on Debian as root: scripts/engine start; elsewhere install Docker Engine "
    "and start it) or point DOCKER_HOST at one."
)


def connect() -> aiodocker.Docker:
    """A client for the local Docker engine; raises DockerUnavailableError when none is configured."""
    try:
        return aiodocker.Docker()
    except ValueError as exc:  # aiodocker: no socket found and no DOCKER_HOST
        raise DockerUnavailableError(f"No Docker engine found. {ENGINE_HINT}") from exc


@contextmanager
def docker_errors(action: str, container_id: str | None = None) -> Iterator[None]:
    """Translate aiodocker/aiohttp failures during `action` into the ipybox error tree."""
    try:
        yield
    except aiodocker.DockerError as exc:
        raise ContainerError(f"{action} failed: {exc.message} (HTTP {exc.status})", container_id) from exc
    except (aiohttp.ClientConnectorError, FileNotFoundError, ConnectionRefusedError) as exc:
        raise DockerUnavailableError(f"{action} failed: the Docker engine does not answer. {ENGINE_HINT}") from exc
