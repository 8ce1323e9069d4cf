"""The one place where Docker engine errors become ipybox errors, and small engine look-ups."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

import aiodocker
import aiohttp

from ipybox._errors import ContainerError, DockerUnavailableError

ENGINE_HINT = (
    "Start a Docker engine (on Debian as root: scripts/engine start; elsewhere install Docker Engine "
    "and start it) or point DOCKER_HOST at one."
)


class _Engine(aiodocker.Docker):
    """aiodocker's client, telling an endpoint that is no Docker engine from an engine's answers.

    aiodocker asks `GET /version` before its first request (for the API version), and reports what goes
    wrong there like any API error: to a web server that answers 404 to everything, a missing image
    looked like one that "could not be pulled". An engine always answers `/version`, so a failure there
    (other than a refused connection) means the endpoint is something else. The check rides on a request
    that is made anyway: it costs nothing.
    """

    async def _check_version(self) -> None:
        try:
            await super()._check_version()
        except aiodocker.DockerError as exc:
            if is_connection_error(exc):
                raise
            raise DockerUnavailableError(
                self._not_an_engine(f"GET /version answered HTTP {exc.status} ({_short(exc.message)})")
            ) from exc
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:  # an answer, but not an engine's
            raise DockerUnavailableError(
                self._not_an_engine(f"its answer to GET /version is not a Docker engine's ({exc!r})")
            ) from exc

    def _not_an_engine(self, detail: str) -> str:
        endpoint = str(getattr(self, "_connection_info", None) or self.docker_host)
        if os.environ.get("DOCKER_HOST") == endpoint:
            return (
                f"DOCKER_HOST={endpoint} is not a Docker engine: {detail}. Point DOCKER_HOST at a Docker "
                "engine's socket or address (e.g. unix:///var/run/docker.sock), or unset DOCKER_HOST to use "
                "the local engine."
            )
        return f"The Docker endpoint {endpoint} is not a Docker engine: {detail}. {ENGINE_HINT}"


def _short(message: str, limit: int = 200) -> str:
    message = " ".join(str(message).split())
    return message if len(message) <= limit else message[: limit - 3] + "..."


def connect() -> aiodocker.Docker:
    """A client for the local Docker engine; raises DockerUnavailableError when none is configured.

    The client raises DockerUnavailableError, naming the endpoint, at its first request when the
    endpoint answers but is not a Docker engine.
    """
    try:
        return _Engine()
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
        raise error(
            f"{action} failed: {exc.message} (HTTP {exc.status})", container_id=container_id, status=exc.status
        ) from exc
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
