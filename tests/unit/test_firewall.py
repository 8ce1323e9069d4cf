import ipaddress

import pytest

from ipybox import _firewall
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
        gateways=[ipaddress.ip_address("172.17.0.1")],
        ports=[8888, 8900],
    )


def test_ipv4_policy() -> None:
    text = _rules(4, ["203.0.113.7/32"], resolvers=("10.255.255.53", "127.0.0.11"))
    lines = text.splitlines()
    assert ":OUTPUT DROP [0:0]" in lines and ":INPUT DROP [0:0]" in lines
    assert "-A OUTPUT -o lo -j ACCEPT" in lines
    # replies to inbound connections only: an outbound connection is checked on every packet
    assert "-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED --ctdir REPLY -j ACCEPT" in lines
    assert "-A OUTPUT -d 172.17.0.0/24 -j ACCEPT" in lines
    # inbound: the host (the gateway), not the rest of its /24, where other sandboxes live
    assert "-A INPUT -s 172.17.0.1 -j ACCEPT" in lines and "-A INPUT -s 172.17.0.0/24 -j ACCEPT" not in lines
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


def test_isolation_admits_only_loopback_replies_the_servers_ports_and_the_host() -> None:
    gateways = [ipaddress.ip_address("172.17.0.1"), ipaddress.ip_address("fd00::1")]
    lines = firewall.isolation(4, gateways=gateways, ports=[8888, 8900]).splitlines()
    assert lines[:4] == ["*filter", ":INPUT DROP [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]"]
    assert lines[4:-1] == [
        "-A INPUT -i lo -j ACCEPT",
        "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        "-A INPUT -p tcp -m multiport --dports 8888,8900 -j ACCEPT",
        "-A INPUT -s 172.17.0.1 -j ACCEPT",
        "-A INPUT -p tcp -j REJECT --reject-with tcp-reset",
        "-A INPUT -j REJECT --reject-with icmp-port-unreachable",
    ]
    v6 = firewall.isolation(6, gateways=gateways, ports=[8888, 8900])
    assert "-A INPUT -s fd00::1 -j ACCEPT" in v6 and "172.17.0.1" not in v6
    assert "icmp6-port-unreachable" in v6 and "neighbour-advertisement" in v6


def _info(mode: str, dns: list[str] | None = None) -> dict[str, object]:
    return {"HostConfig": {"NetworkMode": mode, "Dns": dns}}


class _NoFile:
    async def get_archive(self, path: str) -> object:
        raise OSError("not read in this test")


async def test_resolvers_come_from_the_engine_s_view_never_from_the_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_firewall, "_engine_upstream_servers", lambda: ["10.255.255.53"])
    assert await _firewall.resolvers(_info("default"), _NoFile()) == ["10.255.255.53"]
    assert await _firewall.resolvers(_info("bridge", ["192.0.2.53"]), _NoFile()) == ["192.0.2.53"]
    assert await _firewall.resolvers(_info("lab-net"), _NoFile()) == ["127.0.0.11", "10.255.255.53"]
    assert await _firewall.resolvers(_info("lab-net", ["192.0.2.53"]), _NoFile()) == ["127.0.0.11", "192.0.2.53"]
    monkeypatch.setattr(_firewall, "_engine_upstream_servers", lambda: [])
    assert await _firewall.resolvers(_info("default"), _NoFile()) == ["8.8.8.8", "8.8.4.4"]


def test_gateways_of_every_network() -> None:
    info = {
        "NetworkSettings": {
            "Networks": {
                "bridge": {"Gateway": "172.17.0.1", "IPv6Gateway": ""},
                "lab": {"Gateway": "10.1.0.1", "IPv6Gateway": "fd00:1::1"},
            }
        }
    }
    assert _firewall.gateways(info) == ["172.17.0.1", "10.1.0.1", "fd00:1::1"]
