"""Egress firewall of a sandbox: entry validation on the host, rules applied by a helper container.

The helper runs the sandbox's own image (`python -m ipybox_server.firewall`) as root with NET_ADMIN in
the sandbox's network namespace (`NetworkMode: container:<id>`) and exits; the sandbox container never
holds NET_ADMIN or NET_RAW, so code in it cannot change or bypass the rules. See docs/security.md.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import logging
import re
import tarfile
from typing import Any

import aiodocker

from ipybox._errors import FirewallError
from ipybox._labels import CONTAINER_LABEL, EXECUTOR_PORT, RESOURCE_PORT

logger = logging.getLogger("ipybox.firewall")

HELPER_TIMEOUT = 60.0
"""Seconds the helper may take (it resolves domains, which may wait for DNS timeouts)."""

_LOCKDOWN_FAILED = 3
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
_NUMERIC = re.compile(r"^[0-9.]+$")


def parse_entries(entries: list[str] | None) -> tuple[list[str], list[str]]:
    """Split an allow-list into networks (CIDR strings) and domain names, validating every entry.

    Raises:
        ValueError: an entry is not an IP address, a CIDR range or a domain name; the message names it.
    """
    networks: list[str] = []
    domains: list[str] = []
    for entry in entries or []:
        if not isinstance(entry, str):
            raise ValueError(f"allowed_domains entry {entry!r} is not a string")
        text = entry.strip()
        if not text:
            raise ValueError("allowed_domains has an empty entry")
        if "/" in text or ":" in text or _NUMERIC.match(text):
            try:
                network = ipaddress.ip_network(text, strict=False)
            except ValueError as exc:
                raise ValueError(
                    f"allowed_domains entry {entry!r} is not a valid IP address or CIDR range: {exc}"
                ) from exc
            networks.append(str(network))
        elif _is_domain(text):
            domains.append(text.rstrip(".").lower())
        else:
            raise ValueError(
                f"allowed_domains entry {entry!r} is not a domain name, IPv4 address or CIDR range "
                "(e.g. 'example.org', '203.0.113.7', '198.51.100.0/24')"
            )
    return sorted(set(networks)), sorted(set(domains))


def _is_domain(text: str) -> bool:
    name = text[:-1] if text.endswith(".") else text
    return 0 < len(name) <= 253 and all(_LABEL.match(label) for label in name.split("."))


async def apply(docker: aiodocker.Docker, container: Any, image_id: str, entries: list[str] | None) -> dict[str, Any]:
    """Replace the sandbox's firewall rules with the policy for `entries`; return the helper's summary.

    Raises:
        ValueError: a malformed entry (before any rule changes).
        FirewallError: the rules could not be applied; the sandbox is left blocked.
    """
    networks, domains = parse_entries(entries)
    spec = {
        "networks": networks,
        "domains": domains,
        "resolvers": await _resolvers(container),
        "ports": [EXECUTOR_PORT, RESOURCE_PORT],
    }
    labels = {key: value for key, value in (await container.show())["Config"]["Labels"].items()}
    helper = await docker.containers.create(
        {
            "Image": image_id,
            "User": "0:0",
            "Entrypoint": ["/opt/ipybox/venv/bin/python", "-I", "-m", "ipybox_server.firewall"],
            "Cmd": [json.dumps(spec)],
            "Labels": {**labels, CONTAINER_LABEL: "true"},
            "HostConfig": {
                "NetworkMode": f"container:{container.id}",
                "CapDrop": ["ALL"],
                "CapAdd": ["NET_ADMIN", "NET_RAW"],
            },
        }
    )
    try:
        await helper.start()
        try:
            status = await asyncio.wait_for(helper.wait(), HELPER_TIMEOUT)
        except TimeoutError:
            await helper.kill()
            status = {"StatusCode": -1}
        stdout = "".join(await helper.log(stdout=True))
        stderr = "".join(await helper.log(stderr=True))
    finally:
        await helper.delete(force=True)

    exit_code = status.get("StatusCode", -1)
    for line in stderr.splitlines():
        if line.startswith("warning: "):
            logger.warning("init_firewall: %s", line.removeprefix("warning: "))
    if exit_code != 0:
        if exit_code == _LOCKDOWN_FAILED:
            await _cut_off(docker, container)
        raise FirewallError(
            f"init_firewall failed (helper exit code {exit_code}); the sandbox is left blocked.\n"
            f"{stderr.strip()}\n{stdout.strip()}".strip()
        )
    summary: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return summary


async def _resolvers(container: Any) -> list[str]:
    """The resolvers the sandbox's DNS goes through.

    The nameservers of its /etc/resolv.conf (read through the archive API); and when that is Docker's
    embedded DNS (127.0.0.11, on user-defined networks), also the upstream servers it forwards to:
    dockerd sends those queries from inside the sandbox's network namespace, so the firewall must let
    them out. Docker takes them from the engine host's resolv.conf.
    """
    archive: tarfile.TarFile = await container.get_archive("/etc/resolv.conf")
    member = archive.next()
    data = archive.extractfile(member) if member is not None else None
    resolvers = _nameservers(data.read().decode(errors="replace") if data is not None else "")
    if EMBEDDED_DNS in resolvers:
        resolvers += [server for server in _engine_upstream_servers() if server not in resolvers]
    return resolvers


EMBEDDED_DNS = "127.0.0.11"


def _nameservers(text: str) -> list[str]:
    servers = []
    for line in io.StringIO(text):
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                servers.append(str(ipaddress.ip_address(fields[1].split("%")[0])))
            except ValueError:
                continue
    return servers


def _engine_upstream_servers() -> list[str]:
    """Non-loopback nameservers of this machine (the engine's host when Docker runs locally), as
    Docker picks them: systemd-resolved's upstream list when present, else /etc/resolv.conf."""
    for path in ("/run/systemd/resolve/resolv.conf", "/etc/resolv.conf"):
        try:
            with open(path) as file:
                servers = [s for s in _nameservers(file.read()) if not ipaddress.ip_address(s).is_loopback]
        except OSError:
            continue
        if servers:
            return servers
    return []


async def _cut_off(docker: aiodocker.Docker, container: Any) -> None:
    """Fail closed when not even the lock-down could be applied: disconnect every network."""
    info = await container.show()
    for name in (info.get("NetworkSettings") or {}).get("Networks") or {}:
        try:
            network = await docker.networks.get(name)
            await network.disconnect({"Container": container.id, "Force": True})
        except aiodocker.DockerError as exc:
            logger.error("init_firewall: could not disconnect the sandbox from %s: %s", name, exc.message)
