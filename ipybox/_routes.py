"""Direct routes to a local container's servers, around docker-proxy and the bridge, and how every
route is verified to lead to the server before a byte goes out.

A published port on 127.0.0.1 is served by docker-proxy, a userland process that copies every byte
between two TCP connections, and behind it lie a veth pair, the bridge and Docker's netfilter rules:
all on the path of every message. ExecutionContainer records shorter ways here, and clients in the same
process try them first, falling back to the published port when they do not answer:

1. The servers' unix sockets (`/run/ipybox/*.sock` in the container), reached through the container's
   root as the host sees it: `/proc/<pid of the container's init>/root/run/ipybox/...`. No TCP at all.
   Available when this process may look into that root (the same user as the sandbox, or root) and the
   engine runs on this machine.
2. The container's own address on its bridge, when the bridge's gateway address is one of this host's
   own addresses (checked by binding a socket to it, which sends nothing). No docker-proxy.

With a remote engine, Docker Desktop's VM or rootless Docker neither exists and nothing is recorded.

Verification. Code in the sandbox runs as the same user as the server, so it may rename, replace or
symlink anything in `/run/ipybox`, signal the server, and ptrace the container's init (docker-init is
dumpable). The host must send the secret to the server only, and read answers from it only. So
`record` identifies the server process when the container has just started (the only child of the
container's init: no cell has run yet, and the kernels are the server's children) by its pid and start
time, which no later process can share, and every new connection of every route is checked against it
before its first byte:

- Unix sockets (`_ServerSocketConnector`): the path is opened without following a final symlink
  (`O_PATH | O_NOFOLLOW`), must be a socket, and is connected to through that descriptor, so what was
  checked is what is connected to, whatever the path names by then; a symlink would otherwise resolve
  against this host's root, not the container's. Then the listener's pid (SO_PEERCRED: the process that
  called listen()) must be the server's, and the server must still run. A mismatch closes the connection
  and fails the route with a WARNING; the client takes its next route. A session keeps its route: a
  later connection that fails the check fails like a lost connection.
- TCP, container address and published port (`_ServerTCPConnector`): the server listens on
  0.0.0.0:8888 and 0.0.0.0:8900 without SO_REUSEPORT (tornado's `bind_sockets` and aiohttp's `TCPSite`
  leave it off) as long as it runs, and Linux refuses a second listener on a port in LISTEN, on any
  address, with or without SO_REUSEADDR/SO_REUSEPORT (tests/adversarial/test_socket_swap.py). The
  sandbox holds no capability (no NET_ADMIN for redirect rules, no NET_RAW to sniff or spoof). So while
  the server runs, a connection to the container's port is a connection to the server. But the server
  may die while the container still counts as running: a cell can hold docker-init under ptrace so
  that it never reaps its child, kill the server and bind the ports itself. So the server must run when
  a connection is opened and again once it is established, before the request is written. For the
  container's address that settles it: the kernel accepted the connection at the server's listener. For
  the published port docker-proxy accepts first and dials the container a moment later, so a cell that
  kills the server exactly then might still get one connection; it cannot see when that is, and it has
  one try, as the server is gone for good after it.

A container whose server cannot be identified gets no direct route; one this process cannot check at
all (another pid namespace) gets the container-address route unchecked, as the secret registry hands
out its secret (ipybox._tokens). A published port whose container is gone is not refused here: the
secret registry then withholds the secret, and the port may belong to something else by now.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.client_exceptions import UnixClientConnectorError
from aiohttp.client_proto import ResponseHandler

from ipybox import _tokens
from ipybox._process import Process, find_server

logger = logging.getLogger(__name__)


_routes: dict[tuple[tuple[str, int], int], str] = {}
_sockets: dict[tuple[tuple[str, int], int], tuple[str, int, str]] = {}  # -> (path in the container, pid, id)
_servers: dict[tuple[tuple[str, int], int], _Server] = {}


@dataclass(frozen=True)
class _Server:
    """A recorded container (its id and the host pid of its init) and its server process, when identified."""

    container_id: str
    init: int
    process: Process | None

    def runs(self) -> bool:
        return self.process is not None and self.process.runs()

    def container_runs(self) -> bool:
        return _tokens.container_runs(self.container_id, self.init)

    def refusal(self, direct: bool) -> str | None:
        """Why nothing may be sent towards the server now, or None. `direct`: a route into the container."""
        if self.runs():
            return None
        if _tokens.container_runs(self.container_id, self.init):
            pid = self.process.pid if self.process is not None else "unknown"
            return (
                f"the container's server process (pid {pid}) is gone while the container still runs: "
                "a process in the sandbox may be serving its ports"
            )
        return _GONE if direct else None


def record(
    host: str, published: dict[int, int], container_info: dict[str, Any], sockets: dict[int, str] | None = None
) -> Process | None:
    """Remember the direct ways to each published port (container port -> host port), and the server.

    `sockets` maps container ports to the unix socket that serves the same server in the container.
    Called once the server said it is ready, before any client connects (see `find_server`).
    """
    address = local_container_address(container_info)
    pid = int((container_info.get("State") or {}).get("Pid") or 0)
    container_id = str(container_info.get("Id") or "")
    server: _Server | None = None
    if pid and container_id and _tokens.container_runs(container_id, pid):
        server = _Server(container_id, pid, find_server(pid))
        if server.process is None:
            logger.info("the server process of container %s was not found: no direct routes", container_id[:12])
    for container_port, host_port in published.items():
        key = (_tokens.key(host, host_port), container_port)
        if server is not None:
            _servers[key] = server
        if address is not None:
            _routes[key] = address
        path = (sockets or {}).get(container_port)
        if path and pid and container_id:
            _sockets[key] = (path, pid, container_id)
    return server.process if server is not None else None


def forget(host: str, host_ports: list[int]) -> None:
    _drop(host, host_ports, (_routes, _sockets, _servers))


def forget_addresses(host: str, host_ports: list[int]) -> None:
    """Forget the container-address routes only (the sandbox left its networks; its sockets still serve)."""
    _drop(host, host_ports, (_routes,))


def _drop(host: str, host_ports: list[int], tables: tuple[dict[Any, Any], ...]) -> None:
    keys = {_tokens.key(host, port) for port in host_ports}
    for table in tables:
        for key in [k for k in table if k[0] in keys]:
            del table[key]


def unix_socket(host: str, port: int, container_port: int) -> str | None:
    """The host path of the server's unix socket in a recorded, still running container, else None."""
    entry = _sockets.get((_tokens.key(host, port), container_port))
    if entry is None:
        return None
    path, pid, container_id = entry
    # The pid is the container's init; once the container is gone it may be reused by anything.
    if not _tokens.container_runs(container_id, pid):
        return None
    try:
        host_path = f"/proc/{pid}/root{path}"
        # lstat: a symlink there is the connector's to refuse (and to report), never followed here.
        os.lstat(host_path)
    except OSError:
        return None  # gone, or this process may not look into the container's root
    return host_path


def direct_url(host: str, port: int, container_port: int) -> str | None:
    """`http://<container address>:<container port>` for a recorded container whose server runs, else None.

    A recorded address may belong to another container once this one is gone.
    """
    key = (_tokens.key(host, port), container_port)
    address = _routes.get(key)
    if address is None:
        return None
    server = _servers.get(key)
    if server is not None and not server.runs():
        return None
    return f"http://{address}:{container_port}"


def local_container_address(container_info: dict[str, Any]) -> str | None:
    """The container's IPv4 address on a bridge whose gateway is an address of this host."""
    networks = ((container_info.get("NetworkSettings") or {}).get("Networks")) or {}
    for network in networks.values():
        address, gateway = network.get("IPAddress"), network.get("Gateway")
        if address and gateway and _is_own_address(gateway):
            return str(ipaddress.IPv4Address(address))
    return None


def _is_own_address(address: str) -> bool:
    try:
        ipaddress.IPv4Address(address)
    except ValueError:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


def direct_sessions(host: str, port: int, container_port: int) -> list[tuple[str, aiohttp.BaseConnector | None, str]]:
    """The direct routes to try, best first: (base URL, connector or None, description) each.

    Each connector checks every connection it opens against the recorded server (module docstring).
    """
    key = (_tokens.key(host, port), container_port)
    server = _servers.get(key)
    routes: list[tuple[str, aiohttp.BaseConnector | None, str]] = []
    if server is not None and server.runs() and (path := unix_socket(host, port, container_port)) is not None:
        # The Host header names localhost, which the servers' Host guard accepts.
        routes.append(("http://localhost", _ServerSocketConnector(path, server), f"unix socket {path}"))
    if (url := direct_url(host, port, container_port)) is not None:
        connector = _ServerTCPConnector(server, direct=True) if server is not None else None
        routes.append((url, connector, f"container address {url}"))
    return routes


def published_connector(host: str, port: int, container_port: int) -> aiohttp.BaseConnector | None:
    """The connector for the published port: checks each connection against the recorded server.

    The server comes from this process's records, else from the secret's record (a client in another
    process of the user); None (aiohttp's default connector) when neither identified one.
    """
    server = _servers.get((_tokens.key(host, port), container_port))
    if server is None and (recorded := _tokens.recorded_server(host, port)) is not None:
        server = _Server(*recorded)
    if server is None or server.process is None:
        return None
    return _ServerTCPConnector(server, direct=False)


def _refused(message: str, tampering: bool = True, still: Callable[[], bool] | None = None) -> ConnectionRefusedError:
    """The error that fails a route; logged as a WARNING when the sandbox tampered with the control plane.

    `still`: tampering only if this is still true a moment later (a container being killed loses its
    server a few milliseconds before its init process: not tampering, only the end).
    """
    if tampering and still is not None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            logger.debug("%s; nothing was sent", message)

            def confirm() -> None:
                if still():
                    logger.warning("%s; nothing was sent", message)

            loop.call_later(_CONFIRM_DELAY, confirm)
            return ConnectionRefusedError(errno.ECONNREFUSED, message)
    logger.log(logging.WARNING if tampering else logging.DEBUG, "%s; nothing was sent", message)
    return ConnectionRefusedError(errno.ECONNREFUSED, message)


_CONFIRM_DELAY = 0.5  # s: a killed container's init is gone ~2 ms after its server (measured)


_GONE = "the container is gone"


def _peer_pid(sock: socket.socket) -> int:
    """The pid of the process that called listen() on the socket this one is connected to (0: not in our namespace)."""
    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid: int = struct.unpack("3i", credentials)[0]
    return pid


class _ServerSocketConnector(aiohttp.UnixConnector):
    """A unix socket connector that only hands out connections to the recorded server's own socket.

    `_create_connection` is the hook aiohttp calls for every new connection of its pool (the same in all
    of aiohttp 3); nothing is written to a connection before it returns.
    """

    def __init__(self, path: str, server: _Server) -> None:
        super().__init__(path)
        self._server = server

    async def _create_connection(
        self, req: aiohttp.ClientRequest, traces: list[Any], timeout: aiohttp.ClientTimeout
    ) -> ResponseHandler:
        try:
            async with asyncio.timeout(timeout.sock_connect):
                sock = await self._connect_to_server()
        except OSError as exc:
            if isinstance(exc, TimeoutError) and exc.errno is None:
                raise  # aiohttp reports its own connect timeout
            raise UnixClientConnectorError(self.path, req.connection_key, exc) from exc
        try:
            _, proto = await self._loop.create_unix_connection(self._factory, sock=sock)
        except BaseException:
            sock.close()
            raise
        return proto

    async def _connect_to_server(self) -> socket.socket:
        if (reason := self._server.refusal(direct=True)) is not None:
            raise _refused(f"unix socket {self.path}: {reason}", reason != _GONE, self._server.container_runs)
        fd = os.open(self.path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                raise _refused(
                    f"unix socket {self.path} is a symlink: a process in the sandbox replaced the server's socket"
                )
            if not stat.S_ISSOCK(mode):
                raise _refused(f"unix socket {self.path} is not a socket: a process in the sandbox replaced it")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                # Through the descriptor: the socket checked above, whatever the path names by now.
                await self._loop.sock_connect(sock, f"/proc/self/fd/{fd}")
                peer, server = _peer_pid(sock), self._server.process
                assert server is not None  # refusal() is None only for an identified server that runs
                if peer != server.pid:
                    raise _refused(
                        f"unix socket {self.path} is served by pid {peer}, not by the server's pid {server.pid}: "
                        "a process in the sandbox replaced the server's socket"
                    )
                if (reason := self._server.refusal(direct=True)) is not None:
                    raise _refused(f"unix socket {self.path}: {reason}", reason != _GONE, self._server.container_runs)
            except BaseException:
                sock.close()
                raise
        finally:
            os.close(fd)
        return sock


class _ServerTCPConnector(aiohttp.TCPConnector):
    """A TCP connector whose connections are opened, and handed out, only while the recorded server runs.

    `direct`: the container's own address, where an established connection was accepted by the
    server's listener if the server still runs once it is established (module docstring).
    """

    def __init__(self, server: _Server, direct: bool) -> None:
        super().__init__()
        self._server = server
        self._direct = direct

    async def _create_connection(
        self, req: aiohttp.ClientRequest, traces: list[Any], timeout: aiohttp.ClientTimeout
    ) -> ResponseHandler:
        self._check(req)
        proto = await super()._create_connection(req, traces, timeout)
        try:
            self._check(req)
        except BaseException:
            proto.close()
            raise
        return proto

    def _check(self, req: aiohttp.ClientRequest) -> None:
        if (reason := self._server.refusal(self._direct)) is not None:
            where = f"{req.url.host}:{req.url.port}"
            refused = _refused(f"{where}: {reason}", reason != _GONE, self._server.container_runs)
            raise aiohttp.ClientConnectorError(req.connection_key, refused)
