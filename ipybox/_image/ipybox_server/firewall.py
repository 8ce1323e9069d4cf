"""The firewall helper: `python -I -m ipybox_server.firewall SPEC_JSON`.

Runs in a short-lived container that joins a sandbox's network namespace with NET_ADMIN, as root; the
sandbox itself never holds that capability, so its code cannot change what this writes. Steps:

1. Lock down (IPv4 and IPv6): only loopback, replies to inbound connections, and the resolvers on
   port 53 (step 2 needs them). From here on, any failure leaves the sandbox blocked, never open (exit
   3 if even this fails: the host then cuts the sandbox off its networks).
2. Resolve the allowed domains here, inside the sandbox's namespace, with the sandbox's resolver (so
   names only Docker's embedded DNS knows resolve too): all A records. Unresolvable names are skipped
   with a warning.
3. Replace the rule sets atomically (iptables-restore / ip6tables-restore) with the final policy.

SPEC_JSON: {"networks": ["1.2.3.4/32", "10.0.0.0/8", ...], "domains": ["example.org", ...],
"resolvers": ["127.0.0.11", ...], "ports": [8888, 8900]}. Entries were validated on the host.
The last line on stdout is a JSON summary; warnings go to stderr as `warning: ...` lines.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import subprocess
import sys
from collections.abc import Iterable

METADATA = ipaddress.ip_network("169.254.0.0/16")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def default_gateway() -> ipaddress.IPv4Address | None:
    """The IPv4 default gateway of this namespace, from /proc/net/route."""
    with open("/proc/net/route") as routes:
        for line in routes.readlines()[1:]:
            fields = line.split()
            if len(fields) > 2 and fields[1] == "00000000":
                return ipaddress.IPv4Address(struct.pack("<L", int(fields[2], 16)))
    return None


def resolve(domains: Iterable[str]) -> tuple[list[ipaddress.IPv4Network], list[str]]:
    networks, warnings = [], []
    for domain in domains:
        try:
            infos = socket.getaddrinfo(domain, None, socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            warnings.append(f"{domain} does not resolve ({exc}); skipped")
            continue
        for info in infos:
            networks.append(ipaddress.ip_network(f"{info[4][0]}/32"))
    return networks, warnings


def rules(
    version: int,
    *,
    allowed: list[Network],
    host_network: Network | None,
    resolvers: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
    ports: list[int],
) -> str:
    """An iptables-restore document for one address family."""
    icmp_reject = "icmp-admin-prohibited" if version == 4 else "icmp6-adm-prohibited"
    if host_network is not None and host_network.version != version:
        host_network = None
    lines = ["*filter", ":INPUT DROP [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT DROP [0:0]"]
    # Inbound: loopback, replies, the servers' ports (from the host), and the host network.
    lines += ["-A INPUT -i lo -j ACCEPT", "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"]
    if version == 6:  # neighbour discovery, without which no IPv6 packet leaves at all
        lines += [
            f"-A {chain} -p ipv6-icmp --icmpv6-type {kind} -j ACCEPT"
            for chain in ("INPUT", "OUTPUT")
            for kind in ("neighbour-solicitation", "neighbour-advertisement")
        ]
    if ports:
        lines.append(f"-A INPUT -p tcp -m multiport --dports {','.join(map(str, ports))} -j ACCEPT")
    if host_network is not None:
        lines.append(f"-A INPUT -s {host_network} -j ACCEPT")
    # Outbound. Replies to inbound connections only (--ctdir REPLY): a connection the sandbox opened
    # is checked packet by packet, so a new allow-list cuts connections to hosts it no longer names.
    lines += [
        "-A OUTPUT -o lo -j ACCEPT",
        "-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED --ctdir REPLY -j ACCEPT",
    ]
    if version == 4 and not any(network.subnet_of(METADATA) for network in allowed if network.version == 4):
        lines.append(f"-A OUTPUT -d {METADATA} -j REJECT --reject-with {icmp_reject}")
    if host_network is not None:
        lines.append(f"-A OUTPUT -d {host_network} -j ACCEPT")
    for resolver in resolvers:
        if resolver.version == version and not resolver.is_loopback:
            lines += [f"-A OUTPUT -d {resolver} -p {proto} --dport 53 -j ACCEPT" for proto in ("udp", "tcp")]
    lines += [f"-A OUTPUT -d {network} -j ACCEPT" for network in allowed if network.version == version]
    # Reject, not drop: a blocked connection fails at once instead of hanging until a timeout.
    lines += ["-A OUTPUT -p tcp -j REJECT --reject-with tcp-reset", f"-A OUTPUT -j REJECT --reject-with {icmp_reject}"]
    return "\n".join([*lines, "COMMIT", ""])


def apply(version: int, document: str) -> None:
    command = "iptables-restore" if version == 4 else "ip6tables-restore"
    done = subprocess.run([command], input=document, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed ({done.returncode}): {done.stderr.strip()}\n{document}")


def lock_down(ports: list[int], resolvers: list[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> None:
    """Only loopback, replies to inbound connections, and DNS (needed to resolve the allow-list)."""
    for version in (4, 6):
        apply(version, rules(version, allowed=[], host_network=None, resolvers=resolvers, ports=ports))


def main(spec: dict[str, list]) -> dict[str, object]:  # type: ignore[type-arg]
    ports = [int(port) for port in spec.get("ports", [])]
    resolvers, warnings = [], []
    for entry in spec.get("resolvers", []):
        try:
            resolvers.append(ipaddress.ip_address(entry))
        except ValueError:
            warnings.append(f"resolver {entry!r} is not an IP address; not allowed")
    try:
        lock_down(ports, resolvers)
    except (OSError, RuntimeError) as exc:
        print(f"error: could not lock the sandbox down: {exc}", file=sys.stderr)
        raise SystemExit(3) from exc

    allowed: list[Network] = [ipaddress.ip_network(entry, strict=False) for entry in spec.get("networks", [])]
    resolved, resolve_warnings = resolve(spec.get("domains", []))
    allowed += resolved
    warnings += resolve_warnings
    gateway = default_gateway()
    host_network = ipaddress.ip_network(f"{gateway}/24", strict=False) if gateway else None
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for version in (4, 6):
        apply(version, rules(version, allowed=allowed, host_network=host_network, resolvers=resolvers, ports=ports))
    return {
        "allowed": sorted({str(network) for network in allowed}),
        "host_network": str(host_network) if host_network else None,
        "resolvers": [str(resolver) for resolver in resolvers],
        "warnings": warnings,
    }


if __name__ == "__main__":
    try:
        summary = main(json.loads(sys.argv[1]))
    except Exception as exc:  # after the lock-down: report, stay locked down
        print(f"error: {exc!r}", file=sys.stderr)
        raise SystemExit(2) from exc
    print(json.dumps(summary))
