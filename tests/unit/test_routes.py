"""Direct routes around docker-proxy are recorded only for bridges this host is part of."""

from __future__ import annotations

from ipybox import _routes


def _info(address: str, gateway: str) -> dict[str, object]:
    return {"NetworkSettings": {"Networks": {"bridge": {"IPAddress": address, "Gateway": gateway}}}}


def test_a_bridge_with_a_local_gateway_gives_the_container_address() -> None:
    # 127.0.0.1 stands in for a bridge gateway: it is an address of this host.
    assert _routes.local_container_address(_info("172.17.0.5", "127.0.0.1")) == "172.17.0.5"


def test_a_gateway_that_is_not_a_local_address_gives_nothing() -> None:
    # TEST-NET-3: never an address of this host. Binding to it fails locally; nothing is sent.
    assert _routes.local_container_address(_info("172.17.0.5", "203.0.113.1")) is None


def test_no_network_or_no_address_gives_nothing() -> None:
    assert _routes.local_container_address({}) is None
    assert _routes.local_container_address(_info("", "127.0.0.1")) is None
    assert _routes.local_container_address(_info("172.17.0.5", "")) is None
    assert _routes.local_container_address(_info("172.17.0.5", "not-an-address")) is None


def test_record_lookup_and_forget_by_loopback_name() -> None:
    _routes.record("127.0.0.1", {8888: 40001, 8900: 40002}, _info("172.17.0.9", "127.0.0.1"))
    try:
        # A client that names the host "localhost" finds the route of a container published on 127.0.0.1.
        assert _routes.direct_url("localhost", 40001, 8888) == "http://172.17.0.9:8888"
        assert _routes.direct_url("127.0.0.1", 40002, 8900) == "http://172.17.0.9:8900"
        assert _routes.direct_url("localhost", 40001, 8900) is None
    finally:
        _routes.forget("127.0.0.1", [40001, 40002])
    assert _routes.direct_url("localhost", 40001, 8888) is None


def test_a_socket_route_is_used_only_while_its_pid_belongs_to_the_container(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os

    # This test process stands in for the container's init: its root is "/", so the socket path is
    # looked up as /proc/<pid>/root<path>.
    socket_file = tmp_path / "executor.sock"
    socket_file.write_text("")
    cgroup = open(f"/proc/{os.getpid()}/cgroup").read()
    name = next((part for part in cgroup.replace("\n", "/").split("/") if len(part) >= 12), None)
    info = {"Id": name or "no-such-container-id", "State": {"Pid": os.getpid()}}
    _routes.record("127.0.0.1", {8888: 40011}, info, {8888: str(socket_file)})
    try:
        if name is not None:
            assert _routes.unix_socket("localhost", 40011, 8888) == f"/proc/{os.getpid()}/root{socket_file}"
        # A pid whose cgroup does not name the container (reused by another process): no route.
        _routes._sockets[(("localhost", 40011), 8888)] = (str(socket_file), os.getpid(), "0" * 64)
        assert _routes.unix_socket("localhost", 40011, 8888) is None
    finally:
        _routes.forget("127.0.0.1", [40011])
    assert _routes.unix_socket("localhost", 40011, 8888) is None
