"""Direct routes to a local container's servers, around docker-proxy.

A published port on 127.0.0.1 is served by docker-proxy, a userland process that copies every byte
between two TCP connections: on this kind of machine about 0.3 ms of every cell's round trip and a
third of the file-transfer throughput. When the container sits on a bridge this host is part of, its
servers are reachable at the container's own address, so ExecutionContainer records that address here
and clients in the same process use it, falling back to the published port when it does not answer.

Recorded only when the bridge's gateway address is one of this host's own addresses (checked by
binding a socket to it, which sends nothing): with a remote engine, Docker Desktop's VM or rootless
Docker, container addresses are not reachable from here and nothing is recorded.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from ipybox import _tokens

_routes: dict[tuple[tuple[str, int], int], str] = {}


def record(host: str, published: dict[int, int], container_info: dict[str, Any]) -> None:
    """Remember the direct address for each published port (container port -> host port)."""
    address = local_container_address(container_info)
    if address is None:
        return
    for container_port, host_port in published.items():
        _routes[(_tokens.key(host, host_port), container_port)] = address


def forget(host: str, host_ports: list[int]) -> None:
    for key in [k for k in _routes if k[0] in {_tokens.key(host, port) for port in host_ports}]:
        del _routes[key]


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
