"""Docker access for the build: engine errors become build errors (see ipybox/_docker.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiodocker
import aiohttp

from .._docker import ENGINE_HINT, connect, is_connection_error
from .._errors import BuildError, DockerUnavailableError


@asynccontextmanager
async def docker_client() -> AsyncIterator[aiodocker.Docker]:
    """Yields a Docker client that is closed on exit.

    Errors that escape the block are translated: an unreachable engine becomes
    `DockerUnavailableError`, any other Docker API error a `BuildError`. ipybox errors pass unchanged.
    """
    docker = connect()
    try:
        yield docker
    except aiodocker.DockerError as exc:
        if is_connection_error(exc):
            raise DockerUnavailableError(f"Cannot reach the Docker engine: {exc.message}. {ENGINE_HINT}") from exc
        raise BuildError(f"Docker engine error: {exc.message}") from exc
    except (aiohttp.ClientError, ConnectionError) as exc:
        raise DockerUnavailableError(f"Lost the connection to the Docker engine: {exc}. {ENGINE_HINT}") from exc
    finally:
        await docker.close()

