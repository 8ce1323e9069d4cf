"""The swarm rig itself: nodes, registry pulls, host-mode ports, node failure."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

from tests.swarmlab import LABEL, SwarmLab, SwarmLabError, _docker

HTTP_SERVER = ["/opt/ipybox/venv/bin/python", "-m", "http.server", "8000"]


@pytest.fixture
def service(swarm_lab: SwarmLab) -> Iterator[str]:
    """A unique service name; the service is removed afterwards."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    yield name
    try:
        swarm_lab.docker("service", "rm", name)
    except SwarmLabError:
        pass


def running_tasks(lab: SwarmLab, service: str, count: int, timeout: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        ids = lab.docker("service", "ps", "-q", "--filter", "desired-state=running", service).split()
        tasks = [json.loads(lab.docker("inspect", t))[0] for t in ids]
        running = [t for t in tasks if t["Status"]["State"] == "running"]
        if len(running) == count:
            return running
        errors = [t["Status"].get("Err") for t in tasks if t["Status"].get("Err")]
        assert time.monotonic() < deadline, f"{len(running)}/{count} tasks running; errors: {errors}"
        time.sleep(0.2)


def get(url: str, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_three_nodes_ready(swarm_lab: SwarmLab) -> None:
    rows = swarm_lab.docker("node", "ls", "--format", "{{.Hostname}} {{.Status}} {{.Availability}}").splitlines()
    assert sorted(rows) == ["node1 Ready Active", "node2 Ready Active", "node3 Ready Active"]
    assert set(swarm_lab.engine_urls_by_id) == {n.node_id for n in swarm_lab.nodes.values()}
    for name, url in swarm_lab.engine_urls.items():
        assert _docker("info", "-f", "{{.Name}} {{.Swarm.LocalNodeState}}", host=url) == f"{name} active"
        daemon = json.loads(swarm_lab.node_exec(name, "cat", "/etc/docker/daemon.json"))
        assert daemon["no-new-privileges"] is True and daemon["insecure-registries"] == [swarm_lab.registry]


def test_global_service_on_host_ports_pulled_from_the_lab_registry(
    swarm_lab: SwarmLab, swarm_image: str, service: str
) -> None:
    swarm_lab.docker(
        "service", "create", "-d", "--name", service, "--mode", "global", "--restart-condition", "none",
        "--publish", "mode=host,target=8000", swarm_image, *HTTP_SERVER,
    )  # fmt: skip
    tasks = running_tasks(swarm_lab, service, 3)
    by_node = {swarm_lab.node(t["NodeID"]).hostname: t for t in tasks}
    assert set(by_node) == {"node1", "node2", "node3"}
    for name, task in by_node.items():
        (port,) = task["Status"]["PortStatus"]["Ports"]
        assert port["PublishMode"] == "host" and port["TargetPort"] == 8000
        assert port["PublishedPort"] >= 1024  # picked by the node's engine (ephemeral range)
        assert get(f"http://{swarm_lab.node_ips[name]}:{port['PublishedPort']}/") == 200
        # The manager pinned the tag to its registry digest; every node has the image by that digest.
        pinned = task["Spec"]["ContainerSpec"]["Image"]
        assert pinned.startswith(f"{swarm_image}@sha256:")
        digests = swarm_lab.docker("image", "inspect", "-f", "{{json .RepoDigests}}", pinned, node=name)
        assert swarm_lab.registry in digests


def test_stopped_node_goes_down_fast_and_comes_back(swarm_lab: SwarmLab) -> None:
    heartbeat = swarm_lab.docker("info", "-f", "{{.Swarm.Cluster.Spec.Dispatcher.HeartbeatPeriod}}")
    assert heartbeat == "1s"
    swarm_lab.stop_node("node3")
    try:
        down_after = swarm_lab.wait_node_state("node3", state="down", timeout=30)
        assert down_after < 10, f"node3 down only after {down_after:.1f}s"
    finally:
        swarm_lab.start_node("node3")
    swarm_lab.wait_node_state("node3", state="ready", timeout=60)
    assert swarm_lab.node("node3").ip == swarm_lab.node_ips["node3"]


def test_killed_engine_goes_down_and_restarts(swarm_lab: SwarmLab) -> None:
    swarm_lab.kill_engine("node2")
    try:
        assert swarm_lab.wait_node_state("node2", state="down", timeout=30) < 10
    finally:
        swarm_lab.start_engine("node2")
    swarm_lab.wait_node_state("node2", state="ready", timeout=60)


def test_drain_and_activate(swarm_lab: SwarmLab) -> None:
    swarm_lab.drain("node2")
    try:
        assert swarm_lab.docker("node", "inspect", "-f", "{{.Spec.Availability}}", "node2") == "drain"
    finally:
        swarm_lab.activate("node2")
    assert swarm_lab.docker("node", "inspect", "-f", "{{.Spec.Availability}}", "node2") == "active"


def test_close_removes_everything_and_is_idempotent(swarm_lab: SwarmLab) -> None:
    lab = SwarmLab(base_image=swarm_lab.base_image, node_count=1).start()
    lab_filter = f"label=ipybox-test.swarmlab.id={lab.lab_id}"
    assert _docker("ps", "-aq", "--filter", lab_filter)
    lab.close()
    lab.close()
    assert not _docker("ps", "-aq", "--filter", lab_filter)
    assert not _docker("network", "ls", "-q", "--filter", lab_filter)
    assert _docker("ps", "-aq", "--filter", f"label={LABEL}=1")  # the session's lab is untouched
