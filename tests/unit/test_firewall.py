import ipaddress

import pytest

from ipybox._firewall import parse_entries
from ipybox._image.ipybox_server import firewall


def test_entries_split_into_networks_and_domains() -> None:
    networks, domains = parse_entries(
        ["203.0.113.7", "198.51.100.0/24", "Example.org", "example.org", "my_server", "10.1.2.3/8", "fd00::/64"]
    )
    assert networks == sorted(["203.0.113.7/32", "198.51.100.0/24", "10.0.0.0/8", "fd00::/64"])
    assert domains == ["example.org", "my_server"]
    assert parse_entries(None) == ([], [])
    assert parse_entries([]) == ([], [])


@pytest.mark.parametrize(
    "entry", ["999.1.1.1", "10.0.0.0/33", "", "  ", "-x", "--flush", "bad domain!", "a..b", "1.2.3"]
)
def test_malformed_entries_raise_value_error_naming_them(entry: str) -> None:
    with pytest.raises(ValueError, match="allowed_domains"):
        parse_entries(["example.org", entry])


def _rules(
    version: int, allowed: list[str], host: str | None = "172.17.0.0/24", resolvers: tuple[str, ...] = ()
) -> str:
    return firewall.rules(
        version,
        allowed=[ipaddress.ip_network(a) for a in allowed],
        host_network=ipaddress.ip_network(host) if host else None,
        resolvers=[ipaddress.ip_address(r) for r in resolvers],
        ports=[8888, 8900],
    )


def test_ipv4_policy() -> None:
    text = _rules(4, ["203.0.113.7/32"], resolvers=("10.255.255.53", "127.0.0.11"))
    lines = text.splitlines()
    assert ":OUTPUT DROP [0:0]" in lines and ":INPUT DROP [0:0]" in lines
    assert "-A OUTPUT -o lo -j ACCEPT" in lines
    # replies to inbound connections only: an outbound connection is checked on every packet
    assert "-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED --ctdir REPLY -j ACCEPT" in lines
    assert "-A OUTPUT -d 172.17.0.0/24 -j ACCEPT" in lines and "-A INPUT -s 172.17.0.0/24 -j ACCEPT" in lines
    assert "-A OUTPUT -d 10.255.255.53 -p udp --dport 53 -j ACCEPT" in lines
    assert not any("127.0.0.11" in line for line in lines)  # loopback resolver: covered by -o lo
    assert "-A OUTPUT -d 203.0.113.7/32 -j ACCEPT" in lines
    assert "-A OUTPUT -d 169.254.0.0/16 -j REJECT --reject-with icmp-admin-prohibited" in lines
    assert lines.index("-A OUTPUT -d 169.254.0.0/16 -j REJECT --reject-with icmp-admin-prohibited") < lines.index(
        "-A OUTPUT -d 172.17.0.0/24 -j ACCEPT"
    )
    assert lines[-3:] == [
        "-A OUTPUT -p tcp -j REJECT --reject-with tcp-reset",
        "-A OUTPUT -j REJECT --reject-with icmp-admin-prohibited",
        "COMMIT",
    ]
    assert not any("--dport 22" in line for line in lines)  # SSH only within the host network


def test_metadata_allowed_only_explicitly() -> None:
    assert "169.254.0.0/16 -j REJECT" in _rules(4, ["0.0.0.0/0"])
    assert "169.254.0.0/16 -j REJECT" not in _rules(4, ["169.254.169.254/32"])


def test_ipv6_policy_has_no_ipv4_entries() -> None:
    text = _rules(6, ["203.0.113.7/32", "fd00::/64"], resolvers=("10.255.255.53",))
    assert "172.17.0.0" not in text and "203.0.113.7" not in text and "10.255.255.53" not in text
    assert "-A OUTPUT -d fd00::/64 -j ACCEPT" in text
    assert "-A OUTPUT -j REJECT --reject-with icmp6-adm-prohibited" in text
    assert "neighbour-solicitation" in text
