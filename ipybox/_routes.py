"""Direct routes to a local container's servers, around docker-proxy and the bridge.

A published port on 127.0.0.1 is served by docker-proxy, a userland process that copies every byte
between two TCP connections, and behind it lie a veth pair, the bridge and Docker's netfilter rules:
all on the path of every message. ExecutionContainer records shorter ways here, and clients in the same
process try them first, falling back to the published port when they do not answer:

1. The servers' unix sockets (`/run/ipybox/*.sock` in the container), reached through the container's
   root as the host sees it: `/proc/<pid of the container's init>/root/run/ipybox/...`. No TCP at all.
   Available when this process may look into that root (the same user as the sandbox, or root) and the
   engine runs on this machine. Before each use the pid is checked to still belong to the container
   (its cgroup names the container id), so a reused pid never leads to another process's socket.
2. The container's own address on its bridge, when the bridge's gateway address is one of this host's
   own addresses (checked by binding a socket to it, which sends nothing). No docker-proxy.

With a remote engine, Docker Desktop's VM or rootless Docker neither exists and nothing is recorded.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Any

import aiohttp

from ipybox import _tokens

_routes: dict[tuple[tuple[str, int], int], str] = {}
_sockets: dict[tuple[tuple[str, int], int], tuple[str, int, str]] = {}  # -> (path in the container, pid, id)


def record(
    host: str, published: dict[int, int], container_info: dict[str, Any], sockets: dict[int, str] | None = None
) -> None:
    """Remember the direct ways to each published port (container port -> host port).

    `sockets` maps container ports to the unix socket that serves the same server in the container.
    """
    address = local_container_address(container_info)
    pid = int((container_info.get("State") or {}).get("Pid") or 0)
    container_id = str(container_info.get("Id") or "")
    for container_port, host_port in published.items():
        key = (_tokens.key(host, host_port), container_port)
        if address is not None:
            _routes[key] = address
        path = (sockets or {}).get(container_port)
        if path and pid and container_id:
            _sockets[key] = (path, pid, container_id)


def forget(host: str, host_ports: list[int]) -> None:
    keys = {_tokens.key(host, port) for port in host_ports}
    for table in (_routes, _sockets):
        for key in [k for k in table if k[0] in keys]:
            del table[key]


def unix_socket(host: str, port: int, container_port: int) -> str | None:
    """The host path of the server's unix socket in a recorded, still running container, else None."""
    entry = _sockets.get((_tokens.key(host, port), container_port))
    if entry is None:
        return None
    path, pid, container_id = entry
    try:
        # The pid is the container's init; once the container is gone it may be reused by anything.
        if container_id not in Path(f"/proc/{pid}/cgroup").read_text():
            return None
        host_path = f"/proc/{pid}/root{path}"
        os.stat(host_path)
    except OSError:
        return None  # gone, or this process may not look into the container's root
    return host_path


def direct_url(host: str, port: int, container_port: int) -> str | None:
    """`http://<container address>:<container port>` for a recorded container, else None."""
    address = _routes.get((_tokens.key(host, port), container_port))
    if address is None:
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
    """The direct routes to try, best first: (base URL, connector or None, description) each."""
    routes: list[tuple[str, aiohttp.BaseConnector | None, str]] = []
    if (path := unix_socket(host, port, container_port)) is not None:
        # The Host header names localhost, which the servers' Host guard accepts.
        routes.append(("http://localhost", aiohttp.UnixConnector(path=path), f"unix socket {path}"))
    if (url := direct_url(host, port, container_port)) is not None:
        routes.append((url, None, f"container address {url}"))
    return routes
