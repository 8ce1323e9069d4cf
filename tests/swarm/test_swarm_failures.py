"""Node failures on the 3-node rig (issue 17): clients get an error naming the node within seconds, never a
hang; nothing is left behind once the node returns (`Swarm.sweep`, `ipybox cleanup --swarm`); a missing
image fails fast.

Each test puts the nodes it touched back (started, engine up, active, Ready) in `finally`.
Sandboxes carry `ipybox-test.swarm=t2-<marker>` and are killed by the `sandboxes` fixture.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ipybox import ExecutionContainer, ImageNotFoundError, Swarm
from ipybox._errors import ExecutionOutcomeUnknownError, ServerConnectionError
from ipybox._labels import CONTAINER_LABEL
from ipybox._swarm import SwarmPlacement
from ipybox.pool import Sandbox, start_sandbox
from tests.swarmlab import SwarmLab, SwarmLabError

LABEL = "ipybox-test.swarm"
NODE = "node2"  # a worker: stopping it never touches the manager's quorum
LOST = (ExecutionOutcomeUnknownError, ServerConnectionError, TimeoutError)


@pytest.fixture
def marker() -> str:
    return f"t2-{secrets.token_hex(4)}"


@pytest.fixture
async def sandboxes(swarm_lab: SwarmLab, swarm_image_pulled: str, marker: str) -> AsyncIterator[list[Sandbox]]:
    """Sandboxes started by the test (append them); closed afterwards, their services removed."""
    made: list[Sandbox] = []
    yield made
    await asyncio.gather(*(sandbox.close() for sandbox in made), return_exceptions=True)
    await Swarm(swarm_lab.manager_url, swarm_lab.engine_urls).remove_all([f"{LABEL}={marker}"])


async def start_on(lab: SwarmLab, image: str, marker: str, node: str | None, made: list[Sandbox]) -> Sandbox:
    constraints = [f"node.hostname=={node}"] if node else []
    backend = Swarm(lab.manager_url, lab.engine_urls, constraints=constraints)
    options: dict[str, Any] = {"tag": image, "backend": backend, "labels": {LABEL: marker}, "memory_limit": "512m"}
    sandbox = await start_sandbox(options)
    made.append(sandbox)
    return sandbox


def node_of(sandbox: Sandbox) -> str:
    placement = sandbox.container._placement
    assert isinstance(placement, SwarmPlacement)
    return placement.node_name


def containers_on(lab: SwarmLab, node: str, marker: str) -> list[str]:
    return lab.docker(
        "ps", "-a", "--format", "{{.ID}} {{.Status}}", "--filter", f"label={LABEL}={marker}", node=node
    ).splitlines()


def services(lab: SwarmLab, marker: str) -> list[str]:
    return lab.docker("service", "ls", "-q", "--filter", f"label={LABEL}={marker}").split()


async def lost_within(cell: asyncio.Task[Any], sandbox: Sandbox, seconds: float) -> tuple[BaseException, float, float]:
    """Waits for the running cell to fail; returns its error, when the sandbox went unhealthy and when it failed."""
    t0 = time.monotonic()
    unhealthy = -1.0
    while not cell.done():
        if unhealthy < 0 and not sandbox.healthy():
            unhealthy = time.monotonic() - t0
        assert time.monotonic() - t0 < seconds, f"the client still waits after {seconds} s (unhealthy at {unhealthy})"
        await asyncio.sleep(0.05)
    error = cell.exception()
    assert error is not None, "the cell finished although its node went away"
    return error, unhealthy, time.monotonic() - t0


async def assert_next_execute_fails_at_once(sandbox: Sandbox, node: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(LOST) as caught:
        await sandbox.client.execute("1", timeout=30)
    assert time.monotonic() - t0 < 2
    assert f"swarm node {node!r}" in str(caught.value)


def restore(lab: SwarmLab, node: str) -> None:
    """The node started, its engine up, active and Ready (whatever the test did to it)."""
    inspect = ["docker", "inspect", "-f", "{{.State.Running}}", lab.node(node).container]
    if subprocess.run(inspect, capture_output=True, text=True).stdout.strip() != "true":
        lab.start_node(node)
    else:
        try:
            lab.docker("version", node=node, timeout=5)
        except SwarmLabError:
            lab.start_engine(node)
    lab.activate(node)
    lab.wait_node_state(node, state="ready")


async def test_stopped_node_fails_the_running_cell_naming_the_node_and_leaves_nothing_once_back(
    swarm_lab: SwarmLab, swarm_image_pulled: str, marker: str, sandboxes: list[Sandbox]
) -> None:
    sandbox = await start_on(swarm_lab, swarm_image_pulled, marker, NODE, sandboxes)
    cell = asyncio.ensure_future(sandbox.client.execute("import time; time.sleep(300)", timeout=600))
    await asyncio.sleep(0.5)
    try:
        swarm_lab.stop_node(NODE)  # power loss: the node's kernel closes the sockets (EOF at once)
        error, unhealthy, failed = await lost_within(cell, sandbox, 20)
        print(f"stopped node: unhealthy after {unhealthy:.2f} s, cell failed after {failed:.2f} s: {error!r}")
        assert 0 <= unhealthy < 2
        assert isinstance(error, LOST)
        assert f"swarm node {NODE!r}" in str(error) and sandbox.container.host in str(error)
        await assert_next_execute_fails_at_once(sandbox, NODE)

        swarm_lab.wait_node_state(NODE, state="down", timeout=10)
        t0 = time.monotonic()
        await sandbox.close()  # the service goes via the manager; the container cannot (its node is down)
        assert time.monotonic() - t0 < 10, "kill() waited for the engine of a node that is down"
        assert services(swarm_lab, marker) == []

        swarm_lab.start_node(NODE)
        swarm_lab.wait_node_state(NODE, state="ready")
        left = containers_on(swarm_lab, NODE, marker)
        print(f"left on {NODE} when it returned: {left}")  # fact 7: the task's container, Exited (255)
        swept = await Swarm(swarm_lab.manager_url, swarm_lab.engine_urls).sweep([f"{LABEL}={marker}"])
        assert {node for node, _ in swept} <= {NODE}
        assert containers_on(swarm_lab, NODE, marker) == []
    finally:
        restore(swarm_lab, NODE)


async def test_drained_node_fails_its_sandboxes_cells_and_new_sandboxes_go_elsewhere(
    swarm_lab: SwarmLab, swarm_image_pulled: str, marker: str, sandboxes: list[Sandbox]
) -> None:
    sandbox = await start_on(swarm_lab, swarm_image_pulled, marker, NODE, sandboxes)
    cell = asyncio.ensure_future(sandbox.client.execute("import time; time.sleep(300)", timeout=600))
    await asyncio.sleep(0.5)
    try:
        swarm_lab.drain(NODE)  # the swarm shuts the node's tasks down (restart condition none: no new task)
        error, unhealthy, failed = await lost_within(cell, sandbox, 20)
        print(f"drained node: unhealthy after {unhealthy:.2f} s, cell failed after {failed:.2f} s: {error!r}")
        assert isinstance(error, LOST)
        assert f"swarm node {NODE!r}" in str(error)
        await assert_next_execute_fails_at_once(sandbox, NODE)

        others = await asyncio.gather(
            *(start_on(swarm_lab, swarm_image_pulled, marker, None, sandboxes) for _ in range(3))
        )
        assert NODE not in {node_of(other) for other in others}
        for other in others:
            assert (await other.client.execute("print(6 * 7)")).text == "42"

        await sandbox.close()
        assert containers_on(swarm_lab, NODE, marker) == []
    finally:
        restore(swarm_lab, NODE)


async def test_killed_engine_keeps_the_sandbox_until_the_engine_returns_then_fails_it_naming_the_node(
    swarm_lab: SwarmLab, swarm_image_pulled: str, marker: str, sandboxes: list[Sandbox]
) -> None:
    """An engine crash is not a node's loss: the task's processes run on under containerd, and its client
    keeps working; the manager marks the node down and the task's desired state `shutdown`, which the
    node's agent carries out when its engine is back: then the client gets its error, naming the node."""
    sandbox = await start_on(swarm_lab, swarm_image_pulled, marker, NODE, sandboxes)
    try:
        swarm_lab.kill_engine(NODE)
        swarm_lab.wait_node_state(NODE, state="down", timeout=15)
        assert (await sandbox.client.execute("print(6 * 7)", timeout=10)).text == "42"
        cell = asyncio.ensure_future(sandbox.client.execute("import time; time.sleep(300)", timeout=600))
        await asyncio.sleep(0.5)
        assert not cell.done()

        swarm_lab.start_engine(NODE)
        error, unhealthy, failed = await lost_within(cell, sandbox, 30)
        print(f"engine back: unhealthy after {unhealthy:.2f} s, cell failed after {failed:.2f} s: {error!r}")
        assert isinstance(error, LOST)
        assert f"swarm node {NODE!r}" in str(error)
        await assert_next_execute_fails_at_once(sandbox, NODE)
        await sandbox.close()
        swarm_lab.wait_node_state(NODE, state="ready")
        await Swarm(swarm_lab.manager_url, swarm_lab.engine_urls).sweep([f"{LABEL}={marker}"])
        assert containers_on(swarm_lab, NODE, marker) == []
        assert services(swarm_lab, marker) == []
    finally:
        restore(swarm_lab, NODE)


async def test_missing_image_fails_fast_naming_the_registry_fix_and_leaves_no_service(
    swarm_lab: SwarmLab, marker: str
) -> None:
    container = ExecutionContainer(
        tag=f"{swarm_lab.registry}/nope:latest",
        backend=Swarm(swarm_lab.manager_url, swarm_lab.engine_urls),
        labels={LABEL: marker},
        show_pull_progress=False,
    )
    t0 = time.monotonic()
    with pytest.raises(ImageNotFoundError) as caught:
        await container.run()
    elapsed = time.monotonic() - t0
    print(f"missing image: {elapsed:.2f} s: {caught.value}")
    assert elapsed < 10
    message = str(caught.value)
    assert "push it to a registry every node can reach" in message and "nope" in message
    assert "ipybox build" not in message  # the local fix, which does not help the nodes
    assert services(swarm_lab, marker) == []


def cleanup_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ipybox", "cleanup", *args], capture_output=True, text=True, timeout=120
    )


def leftover(lab: SwarmLab, node: str, image: str, marker: str) -> str:
    """A stopped ipybox task container whose service is gone, on `node`: what a node keeps when its agent
    does not remove a task's container (it usually does, ~1 s after it is back, once the service is gone)."""
    labels = [f"{CONTAINER_LABEL}=1", f"{LABEL}={marker}", "com.docker.swarm.service.id=gone0000000000000000000000"]
    return lab.docker("create", *(arg for label in labels for arg in ("--label", label)), image, "true", node=node)


async def test_cleanup_swarm_removes_services_and_leftover_containers_on_every_node(
    swarm_lab: SwarmLab, swarm_image_pulled: str, marker: str, sandboxes: list[Sandbox]
) -> None:
    await asyncio.gather(*(start_on(swarm_lab, swarm_image_pulled, marker, None, sandboxes) for _ in range(3)))
    # Another test's sandbox and leftover (another label) survive a cleanup filtered by this test's label.
    other = f"{marker}-other"
    bystander = await start_on(swarm_lab, swarm_image_pulled, other, None, sandboxes)
    spared = leftover(swarm_lab, "node3", swarm_image_pulled, other)
    left = {node: leftover(swarm_lab, node, swarm_image_pulled, marker) for node in ("node2", "node3")}
    try:
        engines = [f"--node-engine={name}={url}" for name, url in swarm_lab.engine_urls.items()]
        t0 = time.monotonic()
        done = cleanup_cli("--swarm", swarm_lab.manager_url, *engines, "--label", f"{LABEL}={marker}")
        print(f"cleanup --swarm took {time.monotonic() - t0:.1f} s:\n{done.stderr}")
        assert done.returncode == 0, done.stderr
        assert done.stderr.count("removed service ipybox-") == 3
        for node, container_id in left.items():
            assert f"removed leftover container {container_id[:12]} on node {node}" in done.stderr
        assert services(swarm_lab, marker) == []
        for name in swarm_lab.nodes:
            assert containers_on(swarm_lab, name, marker) == []
        assert (await bystander.client.execute("print(1)")).text == "1"
        assert len(services(swarm_lab, other)) == 1
        assert [line.split()[0] for line in containers_on(swarm_lab, "node3", other)].count(spared[:12]) == 1
    finally:
        swarm_lab.docker("rm", "-f", spared, node="node3")


def test_cleanup_swarm_with_an_unreachable_manager_names_it() -> None:
    url = "tcp://127.0.0.1:9"  # discard: nothing listens
    done = cleanup_cli("--swarm", url)
    assert done.returncode == 1
    assert url in done.stderr and "error" in done.stderr
    wrong = cleanup_cli("--label", "a=b")
    assert wrong.returncode == 2 and "--swarm" in wrong.stderr
