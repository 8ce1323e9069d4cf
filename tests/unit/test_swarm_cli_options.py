"""`--swarm`/`--node-engine` of ipybox ps, pause, resume and snapshot take: usage errors before any engine."""

from __future__ import annotations

import subprocess
import sys

import pytest


def ipybox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ipybox", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", [["ps"], ["pause", "x"], ["resume", "x"], ["snapshot", "take", "x"]])
def test_node_engine_needs_swarm_and_the_manager_must_be_an_address(command: list[str]) -> None:
    done = ipybox(*command, "--node-engine", "node2=tcp://10.0.0.4:2375")
    assert done.returncode == 2 and "--node-engine needs --swarm MANAGER_URL" in done.stderr
    done = ipybox(*command, "--swarm", "manager.example")
    assert done.returncode == 2 and "give tcp://HOST:PORT" in done.stderr
    done = ipybox(*command, "--swarm", "tcp://10.0.0.2:2375", "--node-engine", "node2")
    assert done.returncode == 2 and "give NAME=URL" in done.stderr
