"""The one place where resource-server HTTP responses and aiohttp errors become ipybox errors.

The server answers errors as JSON `{"error": "<message>"}` with a status: 400 a refused path, 401 a
missing or wrong secret, 404 a missing file, directory or module, 422 a request the server could not
carry out (e.g. an MCP server that cannot be reached), 500 anything else.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp

from ipybox._errors import (
    AuthenticationError,
    RemoteFileNotFoundError,
    RemotePathError,
    ResourceError,
    ServerConnectionError,
)


async def raise_for_response(response: aiohttp.ClientResponse, action: str) -> None:
    """Raise the ipybox error for an error response; return quietly for 2xx."""
    if response.status < 400:
        return
    try:
        body = await response.json(content_type=None)
        detail = str(body.get("error", body)) if isinstance(body, dict) else str(body)
    except (ValueError, aiohttp.ClientError):
        detail = (await response.text())[:500]
    message = f"{action} failed: {detail} (HTTP {response.status})"
    if response.status in (401, 403):
        raise AuthenticationError(
            f"{action} was refused (HTTP {response.status}): missing or wrong secret; pass token=... for "
            "containers not started by this user"
        )
    if response.status == 400:
        raise RemotePathError(message, response.status)
    if response.status == 404:
        raise RemoteFileNotFoundError(message, response.status)
    raise ResourceError(message, response.status)


@contextmanager
def connection_errors(action: str) -> Iterator[None]:
    """Turn aiohttp's connection failures during `action` into ServerConnectionError."""
    try:
        yield
    except aiohttp.ClientError as exc:
        raise ServerConnectionError(f"{action}: the resource server does not answer: {exc}") from exc
