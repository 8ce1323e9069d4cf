"""The Swarm backend without an engine: the service spec translated from a sandbox's options, the options
it refuses, the control-plane ports it protects, and the in-image rules that refuse those ports."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from ipybox import ExecutionContainer, Swarm
from ipybox._image.ipybox_server import firewall
from ipybox._labels import CONTAINER_LABEL

IMAGE = "registry.example:5000/gradion-ai/ipybox:latest"
MANAGER = "tcp://10.0.0.2:2375"


def _spec(swarm: Swarm | None = None, **options: Any) -> dict[str, Any]:
    swarm = swarm or Swarm(MANAGER)
    return swarm.service_spec(ExecutionContainer(tag=IMAGE, backend=swarm, **options))


@pytest.fixture
def spec() -> dict[str, Any]:
    return _spec(
        memory_limit="512m",
        cpu_limit=0.5,
        pids_limit=200,
        open_files_limit=2048,
        tmp_size="64m",
        labels={"team": "t1"},
        env={"FOO": "bar"},
        dns=["10.0.0.53"],
    )


def test_limits(spec: dict[str, Any]) -> None:
    task = spec["task_template"]
    assert task["Resources"]["Limits"] == {"MemoryBytes": 512 * 1024**2, "NanoCPUs": 500_000_000, "Pids": 200}
    assert task["ContainerSpec"]["Ulimits"] == [{"Name": "nofile", "Soft": 2048, "Hard": 2048}]


def test_no_limits_means_none_in_the_spec() -> None:
    limits = _spec(memory_limit=None, cpu_limit=None, pids_limit=None)["task_template"]["Resources"]["Limits"]
    assert limits == {}


def test_tmpfs_mounts_only_for_tmp_dirs_with_size_and_mode(spec: dict[str, Any]) -> None:
    mounts = spec["task_template"]["ContainerSpec"]["Mounts"]
    assert sorted(m["Target"] for m in mounts) == ["/run/lock", "/tmp", "/var/tmp"]
    for mount in mounts:
        assert mount["Type"] == "tmpfs"
        assert mount["TmpfsOptions"] == {"SizeBytes": 64 * 1024**2, "Mode": 0o1777}
    # /app and the home directory stay in the container's layer (tmpfs mounts would be noexec and root-owned).
    with_app = _spec(app_size="128m")["task_template"]["ContainerSpec"]["Mounts"]
    assert not any(m["Target"] in ("/app", "/home/ipybox") for m in with_app)


def test_container_security_and_init(spec: dict[str, Any]) -> None:
    container = spec["task_template"]["ContainerSpec"]
    assert container["CapabilityDrop"] == ["ALL"]
    assert container["Init"] is True
    assert container["Image"] == IMAGE
    assert "CapabilityAdd" not in container and "User" not in container


def test_labels_on_container_and_service() -> None:
    spec = _spec(Swarm(MANAGER, service_labels={"owner": "ops"}), labels={"team": "t1"})
    container_labels = spec["task_template"]["ContainerSpec"]["Labels"]
    assert container_labels["team"] == "t1" and container_labels[CONTAINER_LABEL] == "true"
    assert spec["labels"] == {"owner": "ops", **container_labels}
    assert "owner" not in container_labels


def test_env_waits_for_the_token_and_holds_no_secret(spec: dict[str, Any]) -> None:
    env = spec["task_template"]["ContainerSpec"]["Env"]
    assert env["IPYBOX_TOKEN_WAIT"] == "60"
    assert env["FOO"] == "bar"
    assert not any("TOKEN" in key and key != "IPYBOX_TOKEN_WAIT" for key in env)


def test_dns(spec: dict[str, Any]) -> None:
    assert spec["task_template"]["ContainerSpec"]["DNSConfig"] == {"Nameservers": ["10.0.0.53"]}
    assert "DNSConfig" not in _spec()["task_template"]["ContainerSpec"]


def test_host_mode_ports_without_published_numbers(spec: dict[str, Any]) -> None:
    endpoint = spec["endpoint_spec"]
    assert endpoint["Mode"] == "dnsrr"
    assert sorted(p["TargetPort"] for p in endpoint["Ports"]) == [8888, 8900]
    for port in endpoint["Ports"]:
        assert port["PublishMode"] == "host" and port["Protocol"] == "tcp"
        assert "PublishedPort" not in port


def test_one_replica_no_restart_spread_and_constraints() -> None:
    spec = _spec(Swarm(MANAGER, constraints=["node.labels.sandboxes==true"]))
    assert spec["mode"] == {"Replicated": {"Replicas": 1}}
    task = spec["task_template"]
    assert task["RestartPolicy"]["Condition"] == "none"
    assert task["Placement"]["Constraints"] == ["node.labels.sandboxes==true"]
    assert task["Placement"]["Preferences"] == [{"Spread": {"SpreadDescriptor": "node.id"}}]
    assert "Preferences" not in _spec(Swarm(MANAGER, spread=None))["task_template"]["Placement"]
    assert spec["name"].startswith("ipybox-") and spec["name"] != _spec()["name"]


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"binds": {"/tmp/data": "data"}}, "upload_file"),
        ({"workspace": "ws1"}, "snapshot"),
        ({"network": "mynet"}, "leave network unset"),
        ({"executor_port": 12000}, "leave them unset"),
        ({"resource_port": 12001}, "leave them unset"),
    ],
)
def test_refused_options_name_the_fix(options: dict[str, Any], names: str) -> None:
    with pytest.raises(ValueError, match="swarm") as info:
        ExecutionContainer(tag=IMAGE, backend=Swarm(MANAGER), **options)
    assert names in str(info.value)


def test_manager_must_be_an_engine_address() -> None:
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        Swarm("10.0.0.2:2375")


def test_protected_ports() -> None:
    assert Swarm(MANAGER).protected_ports() == [2375, 2376, 2377, 7946]
    swarm = Swarm("https://10.0.0.2:3376", {"node2": "tcp://10.0.0.3:12375"}, node_engine_port=4375)
    assert swarm.protected_ports() == [2375, 2376, 2377, 3376, 4375, 7946, 12375]
    assert Swarm("unix:///var/run/docker.sock").protected_ports() == [2375, 2376, 2377, 7946]


# -- the in-image rules -------------------------------------------------------------------------------------------

PROTECTED = [2375, 2377, 7946]
TCP_REFUSAL = "-A OUTPUT -p tcp -m multiport --dports 2375,2377,7946 -j REJECT --reject-with tcp-reset"
UDP_REFUSAL = "-A OUTPUT -p udp -m multiport --dports 2375,2377,7946 -j DROP"


@pytest.mark.parametrize("version", [4, 6])
def test_isolation_refuses_protected_ports(version: int) -> None:
    gateway = "172.17.0.1" if version == 4 else "fd00::1"
    document = firewall.isolation(
        version, gateways=[ipaddress.ip_address(gateway)], ports=[8888, 8900], protected=PROTECTED
    )
    lines = document.splitlines()
    assert ":OUTPUT ACCEPT [0:0]" in lines  # no egress firewall: everything else goes out
    assert TCP_REFUSAL in lines and UDP_REFUSAL in lines
    assert lines.index(TCP_REFUSAL) < lines.index("COMMIT")
    unprotected = firewall.isolation(version, gateways=[ipaddress.ip_address(gateway)], ports=[8888, 8900])
    assert "multiport --dports 2375" not in unprotected


@pytest.mark.parametrize("version", [4, 6])
def test_firewall_refuses_protected_ports_before_any_accept(version: int) -> None:
    v4 = version == 4
    document = firewall.rules(
        version,
        allowed=[ipaddress.ip_network("10.0.0.0/8" if v4 else "fd00::/8")],
        host_network=ipaddress.ip_network("172.17.0.0/24" if v4 else "fd01::/64"),
        resolvers=[ipaddress.ip_address("10.0.0.53" if v4 else "fd00::53")],
        gateways=[ipaddress.ip_address("172.17.0.1" if v4 else "fd01::1")],
        ports=[8888, 8900],
        protected=PROTECTED,
    )
    lines = document.splitlines()
    assert TCP_REFUSAL in lines and UDP_REFUSAL in lines
    first_refusal = min(lines.index(TCP_REFUSAL), lines.index(UDP_REFUSAL))
    # Allowed networks, the host's network and resolvers are accepted only after the refusal; before it only
    # loopback and replies to inbound connections.
    accepts = [i for i, line in enumerate(lines) if line.startswith("-A OUTPUT") and line.endswith("-j ACCEPT")]
    before = [lines[i] for i in accepts if i < first_refusal]
    assert before == [
        "-A OUTPUT -o lo -j ACCEPT",
        "-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED --ctdir REPLY -j ACCEPT",
    ]
    assert any(" -d " in lines[i] for i in accepts if i > first_refusal)


def test_main_hands_protected_ports_to_both_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    documents: list[str] = []
    monkeypatch.setattr(firewall, "apply", lambda version, document: documents.append(document))
    monkeypatch.setattr(firewall, "default_gateway", lambda: ipaddress.ip_address("172.17.0.1"))
    monkeypatch.setattr(firewall, "resolve", lambda domains, resolvers: ([], []))
    spec = {"ports": [8888, 8900], "gateways": ["172.17.0.1"], "protected": PROTECTED}
    firewall.main({**spec, "mode": "isolate"})
    assert len(documents) == 2 and all(TCP_REFUSAL in doc for doc in documents)
    documents.clear()
    firewall.main({**spec, "networks": ["10.0.0.0/8"], "domains": [], "resolvers": []})
    assert len(documents) == 4 and all(TCP_REFUSAL in doc for doc in documents)


async def test_a_task_still_preparing_at_the_timeout_names_the_image_pull() -> None:
    from types import SimpleNamespace

    from ipybox._errors import ContainerStartError
    from ipybox._swarm import SwarmPlacement

    async def tasks_list(filters: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"Status": {"State": "preparing", "Message": "preparing"}, "NodeID": "n1"}]

    manager: Any = SimpleNamespace(tasks=SimpleNamespace(list=tasks_list))
    with pytest.raises(ContainerStartError, match="still pulling the image") as info:
        await Swarm(MANAGER)._running_task(manager, SwarmPlacement("id1", "ipybox-abc"), 0)
    assert "startup_timeout=0" in str(info.value) and "ipybox-abc" in str(info.value)


def test_a_missing_image_on_a_swarm_names_the_registry_not_a_local_build() -> None:
    from ipybox import ImageNotFoundError
    from ipybox._swarm import _image_not_found

    error = _image_not_found("reg:5000/ipybox", "node2 could not get image 'reg:5000/ipybox'")
    assert isinstance(error, ImageNotFoundError) and error.tag == "reg:5000/ipybox"
    assert str(error).startswith("node2 could not get image") and "ipybox build" not in str(error)
    assert error.option is not None and "registry" in error.option
    local = ImageNotFoundError("x/y", "not found")
    assert "ipybox build -t x/y" in str(local) and local.option == "ipybox build -t x/y"
