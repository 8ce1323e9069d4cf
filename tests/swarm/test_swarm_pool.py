"""A 30-sandbox `SandboxPool` on the 3-node rig (issue 17): spread over the nodes, every spare answering;
a node stopped: its spares turn unhealthy within seconds, `acquire()` skips them and the pool refills on
the other nodes; nothing is left once the node is back and the pool closed.

Limits chosen for this 2-core, 24 GB machine: an idle sandbox uses ~100 MB, so 256 MB each; 6 starts at
a time (a start is ~1.5 s of mostly the node's work).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter

from ipybox import SandboxPool, Swarm
from ipybox._swarm import SwarmPlacement
from ipybox.pool import Sandbox
from tests.swarmlab import SwarmLab

LABEL = "ipybox-test.swarm"
SIZE = 30
STOPPED = "node3"  # a worker


def spares(pool: SandboxPool) -> list[Sandbox]:
    """The pool's ready sandboxes, without taking them (its queue's items: a test's peek)."""
    return list(pool._ready._queue)  # type: ignore[attr-defined]


def node_of(sandbox: Sandbox) -> str:
    placement = sandbox.container._placement
    assert isinstance(placement, SwarmPlacement)
    return placement.node_name


def labelled(lab: SwarmLab, marker: str) -> dict[str, int]:
    return {
        name: len(lab.docker("ps", "-aq", "--filter", f"label={LABEL}={marker}", node=name).split())
        for name in lab.nodes
    }


async def test_pool_of_30_spreads_over_3_nodes_and_refills_elsewhere_when_a_node_stops(
    swarm_lab: SwarmLab, swarm_image_pulled: str
) -> None:
    marker = f"t2-pool-{secrets.token_hex(4)}"
    backend = Swarm(swarm_lab.manager_url, swarm_lab.engine_urls)
    pool = SandboxPool(
        SIZE, backend=backend, tag=swarm_image_pulled, memory_limit="256m", max_starting=6, labels={LABEL: marker}
    )
    try:
        t0 = time.monotonic()
        await pool.start()
        await pool.wait_ready(timeout=600)
        filled = time.monotonic() - t0
        ready = spares(pool)
        per_node = Counter(node_of(sandbox) for sandbox in ready)
        print(f"pool of {SIZE} ready in {filled:.1f} s; per node {dict(per_node)}")
        assert len(ready) == SIZE and set(per_node) == set(swarm_lab.nodes)
        assert min(per_node.values()) >= 5, per_node
        results = await asyncio.gather(*(sandbox.client.execute("print(6 * 7)") for sandbox in ready))
        assert [result.text for result in results] == ["42"] * SIZE

        doomed = [sandbox for sandbox in ready if node_of(sandbox) == STOPPED]
        swarm_lab.stop_node(STOPPED)
        t1 = time.monotonic()
        while any(sandbox.healthy() for sandbox in doomed):
            assert time.monotonic() - t1 < 5, "spares on the stopped node still count as healthy"
            await asyncio.sleep(0.05)
        unhealthy = time.monotonic() - t1
        assert all(sandbox.healthy() for sandbox in spares(pool) if node_of(sandbox) != STOPPED)
        down = swarm_lab.wait_node_state(STOPPED, state="down", timeout=10)

        # acquire() hands out healthy sandboxes only: it discards the stopped node's spares on its way.
        t2 = time.monotonic()
        for _ in range(SIZE):
            async with pool.sandbox() as sandbox:
                assert node_of(sandbox) != STOPPED
        acquired = time.monotonic() - t2
        await pool.wait_ready(timeout=300)
        refilled = time.monotonic() - t2
        per_node = Counter(node_of(sandbox) for sandbox in spares(pool))
        print(
            f"stopped {STOPPED}: its {len(doomed)} spares unhealthy after {unhealthy:.2f} s, node down after "
            f"{down + unhealthy:.1f} s; {SIZE} acquired (and closed) in {acquired:.1f} s; "
            f"ready {pool.ready} again after {refilled:.1f} s; per node {dict(per_node)}"
        )
        assert pool.ready == SIZE and STOPPED not in per_node
        assert all(sandbox.healthy() for sandbox in spares(pool))
    finally:
        try:
            await pool.close()
        finally:
            if "is not running" in swarm_lab.node_exec(STOPPED, "true") or swarm_lab.node_state(STOPPED) == "down":
                swarm_lab.start_node(STOPPED)
            swarm_lab.activate(STOPPED)
            swarm_lab.wait_node_state(STOPPED, state="ready")
    # The stopped node's task containers are still there (stopped): swept now that it is back.
    swept = await backend.sweep([f"{LABEL}={marker}"])
    print(f"swept {len(swept)} leftover container(s) on {sorted({node for node, _ in swept})}")
    assert labelled(swarm_lab, marker) == {name: 0 for name in swarm_lab.nodes}
