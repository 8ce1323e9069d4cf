"""ResourceClient: talks to the resource server of an ipybox container."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from ipybox import _freezer, _routes, _tokens
from ipybox._errors import AuthenticationError, InvalidStateError, ResourceError, ServerConnectionError
from ipybox._labels import RESOURCE_PORT
from ipybox.resource import _files, _mcp, _modules
from ipybox.resource._http import (
    DEFAULT_INACTIVITY_TIMEOUT,
    Link,
    client_timeout,
    connection_errors,
    raise_for_response,
    transfer,
)

logger = logging.getLogger(__name__)

_DIRECT_TIMEOUT = aiohttp.ClientTimeout(total=2)
"""How long the first request over a container's direct address may take before the published port is used."""


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
        inactivity_timeout: Seconds a request may go without progress: to connect, for the server to
            take the next chunk of an upload, for the next bytes of a response. A transfer has no
            total time limit; it may take hours as long as data keeps moving. A stall raises
            `ServerConnectionError` naming the operation. `None` waits forever. MCP generation
            waits at least 300 s for its answer (the server gives up at 240 s and says why).

    Raises:
        ValueError: `inactivity_timeout` is not a positive number or None.
    """

    def __init__(
        self,
        port: int,
        host: str = "localhost",
        connect_retries: int = 10,
        connect_retry_interval: float = 1.0,
        *,
        token: str | None = None,
        inactivity_timeout: float | None = DEFAULT_INACTIVITY_TIMEOUT,
    ) -> None:
        if inactivity_timeout is not None and not inactivity_timeout > 0:
            # aiohttp would read 0 as "no limit"
            raise ValueError(
                f"inactivity_timeout must be a positive number of seconds or None, not {inactivity_timeout!r}"
            )
        self.port = port
        self.host = host
        self.connect_retries = connect_retries
        self.connect_retry_interval = connect_retry_interval
        self._token = token
        self.inactivity_timeout = inactivity_timeout
        self._base_url = f"http://{host}:{port}"
        self._via = "published port"  # or the direct route connect() found (ipybox._routes)
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
        timeout = client_timeout(self.inactivity_timeout)  # transfers are bounded by inactivity only
        # Direct routes around docker-proxy and the bridge first (see ipybox._routes); one quick try each.
        for base_url, connector, route in _routes.direct_sessions(self.host, self.port, RESOURCE_PORT):
            self._session = aiohttp.ClientSession(base_url, headers=headers, connector=connector, timeout=timeout)
            try:
                with connection_errors("status check"):
                    async with self._session.get("/status", timeout=_DIRECT_TIMEOUT) as response:
                        await raise_for_response(response, "status check")
                self._base_url, self._via = base_url, route
                return
            except AuthenticationError:
                await self.disconnect()
                raise
            except (ServerConnectionError, ResourceError, aiohttp.ClientError, TimeoutError) as exc:
                logger.info("direct route %s failed (%s); trying the next", route, exc)
                await self.disconnect()
            except BaseException:
                await self.disconnect()
                raise
        connector = _routes.published_connector(self.host, self.port, RESOURCE_PORT)
        self._session = aiohttp.ClientSession(self._base_url, headers=headers, connector=connector, timeout=timeout)
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

    def _connected(self) -> Link:
        if self._session is None:
            raise InvalidStateError("ResourceClient is not connected: call connect() first")
        host, port = self.host, self.port
        return Link(
            self._session,
            f"{self._base_url} ({self._via})",
            self.inactivity_timeout,
            lambda: _freezer.frozen(host, port),
        )

    # -- files and directories (paths are relative to /app in the sandbox) -----------------------

    async def upload_file(self, relpath: str, local_path: str | Path) -> None:
        """Upload a local file to `/app/<relpath>`, creating parent directories; the write is atomic.

        Raises:
            FileNotFoundError: `local_path` does not exist (raised before any request).
            RemotePathError: the server refused `relpath`.
            ServerConnectionError: the server cannot be reached, or the transfer stalled for
                `inactivity_timeout` seconds (the message names the operation).
        """
        await _files.upload_file(self._connected(), relpath, Path(local_path))

    async def download_file(self, relpath: str, local_path: str | Path) -> None:
        """Download `/app/<relpath>` to a local file, creating parent directories; the write is atomic.

        Raises:
            RemoteFileNotFoundError: the sandbox file does not exist (also a `FileNotFoundError`).
            RemotePathError: the server refused `relpath`.
            ServerConnectionError: the server cannot be reached, or the transfer stalled for
                `inactivity_timeout` seconds (the message names the operation).
        """
        await _files.download_file(self._connected(), relpath, Path(local_path))

    async def delete_file(self, relpath: str) -> None:
        """Delete the file `/app/<relpath>`.

        Raises:
            RemoteFileNotFoundError: the sandbox file does not exist.
            RemotePathError: the server refused `relpath`.
        """
        await _files.delete_file(self._connected(), relpath)

    async def upload_directory(self, relpath: str, local_path: str | Path) -> None:
        """Upload a local directory's regular files and directories to `/app/<relpath>` as a tar stream.

        Symlinks and other special files are not sent.

        Raises:
            FileNotFoundError: `local_path` is not an existing directory (raised before any request).
            RemotePathError: the server refused `relpath`.
            ServerConnectionError: the server cannot be reached, or the transfer stalled for
                `inactivity_timeout` seconds (the message names the operation).
        """
        await _files.upload_directory(self._connected(), relpath, Path(local_path))

    async def download_directory(self, relpath: str, local_path: str | Path) -> None:
        """Download `/app/<relpath>` into the local directory `local_path`.

        Every member of the sandbox's archive is validated here: links and special files are
        dropped, names that are absolute or contain `..` are rejected, and member count and
        expanded size are capped, so a compromised sandbox cannot write outside `local_path`.

        Raises:
            RemoteFileNotFoundError: the sandbox directory does not exist.
            RemotePathError: the server refused `relpath`.
            ArchiveError: the archive broke a rule above.
            ServerConnectionError: the server cannot be reached, or the transfer stalled for
                `inactivity_timeout` seconds (the message names the operation).
        """
        await _files.download_directory(self._connected(), relpath, Path(local_path))

    # -- module sources ---------------------------------------------------------------------------

    async def get_module_sources(self, module_names: list[str]) -> dict[str, str]:
        """Source code of modules importable in the sandbox's Python environment, keyed by name.

        All or nothing: one module that cannot be found (or has no Python source) fails the call.

        Raises:
            ResourceError: a module was not found; the message names it.
        """
        return await _modules.get_module_sources(self._connected(), module_names)

    # -- MCP client generation --------------------------------------------------------------------

    async def generate_mcp_sources(self, relpath: str, server_name: str, server_params: dict[str, Any]) -> list[str]:
        """Generate a Python package `/app/<relpath>/<server_name>/` for the tools of an MCP server.

        The sandbox connects to the server: stdio (`{"command": ..., "args": [...], "env": {...}}`,
        started inside the container), streamable HTTP (`{"type": "streamable_http", "url": ...}` or
        a URL containing `/mcp`) or SSE (`{"type": "sse", "url": ...}` or `/sse`), with optional
        `headers`. Each tool becomes a module with a pydantic `Params` model and a function
        `<tool>(params) -> str`; regenerating replaces the package. See docs/mcp-generation.md.

        Returns:
            The names of the generated tool modules.

        Raises:
            InvalidServerParamsError: `server_params` cannot work (e.g. a URL with a placeholder for its
                host); raised before any request, naming the parameter and the fix. Also a `ValueError`.
            RemotePathError: a bad `relpath` or `server_name`.
            ResourceError: the MCP server could not be reached or failed (status 422, its message).
        """
        return await _mcp.generate_mcp_sources(self._connected(), relpath, server_name, server_params)

    async def get_mcp_sources(self, relpath: str, server_name: str) -> dict[str, str]:
        """The generated tool modules of `/app/<relpath>/<server_name>/`, keyed by module name.

        Raises:
            RemoteFileNotFoundError: no generated package there.
        """
        return await _mcp.get_mcp_sources(self._connected(), relpath, server_name)

    async def status(self) -> dict[str, Any]:
        """The server's status document (`{"status": "ok"}` when healthy)."""
        link = self._connected()
        async with transfer(link, "status check"):
            async with link.session.get("/status") as response:
                await raise_for_response(response, "status check")
                result: dict[str, Any] = await response.json()
                return result
