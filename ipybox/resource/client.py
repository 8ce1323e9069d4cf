"""ResourceClient: talks to the resource server of an ipybox container."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

import aiohttp

from ipybox import _tokens
from ipybox._errors import AuthenticationError, InvalidStateError, ResourceError, ServerConnectionError


class ResourceClient:
    """A client for an ipybox container's resource server.

    One HTTP session per client, opened by `connect()` and closed by `disconnect()`.

    Args:
        port: Host port of the container's resource port (`ExecutionContainer.resource_port`).
        host: Host name or address of the resource port.
        connect_retries: How many times `connect()` tries to reach the server.
        connect_retry_interval: Seconds between those tries.
        token: The container's secret. Found automatically for containers started by this user
            on this machine; pass it explicitly for a container started elsewhere.
    """

    def __init__(
        self,
        port: int,
        host: str = "localhost",
        connect_retries: int = 10,
        connect_retry_interval: float = 1.0,
        *,
        token: str | None = None,
    ) -> None:
        self.port = port
        self.host = host
        self.connect_retries = connect_retries
        self.connect_retry_interval = connect_retry_interval
        self._token = token
        self._base_url = f"http://{host}:{port}"
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ResourceClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()

    async def connect(self) -> None:
        """Open the session and check that the server answers. Idempotent.

        Raises:
            AuthenticationError: The server rejected the secret (no retry).
            ServerConnectionError: The server could not be reached after all tries.
        """
        if self._session is not None:
            return
        token = self._token or _tokens.lookup(self.host, self.port)
        headers = {"Authorization": f"token {token}"} if token else {}
        self._session = aiohttp.ClientSession(self._base_url, headers=headers)
        last_error: Exception | None = None
        try:
            for attempt in range(max(self.connect_retries, 1)):
                if attempt:
                    await asyncio.sleep(self.connect_retry_interval)
                try:
                    await self.status()
                    return
                except AuthenticationError:
                    raise
                except (ServerConnectionError, ResourceError) as exc:
                    last_error = exc
        except BaseException:
            await self.disconnect()
            raise
        await self.disconnect()
        raise ServerConnectionError(
            f"could not reach the resource server at {self._base_url} after {max(self.connect_retries, 1)} "
            f"tries: {last_error}"
        ) from last_error

    async def disconnect(self) -> None:
        """Close the session. Safe to call repeatedly, and before `connect()`."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def status(self) -> dict[str, Any]:
        """The server's status document (`{"status": "ok"}` when healthy)."""
        if self._session is None:
            raise InvalidStateError("ResourceClient is not connected: call connect() first")
        try:
            async with self._session.get("/status") as response:
                if response.status in (401, 403):
                    raise AuthenticationError(
                        f"the resource server at {self._base_url} refused the request (HTTP {response.status}): "
                        "missing or wrong secret; pass token=... for containers not started by this user"
                    )
                if response.status >= 400:
                    raise ResourceError(f"status check failed: HTTP {response.status}", response.status)
                result: dict[str, Any] = await response.json()
                return result
        except aiohttp.ClientError as exc:
            raise ServerConnectionError(f"the resource server at {self._base_url} does not answer: {exc}") from exc
