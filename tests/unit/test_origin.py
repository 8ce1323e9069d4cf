"""`origin.refusal` of the servers: which Host and Origin headers pass (a DNS-rebinding defence).

The server package runs in the container only; `origin` is stdlib-only, so it is imported from the source
tree here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ipybox" / "_image"))

from ipybox_server.origin import allowed_hosts, parse_host, refusal  # noqa: E402

NONE: frozenset[str] = frozenset()


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost:8888",
        "LOCALHOST:1",
        "localhost.",
        "127.0.0.1",
        "127.0.0.1:49153",
        "[::1]",
        "[::1]:8900",
        "::1",
        "10.1.2.3:8888",
        "[2001:db8::1]:80",
        "",
    ],
)
def test_local_names_and_ip_literals_pass(host: str) -> None:
    assert refusal(host, None, NONE) is None


def test_request_without_host_or_origin_passes() -> None:
    assert refusal(None, None, NONE) is None


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:8888",
        "EVIL.example",
        "localhost.evil.example",
        "127.0.0.1.nip.io",
        "sandbox-host",  # a bare name is a domain name too
        "0x7f.0.0.1",  # not an IP literal: browsers would canonicalise it, so it came from elsewhere
    ],
)
def test_foreign_host_is_refused(host: str) -> None:
    reason = refusal(host, None, NONE)
    assert reason is not None and "not allowed" in reason and "IPYBOX_ALLOWED_HOSTS" in reason


@pytest.mark.parametrize(
    "host",
    [
        "localhost,evil.example",  # two Host headers, joined
        "localhost evil.example",
        "localhost:http",
        "localhost:123456",
        "user@localhost",
        "localhost/path",
        "[::1",
        "[::1]x",
        "[localhost]",
        "[127.0.0.1]",
        "a::b::c",
    ],
)
def test_malformed_host_is_refused(host: str) -> None:
    assert refusal(host, None, NONE) == "malformed Host header"


@pytest.mark.parametrize(
    "origin",
    [
        "http://localhost",
        "http://localhost:8888",
        "https://127.0.0.1:49153",
        "http://[::1]:8900",
        "http://192.168.1.20",
        "HTTP://LocalHost:1",
    ],
)
def test_local_origins_pass(origin: str) -> None:
    assert refusal("localhost:8888", origin, NONE) is None


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "https://evil.example:8888",
        "http://localhost.evil.example",
    ],
)
def test_foreign_origin_is_refused_even_with_a_local_host(origin: str) -> None:
    reason = refusal("127.0.0.1:8888", origin, NONE)
    assert reason is not None and "origin host" in reason


@pytest.mark.parametrize(
    "origin",
    ["null", "", "file://", "localhost", "http://localhost/", "http://user@localhost", "http://a,http://b", "*"],
)
def test_opaque_or_malformed_origin_is_refused(origin: str) -> None:
    assert refusal("localhost", origin, NONE) == "cross-origin requests are not allowed"


def test_rebinding_is_refused() -> None:
    # After rebinding, the page's own origin and the Host header both name the attacker's domain.
    assert refusal("evil.example:8888", "http://evil.example:8888", NONE) is not None


def test_listed_names_pass_in_host_and_origin() -> None:
    allowed = allowed_hosts({"IPYBOX_ALLOWED_HOSTS": " sandbox.internal:8888, Build-Box. ,,"})
    assert allowed == {"sandbox.internal", "build-box"}
    assert refusal("sandbox.internal:49153", None, allowed) is None
    assert refusal("BUILD-BOX", "http://build-box:3000", allowed) is None
    assert refusal("other.internal", None, allowed) is not None
    assert refusal("sub.sandbox.internal", None, allowed) is not None  # exact names, no wildcards


def test_allowed_hosts_defaults_to_none() -> None:
    assert allowed_hosts({}) == frozenset()
    assert allowed_hosts({"IPYBOX_ALLOWED_HOSTS": ""}) == frozenset()


@pytest.mark.parametrize("value", ["good.example,bad example", "http://x.example", "*"])
def test_allowed_hosts_rejects_entries_that_are_not_names(value: str) -> None:
    with pytest.raises(ValueError, match="IPYBOX_ALLOWED_HOSTS"):
        allowed_hosts({"IPYBOX_ALLOWED_HOSTS": value})


@pytest.mark.parametrize(
    ("value", "host"),
    [("Example.COM:80", "example.com"), ("[::1]:1", "::1"), ("127.0.0.1:", None), ("-a.example", None)],
)
def test_parse_host(value: str, host: str | None) -> None:
    assert parse_host(value) == host
