"""The swarm rig (tests/swarmlab.py) for the Swarm backend's tests (issue 17).

A session starts one 3-node lab with the test image pushed to its registry. Where the rig cannot start
(no engine, not root, no base image, ...) the tests are skipped with the reason, except in CI
(`CI=true`), where that is a failure.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from ipybox import DEFAULT_TAG
from tests.swarmlab import SwarmLab, SwarmLabError, cleanup_stale

TEST_IMAGE = os.environ.get("IPYBOX_TEST_IMAGE", DEFAULT_TAG)
BASE_IMAGE = os.environ.get("IPYBOX_BASE_IMAGE", "ipybox/debian-base:bookworm")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/swarm" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


def _cannot_start(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"the swarm lab could not start: {reason}", pytrace=False)
    pytest.skip(f"the swarm lab could not start: {reason}")


@pytest.fixture(scope="session")
def swarm_lab() -> Iterator[SwarmLab]:
    """A started 3-node SwarmLab with TEST_IMAGE in its registry (see the `swarm_image` fixture)."""
    if os.geteuid() != 0:
        _cannot_start("needs root (Docker-in-Docker nodes)")
    try:
        cleanup_stale()
    except (SwarmLabError, FileNotFoundError) as exc:
        _cannot_start(f"no Docker engine: {exc}")
    lab = SwarmLab(base_image=BASE_IMAGE)
    t0 = time.monotonic()
    try:
        lab.start()
        lab.push_image(TEST_IMAGE)
    except SwarmLabError as exc:
        lab.close()
        _cannot_start(str(exc))
    lab.timings["setup_total"] = time.monotonic() - t0
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="session")
def swarm_image(swarm_lab: SwarmLab) -> str:
    """TEST_IMAGE's reference in the lab registry (e.g. 172.18.0.2:5000/gradion-ai/ipybox:latest)."""
    return swarm_lab.images[TEST_IMAGE]


@pytest.fixture(scope="session")
def swarm_image_pulled(swarm_lab: SwarmLab, swarm_image: str) -> str:
    """`swarm_image`, pulled on every node beforehand (in parallel): starts then take ~1.5 s, not a pull."""
    import concurrent.futures

    def pull(name: str) -> str:
        return swarm_lab.docker("pull", "-q", swarm_image, node=name, timeout=600)

    with concurrent.futures.ThreadPoolExecutor(len(swarm_lab.nodes)) as pool:
        list(pool.map(pull, swarm_lab.nodes))
    return swarm_image
