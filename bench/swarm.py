"""Swarm backend vs the local engine (issue 17): cold start, pool hand-out, sandboxes started per second.

    .venv/bin/python bench/swarm.py                       # starts a 3-node SwarmLab, removes it at the end
    .venv/bin/python bench/swarm.py --lab /tmp/sw/lab.json  # reuses a running lab (manager, engines, ref)

Cold start = `run()` to the first cell answered (a new `ExecutionClient`), kill excluded; median of 5.
Pool acquire = `SandboxPool.acquire()` of a ready sandbox; median of 5. Throughput = 12 sandboxes started
at once with at most 6 starting (as a pool's `max_starting`), wall time until all answered a cell.
Prints a table; figures depend on the machine (this rig: 3 DinD nodes on one 2-core host).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ipybox import DEFAULT_TAG, ExecutionClient, ExecutionContainer, SandboxPool, Swarm  # noqa: E402

RUNS = 5
BURST = 12
MAX_STARTING = 6


async def cold_start(options: dict[str, Any]) -> float:
    container = ExecutionContainer(**options)
    t0 = time.monotonic()
    try:
        await container.run()
        async with ExecutionClient(port=container.executor_port, host=container.host) as client:
            await client.execute("1 + 1")
        return time.monotonic() - t0
    finally:
        await container.kill()


async def pool_acquire(options: dict[str, Any]) -> list[float]:
    times = []
    async with SandboxPool(2, max_starting=2, **options) as pool:
        for _ in range(RUNS):
            await pool.wait_ready(timeout=300)
            t0 = time.monotonic()
            sandbox = await pool.acquire()
            times.append(time.monotonic() - t0)
            await sandbox.close()
    return times


async def burst(options: dict[str, Any]) -> tuple[float, dict[str, int]]:
    slots = asyncio.Semaphore(MAX_STARTING)
    containers: list[ExecutionContainer] = []
    placed: dict[str, int] = {}

    async def one() -> None:
        async with slots:
            container = ExecutionContainer(**options)
            containers.append(container)
            await container.run()
            async with ExecutionClient(port=container.executor_port, host=container.host) as client:
                await client.execute("1 + 1")
            where = container.backend.describe(container) or "local"
            node = where.split("'")[1] if "'" in where else where
            placed[node] = placed.get(node, 0) + 1

    t0 = time.monotonic()
    try:
        await asyncio.gather(*(one() for _ in range(BURST)))
        return time.monotonic() - t0, placed
    finally:
        await asyncio.gather(*(container.kill() for container in containers), return_exceptions=True)


async def bench(manager: str, engines: dict[str, str], ref: str, local_tag: str) -> list[tuple[str, str, str]]:
    swarm = {"tag": ref, "backend": Swarm(manager, engines), "show_pull_progress": False}
    local = {"tag": local_tag, "show_pull_progress": False}
    rows: list[tuple[str, str, str]] = []

    def med(values: list[float]) -> str:
        return f"{1000 * statistics.median(values):.1f} ms (min {1000 * min(values):.1f}, max {1000 * max(values):.1f})"

    async def runs(make: Callable[[], Any]) -> list[float]:
        return [await make() for _ in range(RUNS)]

    await cold_start(swarm)  # warm-up: every node has the image, the first service is created
    rows.append(("cold start, run() to first cell", med(await runs(lambda: cold_start(swarm))), ""))
    rows[-1] = (rows[-1][0], rows[-1][1], med(await runs(lambda: cold_start(local))))
    rows.append(("pool acquire (ready sandbox)", med(await pool_acquire(swarm)), med(await pool_acquire(local))))
    one_node = {**swarm, "backend": Swarm(manager, engines, constraints=["node.hostname==node1"])}
    for label, options in (("1 node (node1)", one_node), ("3 nodes", swarm)):
        wall, placed = await burst(options)
        rows.append((f"{BURST} at once, max {MAX_STARTING} starting, {label}", f"{wall:.1f} s = "
                     f"{BURST / wall:.2f}/s {placed}", ""))  # fmt: skip
    wall, placed = await burst(local)
    rows[-1] = (rows[-1][0], rows[-1][1], f"{wall:.1f} s = {BURST / wall:.2f}/s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lab", help="JSON of a running lab: manager, engines (hostname -> url), ref")
    parser.add_argument("--image", default=os.environ.get("IPYBOX_TEST_IMAGE", DEFAULT_TAG), help="local image")
    args = parser.parse_args()
    lab = None
    if args.lab:
        info = json.loads(Path(args.lab).read_text())
        manager, engines, ref = info["manager"], info["engines"], info["ref"]
    else:
        from tests.swarmlab import SwarmLab

        lab = SwarmLab(base_image=os.environ.get("IPYBOX_BASE_IMAGE", "ipybox/debian-base:bookworm")).start()
        ref = lab.push_image(args.image)
        for name in lab.nodes:  # pulled beforehand: cold starts measure starts, not pulls
            lab.docker("pull", "-q", ref, node=name, timeout=600)
        manager, engines = lab.manager_url, lab.engine_urls
    try:
        rows = asyncio.run(bench(manager, engines, ref, args.image))
    finally:
        if lab is not None:
            lab.close()
    width = max(len(row[0]) for row in rows)
    print(f"{'':{width}}  {'swarm (3 DinD nodes)':44}  local engine")
    for name, on_swarm, on_local in rows:
        print(f"{name:{width}}  {on_swarm:44}  {on_local}")


if __name__ == "__main__":
    main()
