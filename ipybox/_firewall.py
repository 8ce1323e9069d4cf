"""A sandbox's packet filter: its isolation from other containers (at every start) and the egress
firewall (`init_firewall`): inputs computed and validated on the host, rules applied by a helper.

The helper runs the sandbox's own image (`python -m ipybox_server.firewall`) as root with NET_ADMIN in
the sandbox's network namespace (`NetworkMode: container:<id>`) and exits; the sandbox container never
holds NET_ADMIN or NET_RAW, so code in it cannot change or bypass the rules. Everything the helper is
told (gateways, resolvers) comes from the engine's view of the container, never from files in it. See
docs/security.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import json
import logging
import re
import tarfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiodocker
import aiohttp

from ipybox._errors import FirewallError
from ipybox._labels import CONTAINER_LABEL, EXECUTOR_PORT, HELPER_LABEL, HELPER_OF_LABEL, RESOURCE_PORT

logger = logging.getLogger("ipybox.firewall")

HELPER_TIMEOUT = 60.0
"""Seconds the helper may take (it resolves domains, which may wait for DNS timeouts)."""
LOCKED_LINE = "IPYBOX_LOCKED_DOWN"
"""What the helper prints once its lock-down is in place (ipybox_server.firewall.LOCKED_LINE)."""

_TIMED_OUT = -1
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


@dataclass
class _HelperRun:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def locked_down(self) -> bool:
        """Whether the helper confirmed its lock-down (the line it prints once those rules are in)."""
        return LOCKED_LINE in self.stdout.splitlines()

    @property
    def summary(self) -> dict[str, Any] | None:
        lines = self.stdout.strip().splitlines()
        try:
            summary = json.loads(lines[-1]) if lines else None
        except ValueError:
            return None
        return summary if isinstance(summary, dict) else None

    def describe(self) -> str:
        how = "timed out" if self.exit_code == _TIMED_OUT else f"exit code {self.exit_code}"
        output = f"{self.stderr.strip()}\n{self.stdout.strip()}".strip()
        return how + (f"; its output:\n{output}" if output else "")


async def isolate(docker: aiodocker.Docker, container: Any, image_id: str, protected: list[int] | None = None) -> None:
    """Close the sandbox to inbound connections from other containers (run at every start), and to the
    control plane's `protected` ports (a swarm's engine and cluster ports) on every address.

    Raises:
        FirewallError: the rules could not be applied (the caller removes the sandbox).
    """
    info = await container.show()
    spec = {
        "mode": "isolate",
        "gateways": gateways(info),
        "ports": [EXECUTOR_PORT, RESOURCE_PORT],
        "protected": list(protected or []),
    }
    run = await _run_helper(docker, info, image_id, spec)
    if run.exit_code != 0 or run.summary is None:
        raise FirewallError(
            f"could not isolate the sandbox from other containers (firewall helper {run.describe()}); "
            "it is removed. If the image predates this ipybox, rebuild it with `ipybox build`",
            container_id=container.id,
        )


async def apply(
    docker: aiodocker.Docker,
    container: Any,
    image_id: str,
    entries: list[str] | None,
    remove: Callable[[], Awaitable[None]],
    protected: list[int] | None = None,
) -> dict[str, Any]:
    """Replace the sandbox's firewall rules with the policy for `entries`; return the helper's summary.

    Fails closed: when the helper did not confirm its lock-down (it failed to start, was killed, timed
    out, or the engine refused it), the sandbox is disconnected from every network, and when even that
    fails it is removed with `remove`.

    Raises:
        ValueError: a malformed entry (before any rule changes).
        FirewallError: the rules could not be applied; the message says what became of the sandbox.
    """
    networks, domains = parse_entries(entries)
    run: _HelperRun | None = None
    failure = ""
    try:
        info = await container.show()
        spec = {
            "mode": "egress",
            "networks": networks,
            "domains": domains,
            "resolvers": await resolvers(info, container),
            "gateways": gateways(info),
            "ports": [EXECUTOR_PORT, RESOURCE_PORT],
            "protected": list(protected or []),
        }
        run = await _run_helper(docker, info, image_id, spec)
        failure = f"the firewall helper failed ({run.describe()})"
    except (aiodocker.DockerError, OSError, TimeoutError, aiohttp.ClientError, KeyError, ValueError) as exc:
        failure = f"the firewall helper could not run ({_describe(exc)})"
    if run is not None:
        for line in run.stderr.splitlines():
            if line.startswith("warning: "):
                logger.warning("init_firewall: %s", line.removeprefix("warning: "))
        summary = run.summary
        if run.exit_code == 0 and summary is not None:
            return summary
        if run.locked_down:
            raise FirewallError(
                f"init_firewall failed: {failure}. The sandbox is left locked down: it reaches only "
                "loopback and its resolvers (port 53), and still serves this host on its ports",
                container_id=container.id,
            )
    # Nothing confirmed in place: the sandbox may be fully open. Cut it off, or remove it.
    cut_failures = await _cut_off(docker, container)
    if not cut_failures:
        raise FirewallError(
            f"init_firewall failed: {failure}. The sandbox was disconnected from all its networks: it "
            "reaches nothing, and this host reaches it only through its unix sockets (a client on "
            "this machine); kill() it and start a new one",
            container_id=container.id,
        )
    try:
        await remove()
    except Exception as exc:
        raise FirewallError(
            f"init_firewall failed: {failure}; disconnecting the sandbox failed ({'; '.join(cut_failures)}) and so "
            f"did removing it ({exc}): it may still have network access. Remove it: docker rm -f {container.id}",
            container_id=container.id,
        ) from exc
    raise FirewallError(
        f"init_firewall failed: {failure}; disconnecting the sandbox failed ({'; '.join(cut_failures)}), "
        "so it was removed",
        container_id=container.id,
    )


async def _run_helper(
    docker: aiodocker.Docker, info: dict[str, Any], image_id: str, spec: dict[str, Any]
) -> _HelperRun:
    """Run the helper in the sandbox's network namespace; the helper container is always removed."""
    mode = str((info.get("HostConfig") or {}).get("NetworkMode") or "")
    if mode == "host" or mode.startswith("container:"):
        # The helper would join that namespace: the host's own rules, or another container's.
        raise FirewallError(f"the sandbox shares a network namespace ({mode}); refusing to write rules there")
    config: dict[str, Any] = {
        "Image": image_id,
        "User": "0:0",
        "Entrypoint": ["/opt/ipybox/venv/bin/python", "-I", "-m", "ipybox_server.firewall"],
        "Cmd": [json.dumps(spec)],
        "Labels": {CONTAINER_LABEL: "true", HELPER_LABEL: "firewall", HELPER_OF_LABEL: str(info["Id"])},
        "HostConfig": {
            "NetworkMode": f"container:{info['Id']}",
            "CapDrop": ["ALL"],
            "CapAdd": ["NET_ADMIN", "NET_RAW"],
        },
    }
    creating = asyncio.ensure_future(docker.containers.create(config))
    try:
        helper = await asyncio.shield(creating)
    except asyncio.CancelledError:
        # The engine may create the helper anyway: wait for it and remove it, then stop.
        with contextlib.suppress(Exception):
            await (await creating).delete(force=True)
        raise
    try:
        await helper.start()
        try:
            status = await asyncio.wait_for(helper.wait(), HELPER_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(aiodocker.DockerError):
                await helper.kill()
            status = {"StatusCode": _TIMED_OUT}
        stdout = "".join(await helper.log(stdout=True))
        stderr = "".join(await helper.log(stderr=True))
    finally:
        await asyncio.shield(_delete(helper))
    return _HelperRun(int(status.get("StatusCode", -1)), stdout, stderr)


async def _delete(helper: Any) -> None:
    try:
        await helper.delete(force=True)
    except aiodocker.DockerError as exc:
        logger.warning("removing firewall helper %s failed: %s", helper.id[:12], exc.message)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiodocker.DockerError):
        return f"the engine answered HTTP {exc.status}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def gateways(info: dict[str, Any]) -> list[str]:
    """The gateway addresses (the host's side) of the sandbox's networks, IPv4 and IPv6."""
    found: list[str] = []
    for network in ((info.get("NetworkSettings") or {}).get("Networks") or {}).values():
        for key in ("Gateway", "IPv6Gateway"):
            if (address := network.get(key)) and address not in found:
                found.append(str(address))
    return found


async def resolvers(info: dict[str, Any], container: Any) -> list[str]:
    """The resolvers Docker configured for the sandbox, from host-side facts only.

    Never the sandbox's /etc/resolv.conf: a root image owns it, and every nameserver listed there would
    get port 53 (a tunnel to any address). Docker writes it from these facts: the container's `Dns`
    option if given, else the engine host's nameservers (Google's public resolvers when it has none);
    on user-defined networks its embedded DNS (127.0.0.11), which forwards to those same servers from
    inside the sandbox's network namespace. A nameserver the sandbox's file names beyond these (a
    daemon-wide `dns` setting, which the API does not show, or a sandbox's edit) is logged and not
    allowed.
    """
    host_config = info.get("HostConfig") or {}
    upstream = [str(server) for server in host_config.get("Dns") or []] or _engine_upstream_servers()
    mode = str(host_config.get("NetworkMode") or "default")
    if mode in ("default", "bridge"):
        configured = upstream or list(DOCKER_FALLBACK_DNS)
    else:
        configured = [EMBEDDED_DNS, *upstream]
    try:
        listed = await _listed_nameservers(container)
    except (aiodocker.DockerError, tarfile.TarError, OSError) as exc:
        logger.debug("reading the sandbox's resolv.conf failed: %s", exc)
        listed = []
    ignored = [server for server in listed if server not in configured]
    if ignored:
        logger.warning(
            "init_firewall: the sandbox's /etc/resolv.conf names %s, which Docker was not configured with "
            "for it (ExecutionContainer(dns=...)); not allowed",
            ", ".join(ignored),
        )
    return configured


async def _listed_nameservers(container: Any) -> list[str]:
    archive: tarfile.TarFile = await container.get_archive("/etc/resolv.conf")
    member = archive.next()
    data = archive.extractfile(member) if member is not None and member.size < 2**16 else None
    return _nameservers(data.read().decode(errors="replace") if data is not None else "")


EMBEDDED_DNS = "127.0.0.11"
DOCKER_FALLBACK_DNS = ("8.8.8.8", "8.8.4.4")
"""What Docker gives a container on the default bridge when the host has no usable nameserver."""


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


async def _cut_off(docker: aiodocker.Docker, container: Any) -> list[str]:
    """Disconnect the sandbox from every network; return what failed (empty: it is cut off)."""
    failed: list[str] = []
    try:
        info = await container.show()
    except aiodocker.DockerError as exc:
        return [f"inspecting it: {exc.message}"]
    for name in (info.get("NetworkSettings") or {}).get("Networks") or {}:
        try:
            network = await docker.networks.get(name)
            await network.disconnect({"Container": container.id, "Force": True})
        except aiodocker.DockerError as exc:
            failed.append(f"{name}: {exc.message}")
    return failed
