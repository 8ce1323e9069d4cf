"""A small network lab for firewall tests: Docker networks and tiny server containers, all local.

`NetLab` owns every network and container it creates and removes them all in `aclose()` (containers
first, then networks, forcing out any endpoint a test left connected). Servers run the test image with
an overridden entrypoint (`python -c SERVER_CODE NAME`) as root, so they can bind port 53:

- TCP 8080: greets with `hello-<name>\\n`, then echoes every line; a line `CONNECT <ip> <port>` makes
  the server connect there itself and answer `got <first line>` or `fail <error>` (connect-back).
- UDP 53: echoes every datagram (stands in for "some DNS resolver"), or, given DNS records, answers
  A queries for them (NXDOMAIN for other names): a real, if tiny, resolver.

`egress_guard` keeps traffic of the lab's subnets on this machine even when the firewall under test is
broken: a host rule in Docker's DOCKER-USER chain drops whatever the lab's networks would forward
elsewhere (e.g. 169.254.169.254, or a DNS query Docker's embedded resolver forwards upstream).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import aiodocker
import pytest

from tests.integration.conftest import SESSION_ID, session_labels

SERVER_PORT = 8080
SERVER_READY_TIMEOUT = 20.0

SERVER_CODE = r"""
import json, socket, struct, sys, threading

NAME = sys.argv[1]
v6 = sys.argv[2] == "6"
RECORDS = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
tcp = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
udp = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
for sock, port in ((tcp, 8080), (udp, 53)):
    if v6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::" if v6 else "0.0.0.0", port))
tcp.listen(64)


def connect_back(host, port):
    try:
        with socket.create_connection((host, int(port)), timeout=3) as back:
            return b"got " + back.recv(1024).strip()
    except OSError as exc:
        return ("fail %r" % (exc,)).encode()


def serve(conn):
    with conn:
        conn.sendall(("hello-%s\n" % NAME).encode())
        for line in conn.makefile("rb"):
            parts = line.split()
            if len(parts) == 3 and parts[0] == b"CONNECT":
                conn.sendall(connect_back(parts[1].decode(), parts[2].decode()) + b"\n")
            else:
                conn.sendall(line)


def accept():
    while True:
        conn, _ = tcp.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def dns_reply(query):
    labels, pos = [], 12
    while query[pos]:
        labels.append(query[pos + 1 : pos + 1 + query[pos]].decode().lower())
        pos += 1 + query[pos]
    qtype = struct.unpack("!H", query[pos + 1 : pos + 3])[0]
    question = query[12 : pos + 5]
    address = RECORDS.get(".".join(labels))
    if address is None:
        return query[:2] + struct.pack("!HHHHH", 0x8183, 1, 0, 0, 0) + question  # NXDOMAIN
    if qtype != 1:
        return query[:2] + struct.pack("!HHHHH", 0x8180, 1, 0, 0, 0) + question  # no data
    answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(address)
    return query[:2] + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + question + answer


def echo():
    while True:
        data, addr = udp.recvfrom(4096)
        if RECORDS is None:
            udp.sendto(data, addr)
            continue
        try:
            udp.sendto(dns_reply(data), addr)
        except Exception as exc:
            print("bad query %r: %r" % (data, exc), flush=True)


threading.Thread(target=echo, daemon=True).start()
print("ready", flush=True)
accept()
"""


@dataclass
class Network:
    name: str
    id: str
    subnets: list[str]


@dataclass
class Server:
    name: str
    container_id: str
    addresses: dict[str, str] = field(default_factory=dict)  # network name -> IPv4/IPv6 address


class NetLab:
    """Creates networks and server containers for one test module; `aclose()` removes them all."""

    def __init__(self, image: str, prefix: str) -> None:
        self.image = image
        self.prefix = prefix
        self.docker = aiodocker.Docker()
        self._networks: list[Network] = []
        self._containers: list[str] = []

    async def used_subnets(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """Subnets of all Docker networks and of the host's routes (so a new subnet collides with neither)."""
        used: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for info in await self.docker.networks.list():
            for config in (info.get("IPAM") or {}).get("Config") or []:
                if config.get("Subnet"):
                    used.append(ipaddress.ip_network(config["Subnet"], strict=False))
        used.extend(_host_routes())
        return used

    async def free_ipv4_16s(self, count: int) -> list[ipaddress.IPv4Network]:
        """`count` 10.x.0.0/16 ranges used by no Docker network or host route, picked at random."""
        used = await self.used_subnets()
        candidates = [ipaddress.IPv4Network(f"10.{octet}.0.0/16") for octet in range(128, 250)]
        free = [net for net in candidates if not any(net.overlaps(other) for other in used if other.version == 4)]
        if len(free) < count:
            pytest.fail(f"fewer than {count} free 10.x.0.0/16 ranges for the firewall test networks")
        start = secrets.randbelow(len(free))
        return (free[start:] + free[:start])[:count]

    async def create_network(
        self,
        suffix: str,
        subnets: Sequence[str],
        *,
        gateways: dict[str, str] | None = None,
        ipv6: bool = False,
        internal: bool = False,
    ) -> Network:
        name = f"{self.prefix}-{suffix}"
        gateways = gateways or {}
        ipam = [
            {"Subnet": subnet, **({"Gateway": gateways[subnet]} if subnet in gateways else {})} for subnet in subnets
        ]
        config: dict[str, Any] = {
            "Name": name,
            "Driver": "bridge",
            "CheckDuplicate": True,
            "EnableIPv6": ipv6,
            "Internal": internal,
            "IPAM": {"Driver": "default", "Config": ipam},
            "Labels": session_labels(),
        }
        try:
            created = await self.docker.networks.create(config)
        except aiodocker.DockerError as exc:
            pytest.fail(f"creating network {name} ({', '.join(subnets)}, ipv6={ipv6}) failed: {exc.message}")
        network = Network(name=name, id=created.id, subnets=list(subnets))
        self._networks.append(network)
        return network

    async def start_server(
        self, name: str, network: Network, ipv4: str, ipv6: str | None = None, dns: dict[str, str] | None = None
    ) -> Server:
        """A server container on `network` at `ipv4` (and `ipv6`), reachable by the alias `name` there.

        With `dns` (name -> IPv4 address), its UDP port 53 is a DNS server for those names.
        """
        ipam: dict[str, str] = {"IPv4Address": ipv4}
        if ipv6 is not None:
            ipam["IPv6Address"] = ipv6
        config: dict[str, Any] = {
            "Image": self.image,
            "Entrypoint": ["python", "-c", SERVER_CODE],
            "Cmd": [name, "6" if ipv6 else "4", *([json.dumps(dns)] if dns is not None else [])],
            "User": "0:0",
            "Labels": session_labels(),
            "HostConfig": {"NetworkMode": network.name, "Init": True},
            "NetworkingConfig": {"EndpointsConfig": {network.name: {"IPAMConfig": ipam, "Aliases": [name]}}},
        }
        container = await self.docker.containers.create(config, name=f"{self.prefix}-{name}")
        self._containers.append(container.id)
        await container.start()
        await self._wait_until_ready(container, name)
        addresses = {network.name: ipv4}
        if ipv6 is not None:
            addresses[network.name + "/6"] = ipv6
        return Server(name=name, container_id=container.id, addresses=addresses)

    async def _wait_until_ready(self, container: Any, name: str) -> None:
        deadline = time.monotonic() + SERVER_READY_TIMEOUT
        while True:
            logs = "".join(await container.log(stdout=True, stderr=True))
            if "ready" in logs.split():
                return
            state = (await container.show())["State"]
            if not state.get("Running") or time.monotonic() > deadline:
                pytest.fail(f"server {name} did not start (state {state.get('Status')}):\n{logs}")
            await asyncio.sleep(0.1)

    async def connect(self, network: Network, container_id: str) -> None:
        docker_network = await self.docker.networks.get(network.id)
        await docker_network.connect({"Container": container_id})

    async def exec_root(self, container_id: str, cmd: list[str]) -> tuple[int, str]:
        """Runs `cmd` as root in a container (test set-up the sandbox user could not do); (exit code, output)."""
        container = await self.docker.containers.get(container_id)
        execution = await container.exec(cmd, user="0:0")
        output: list[str] = []
        async with execution.start(detach=False) as stream:
            while (message := await stream.read_out()) is not None:
                output.append(message.data.decode(errors="replace"))
        exit_code: int = (await execution.inspect())["ExitCode"]
        return exit_code, "".join(output)

    async def container_info(self, container_id: str) -> dict[str, Any]:
        info: dict[str, Any] = await (await self.docker.containers.get(container_id)).show()
        return info

    async def aclose(self) -> None:
        errors: list[str] = []
        try:
            for container_id in reversed(self._containers):
                try:
                    await (await self.docker.containers.get(container_id)).delete(force=True, v=True)
                except aiodocker.DockerError as exc:
                    if exc.status != 404:
                        errors.append(f"container {container_id[:12]}: {exc.message}")
            self._containers.clear()
            for network in reversed(self._networks):
                try:
                    docker_network = await self.docker.networks.get(network.id)
                    # A sandbox a failed test left behind must not keep the network alive.
                    for endpoint_id in ((await docker_network.show()).get("Containers") or {}).keys():
                        await docker_network.disconnect({"Container": endpoint_id, "Force": True})
                    await docker_network.delete()
                except aiodocker.DockerError as exc:
                    if exc.status != 404:
                        errors.append(f"network {network.name}: {exc.message}")
            self._networks.clear()
        finally:
            await self.docker.close()
        assert not errors, "network lab clean-up failed: " + "; ".join(errors)


def _host_routes() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    routes: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    try:
        with open("/proc/net/route") as table:
            next(table)
            for line in table:
                fields = line.split()
                destination = ipaddress.IPv4Address(int(fields[1], 16).to_bytes(4, "little"))
                mask = ipaddress.IPv4Address(int(fields[7], 16).to_bytes(4, "little"))
                if str(mask) != "0.0.0.0":  # the default route covers everything: not a collision
                    routes.append(ipaddress.IPv4Network(f"{destination}/{mask}", strict=False))
    except OSError:
        pass
    # The host's own resolver and addresses, whatever the routes say.
    try:
        with open("/etc/resolv.conf") as resolv:
            for line in resolv:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    try:
                        routes.append(ipaddress.ip_network(parts[1]))
                    except ValueError:
                        pass
    except OSError:
        pass
    return routes


def random_ula_64() -> ipaddress.IPv6Network:
    """A random fdXX:XXXX:XXXX:YYYY::/64 (RFC 4193); never fd00::/64, which hosts often use themselves."""
    while True:
        network = ipaddress.IPv6Network((int.from_bytes(b"\xfd" + secrets.token_bytes(7), "big") << 64, 64))
        if not network.overlaps(ipaddress.IPv6Network("fd00::/16")):
            return network


@contextmanager
def egress_guard(subnets: Sequence[str]) -> Iterator[None]:
    """Host rules dropping everything `subnets` would forward to other destinations, for the duration.

    DROP, not REJECT: if the firewall under test is broken, a probe must time out (and fail its "fast"
    assertion), not be rejected quickly by this guard and pass.
    """
    iptables = shutil.which("iptables")
    if os.geteuid() != 0 or iptables is None:
        pytest.fail(
            "the firewall tests need root and the host's iptables to guarantee that no probe leaves this machine "
            "(they add a DROP rule for the test networks to Docker's DOCKER-USER chain)"
        )
    comment = f"ipybox-test-{SESSION_ID}"
    rules = [
        ["-s", subnet, "!", "-d", subnet, "-m", "comment", "--comment", comment, "-j", "DROP"] for subnet in subnets
    ]
    added: list[list[str]] = []
    try:
        for rule in rules:
            result = subprocess.run(
                [iptables, "-w", "10", "-I", "DOCKER-USER", "1", *rule], capture_output=True, text=True
            )
            if result.returncode != 0:
                pytest.fail(f"could not add the egress guard {' '.join(rule)}: {result.stderr.strip()}")
            added.append(rule)
        yield
    finally:
        failures = []
        for rule in added:
            result = subprocess.run([iptables, "-w", "10", "-D", "DOCKER-USER", *rule], capture_output=True, text=True)
            if result.returncode != 0:
                failures.append(f"{' '.join(rule)}: {result.stderr.strip()}")
        assert not failures, "could not remove the egress guard: " + "; ".join(failures)
