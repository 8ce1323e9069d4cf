"""The one place where Docker engine errors become ipybox errors, and small engine look-ups."""

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


def is_connection_error(exc: aiodocker.DockerError) -> bool:
    """aiodocker reports "cannot connect to the engine" as a DockerError with status 900."""
    return bool(exc.status == 900)


@contextmanager
def docker_errors(
    action: str, container_id: str | None = None, error: type[ContainerError] = ContainerError
) -> Iterator[None]:
    """Translate aiodocker/aiohttp failures during `action` into the ipybox error tree (API errors
    into `error`, a ContainerError class)."""
    try:
        yield
    except aiodocker.DockerError as exc:
        if is_connection_error(exc):
            raise DockerUnavailableError(f"{action} failed: the Docker engine does not answer. {ENGINE_HINT}") from exc
        raise error(f"{action} failed: {exc.message} (HTTP {exc.status})", container_id) from exc
    except (aiohttp.ClientError, ConnectionError) as exc:
        raise DockerUnavailableError(f"{action} failed: the Docker engine does not answer. {ENGINE_HINT}") from exc


async def image_exists(docker: aiodocker.Docker, name: str) -> bool:
    """Whether the engine has an image of this name or id (no pull is attempted)."""
    try:
        await docker.images.inspect(name)
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            return False
        raise
    return True
