"""Which Host and Origin headers the control plane accepts: a defence against DNS rebinding.

A web page can make the browser send requests to the sandbox's ports: directly (its origin is then
foreign) or, after rebinding its own domain name to 127.0.0.1, as if same-origin (the Host header then
names the attacker's domain). ipybox's clients never send an Origin header and name the server by
`localhost`, an IP address, or a name the operator allowed. So a request is refused when

- it carries an Origin header whose host is not allowed (browsers send one on cross-origin requests
  and on every websocket upgrade; `null` and malformed values are refused too), or
- its Host header names a host that is not allowed, or is malformed.

Allowed hosts: `localhost`, any IP-address literal (rebinding needs a domain name), and the names in
`$IPYBOX_ALLOWED_HOSTS` (comma-separated, read once at server start). Ports are ignored, names are
compared case-insensitively and without a trailing dot. A request without a Host header has no name to
rebind and passes. Both servers (gateway and resource server) call `refusal` before checking the token.

Pure and stdlib-only, so it is unit-tested on the host.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping

ALLOWED_HOSTS_ENV = "IPYBOX_ALLOWED_HOSTS"
LOCAL_NAMES = frozenset({"localhost"})

# A DNS name or IPv4 literal as it appears in Host/Origin: no userinfo, path, spaces or commas.
_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?")
_PORT = re.compile(r"[0-9]{1,5}")
_ORIGIN = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<authority>[^/?#@\s]+)")


def parse_host(value: str) -> str | None:
    """The host of a Host header value or URL authority (`name`, `name:port`, `[v6]:port`), normalised.

    Returns the lower-cased name without its port, brackets or trailing dot, or None when the value is
    malformed. A bare IPv6 literal (`::1`), which is not valid in a Host header, is accepted as well.
    """
    value = value.strip().lower()
    if value.startswith("["):
        literal, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and _PORT.fullmatch(rest[1:]))):
            return None
        return literal if _is_ip(literal) and ":" in literal else None
    if value.count(":") > 1:
        return value if _is_ip(value) else None
    name, colon, port = value.partition(":")
    if colon and not _PORT.fullmatch(port):
        return None
    name = name[:-1] if name.endswith(".") else name
    return name if _NAME.fullmatch(name) else None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_allowed(host: str, allowed: Iterable[str] = ()) -> bool:
    """Whether a normalised host (from `parse_host`) may address the servers."""
    return host in LOCAL_NAMES or _is_ip(host) or host in allowed


def refusal(host_header: str | None, origin_header: str | None, allowed: frozenset[str]) -> str | None:
    """Why a request with these Host and Origin headers is refused, or None when it may proceed.

    Args:
        host_header: The Host header; None when absent. Several headers joined by commas are malformed.
        origin_header: The Origin header; None when absent.
        allowed: Extra host names, as returned by `allowed_hosts`.
    """
    if host_header is not None and host_header.strip():
        host = parse_host(host_header)
        if host is None:
            return "malformed Host header"
        if not is_allowed(host, allowed):
            return f"host {host!r} is not allowed (see {ALLOWED_HOSTS_ENV})"
    if origin_header is not None:
        match = _ORIGIN.fullmatch(origin_header.strip().lower())
        origin_host = parse_host(match["authority"]) if match else None
        if origin_host is None:
            return "cross-origin requests are not allowed"
        if not is_allowed(origin_host, allowed):
            return f"origin host {origin_host!r} is not allowed (see {ALLOWED_HOSTS_ENV})"
    return None


def allowed_hosts(environ: Mapping[str, str]) -> frozenset[str]:
    """The extra host names listed in `$IPYBOX_ALLOWED_HOSTS`, normalised (ports dropped).

    Raises:
        ValueError: An entry is not a host name (the server refuses to start rather than guess).
    """
    names = set()
    for entry in environ.get(ALLOWED_HOSTS_ENV, "").split(","):
        if not entry.strip():
            continue
        name = parse_host(entry)
        if name is None:
            raise ValueError(f"{ALLOWED_HOSTS_ENV}: {entry.strip()!r} is not a host name")
        names.add(name)
    return frozenset(names)
