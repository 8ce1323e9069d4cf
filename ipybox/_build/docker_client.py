"""The one place where aiodocker and connection errors become ipybox errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiodocker
import aiohttp

from .._errors import BuildError, DockerUnavailableError

_START_HINT = "Start Docker (or run `scripts/engine start`) and try again."


@asynccontextmanager
async def docker_client() -> AsyncIterator[aiodocker.Docker]:
    """Yields a Docker client that is closed on exit.

    Errors that escape the block are translated: an unreachable engine becomes
    `DockerUnavailableError`, any other Docker API error a `BuildError`. ipybox errors pass unchanged.
    """
    try:
        docker = aiodocker.Docker()
    except ValueError as exc:  # no DOCKER_HOST and no socket found
        raise DockerUnavailableError(f"No Docker engine found ({exc}). {_START_HINT}") from exc
    try:
        yield docker
    except aiodocker.DockerError as exc:
        if is_connection_error(exc):
            raise DockerUnavailableError(f"Cannot reach the Docker engine: {exc.message}. {_START_HINT}") from exc
        raise BuildError(f"Docker engine error: {exc.message}") from exc
    except (aiohttp.ClientError, ConnectionError) as exc:
        raise DockerUnavailableError(f"Lost the connection to the Docker engine: {exc}. {_START_HINT}") from exc
    finally:
        await docker.close()


def is_connection_error(exc: aiodocker.DockerError) -> bool:
    """aiodocker reports "cannot connect" as status 900."""
    return bool(exc.status == 900)
