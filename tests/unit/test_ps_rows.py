"""`ipybox ps` rows (ipybox._attach): what a container's inspection becomes (no Docker needed)."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from ipybox._attach import _row, cgroup_memory, table
from ipybox._labels import CONTAINER_LABEL


class FakeContainer:
    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info

    async def show(self) -> dict[str, Any]:
        return self.info


def inspection(pid: int) -> dict[str, Any]:
    return {
        "Id": "f" * 64,
        "Name": "/ipybox-elsewhere",
        "Config": {"Labels": {CONTAINER_LABEL: "true"}, "Image": "gradion-ai/ipybox"},
        "State": {"Status": "exited", "Running": False, "Paused": False, "Pid": pid},
        "NetworkSettings": {"Ports": {}},
    }


async def test_a_pid_of_another_engine_is_not_read_as_this_hosts_process() -> None:
    # Before: the memory of whatever local process had that pid (here: this test's own) was shown for a
    # remote engine's or a swarm node's container.
    assert cgroup_memory(os.getpid()) is not None  # this host can read it: the check below means something
    row = await _row(FakeContainer(inspection(os.getpid())), datetime.now(UTC))
    assert row is not None and row.memory is None


async def test_a_swarm_row_carries_its_node_and_the_table_shows_it() -> None:
    row = await _row(FakeContainer(inspection(0)), datetime.now(UTC), "node2", "10.0.0.4")
    assert row is not None and (row.node, row.host) == ("node2", "10.0.0.4")
    lines = table([row]).splitlines()
    assert lines[0].split()[-1] == "NODE" and lines[1].split()[-1] == "node2"
    local = await _row(FakeContainer(inspection(0)), datetime.now(UTC))
    assert local is not None and "NODE" not in table([local])
