"""The firewall helper: `python -I -m ipybox_server.firewall SPEC_JSON`.

Runs in a short-lived container that joins a sandbox's network namespace with NET_ADMIN, as root; the
sandbox itself never holds that capability, so its code cannot change what this writes. Two modes:

- `isolate` (every sandbox, at start): inbound, only loopback, replies, the servers' ports and the
  host (the gateways of the sandbox's networks); other containers, other sandboxes included, cannot
  open connections to it. Outbound stays open.
- `egress` (`init_firewall`), in three steps:
  1. Lock down (IPv4 and IPv6): inbound as above; outbound only loopback, replies to inbound
     connections, and the resolvers on port 53 (step 2 needs them). Then LOCKED_LINE goes to stdout:
     from here on any failure leaves the sandbox blocked, never open. Without that line the host
     assumes nothing was applied and cuts the sandbox off its networks.
  2. Resolve the allowed domains through the resolvers in the spec, with DNS queries only (never
     /etc/hosts or /etc/resolv.conf, which a root sandbox can write): all A records. Unresolvable
     names are skipped with a warning.
  3. Replace the rule sets atomically (iptables-restore / ip6tables-restore) with the final policy.

SPEC_JSON: {"mode": "egress", "networks": ["1.2.3.4/32", ...], "domains": ["example.org", ...],
"resolvers": ["127.0.0.11", ...], "gateways": ["172.17.0.1", ...], "ports": [8888, 8900]}. Every
entry was computed or validated on the host. The last line on stdout is a JSON summary; warnings go to
stderr as `warning: ...` lines.
"""

from __future__ import annotations

import ipaddress
import json
import struct
import subprocess
import sys
from collections.abc import Iterable

METADATA = ipaddress.ip_network("169.254.0.0/16")
LOCKED_LINE = "IPYBOX_LOCKED_DOWN"
DNS_TIMEOUT = 5.0
"""Seconds one name may take to resolve, over all resolvers."""
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def default_gateway() -> ipaddress.IPv4Address | None:
    """The IPv4 default gateway of this namespace, from /proc/net/route (kernel state: routes need
    NET_ADMIN, which the sandbox lacks)."""
    with open("/proc/net/route") as routes:
        for line in routes.readlines()[1:]:
            fields = line.split()
            if len(fields) > 2 and fields[1] == "00000000":
                return ipaddress.IPv4Address(struct.pack("<L", int(fields[2], 16)))
    return None


def resolve(domains: Iterable[str], resolvers: list[Address]) -> tuple[list[ipaddress.IPv4Network], list[str]]:
    """All A records of each domain, asked of `resolvers` directly.

    Docker's embedded DNS (127.0.0.11) alone when it is one of them: it knows the names of containers
    on the sandbox's networks and forwards every other name upstream itself.
    """
    import dns.exception
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=False)
    servers = [str(address) for address in resolvers]
    resolver.nameservers = ["127.0.0.11"] if "127.0.0.11" in servers else servers
    resolver.lifetime = DNS_TIMEOUT
    networks: list[ipaddress.IPv4Network] = []
    warnings: list[str] = []
    for domain in domains:
        if not resolver.nameservers:
            warnings.append(f"{domain} not resolved: the sandbox has no resolver; skipped")
            continue
        try:
            answer = resolver.resolve(domain, "A", search=False)
        except dns.exception.DNSException as exc:
            warnings.append(f"{domain} does not resolve ({exc}); skipped")
            continue
        networks += [ipaddress.IPv4Network(f"{record.address}/32") for record in answer]
    return networks, warnings


def inbound_rules(version: int, *, gateways: list[Address], ports: list[int]) -> list[str]:
    """INPUT: loopback, replies, the servers' ports and the host; everything else is refused at once.

    Other containers, other sandboxes among them, can reach only the token-protected ports: a cell's
    server in one sandbox is out of reach of every other sandbox on the same bridge.
    """
    lines = ["-A INPUT -i lo -j ACCEPT", "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"]
    if version == 6:  # neighbour discovery, without which no IPv6 packet leaves at all
        lines += [
            f"-A INPUT -p ipv6-icmp --icmpv6-type {kind} -j ACCEPT"
            for kind in ("neighbour-solicitation", "neighbour-advertisement")
        ]
    if ports:
        lines.append(f"-A INPUT -p tcp -m multiport --dports {','.join(map(str, ports))} -j ACCEPT")
    lines += [f"-A INPUT -s {gateway} -j ACCEPT" for gateway in gateways if gateway.version == version]
    unreachable = "icmp-port-unreachable" if version == 4 else "icmp6-port-unreachable"
    return [
        *lines,
        "-A INPUT -p tcp -j REJECT --reject-with tcp-reset",
        f"-A INPUT -j REJECT --reject-with {unreachable}",
    ]


def protected_rules(protected: list[int]) -> list[str]:
    """OUTPUT: the control plane's ports (a swarm's node engines and cluster ports) refused on every
    address, before anything is allowed: a cell must not reach an engine API that a misconfigured node
    exposes without client certificates, whatever the allow-list says."""
    if not protected:
        return []
    ports = ",".join(map(str, protected))
    return [
        f"-A OUTPUT -p tcp -m multiport --dports {ports} -j REJECT --reject-with tcp-reset",
        f"-A OUTPUT -p udp -m multiport --dports {ports} -j DROP",
    ]


def isolation(version: int, *, gateways: list[Address], ports: list[int], protected: list[int] = []) -> str:  # noqa: B006
    """An iptables-restore document for a sandbox without an egress firewall."""
    lines = ["*filter", ":INPUT DROP [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += inbound_rules(version, gateways=gateways, ports=ports)
    lines += protected_rules(protected)
    return "\n".join([*lines, "COMMIT", ""])


def rules(
    version: int,
    *,
    allowed: list[Network],
    host_network: Network | None,
    resolvers: list[Address],
    gateways: list[Address],
    ports: list[int],
    protected: list[int] = [],  # noqa: B006
) -> str:
    """An iptables-restore document for one address family, egress firewall on."""
    icmp_reject = "icmp-admin-prohibited" if version == 4 else "icmp6-adm-prohibited"
    if host_network is not None and host_network.version != version:
        host_network = None
    lines = ["*filter", ":INPUT DROP [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT DROP [0:0]"]
    lines += inbound_rules(version, gateways=gateways, ports=ports)
    # Outbound. Replies to inbound connections only (--ctdir REPLY): a connection the sandbox opened
    # is checked packet by packet, so a new allow-list cuts connections to hosts it no longer names.
    lines += [
        "-A OUTPUT -o lo -j ACCEPT",
        "-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED --ctdir REPLY -j ACCEPT",
        *protected_rules(protected),
    ]
    if version == 6:
        lines += [
            f"-A OUTPUT -p ipv6-icmp --icmpv6-type {kind} -j ACCEPT"
            for kind in ("neighbour-solicitation", "neighbour-advertisement")
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
    # By absolute path: PATH starts with the user environment's bin, which is not the firewall's to trust.
    command = "/usr/sbin/iptables-restore" if version == 4 else "/usr/sbin/ip6tables-restore"
    done = subprocess.run([command], input=document, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed ({done.returncode}): {done.stderr.strip()}\n{document}")


def addresses(entries: Iterable[str], what: str, warnings: list[str]) -> list[Address]:
    found = []
    for entry in entries:
        try:
            found.append(ipaddress.ip_address(entry))
        except ValueError:
            warnings.append(f"{what} {entry!r} is not an IP address; ignored")
    return found


def main(spec: dict[str, list]) -> dict[str, object]:  # type: ignore[type-arg]
    ports = [int(port) for port in spec.get("ports", [])]
    protected = [int(port) for port in spec.get("protected", [])]
    warnings: list[str] = []
    gateways = addresses(spec.get("gateways", []), "gateway", warnings)
    if spec.get("mode") == "isolate":
        for version in (4, 6):
            apply(version, isolation(version, gateways=gateways, ports=ports, protected=protected))
        return {"isolated": True, "gateways": [str(gateway) for gateway in gateways]}

    resolvers = addresses(spec.get("resolvers", []), "resolver", warnings)
    for version in (4, 6):  # the lock-down: inbound as always, outbound only DNS
        apply(
            version,
            rules(
                version,
                allowed=[],
                host_network=None,
                resolvers=resolvers,
                gateways=gateways,
                ports=ports,
                protected=protected,
            ),
        )
    print(LOCKED_LINE, flush=True)

    allowed: list[Network] = [ipaddress.ip_network(entry, strict=False) for entry in spec.get("networks", [])]
    resolved, resolve_warnings = resolve(spec.get("domains", []), resolvers)
    allowed += resolved
    warnings += resolve_warnings
    gateway = default_gateway()
    host_network = ipaddress.ip_network(f"{gateway}/24", strict=False) if gateway else None
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for version in (4, 6):
        apply(
            version,
            rules(
                version,
                allowed=allowed,
                host_network=host_network,
                resolvers=resolvers,
                gateways=gateways,
                ports=ports,
                protected=protected,
            ),
        )
    return {
        "allowed": sorted({str(network) for network in allowed}),
        "host_network": str(host_network) if host_network else None,
        "resolvers": [str(resolver) for resolver in resolvers],
        "warnings": warnings,
    }


if __name__ == "__main__":
    try:
        summary = main(json.loads(sys.argv[1]))
    except Exception as exc:  # the host reads LOCKED_LINE (or its absence) to know what is in place
        print(f"error: {exc!r}", file=sys.stderr)
        raise SystemExit(2) from exc
    print(json.dumps(summary))
