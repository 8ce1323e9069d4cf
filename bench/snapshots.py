"""Snapshot, restore and fork figures (issue 16 targets: snapshot and restore each <= 2 s, fork(4) <= 3 s).

    .venv/bin/python bench/snapshots.py [--tag TAG] [--runs 3] [--app-mb 100] [--df-mb 50] [--forks 4]

One sandbox with `--app-mb` of random files in /app and a DataFrame of `--df-mb` (float64 columns) in
its namespace. Measured, `--runs` times each, medians (min-max):
- snapshot(): capture in the kernel + pickle and /app tar out + seal (hashes, HMAC);
- restore() into a fresh container (the container start included), checked;
- SandboxPool.restore() into a pooled sandbox;
- SandboxPool(size=forks).fork(snapshot, forks), the refill held back while the restores run.
Snapshots go to a temp directory with a temp key (IPYBOX_SNAPSHOT_KEY_FILE). Needs a Docker engine and
the image. The machine's load average is printed: these figures move with it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from ipybox import DEFAULT_TAG, ExecutionClient, ExecutionContainer, SandboxPool
from ipybox.snapshot import Snapshot, restore, snapshot

MB = 1_000_000

SETUP = """
import os
import numpy as np, pandas as pd
rows = {df_bytes} // 8 // 4
df = pd.DataFrame({{c: np.random.default_rng(0).random(rows) for c in "abcd"}})
os.makedirs("/app/files", exist_ok=True)
for i in range({app_mb}):
    with open(f"/app/files/{{i:04}}.bin", "wb") as out:
        out.write(os.urandom(1_000_000))
def f(x):
    return x * 2
print(int(df.memory_usage().sum()))
"""
CHECK = "print(df.shape[0] > 0, f(2), len(os.listdir('/app/files')))"


def figure(name: str, values: list[float]) -> None:
    print(f"{name:<44} {statistics.median(values):7.3f} s  ({min(values):.3f}-{max(values):.3f}, n={len(values)})")


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="ipybox-bench-snap-"))
    os.environ.setdefault("IPYBOX_SNAPSHOT_KEY_FILE", str(work / "key"))
    expected = f"True 4 {args.app_mb}"
    options = {"tag": args.tag, "memory_limit": "3g"}
    print(f"load average {os.getloadavg()[0]:.1f}; /app {args.app_mb} MB, DataFrame {args.df_mb} MB")
    snaps: list[Snapshot] = []
    took: list[float] = []
    async with ExecutionContainer(**options) as container:  # type: ignore[arg-type]
        async with ExecutionClient(port=container.executor_port) as client:
            size = await client.execute(SETUP.format(df_bytes=args.df_mb * MB, app_mb=args.app_mb), timeout=300)
            print(f"DataFrame {int(size.text) / MB:.1f} MB")
            for run in range(args.runs):
                start = time.perf_counter()
                snaps.append(await snapshot(container, work / f"s{run}", clients=[client], timeout=120))
                took.append(time.perf_counter() - start)
    snap = snaps[0]
    print(f"snapshot size {snap.size / MB:.1f} MB")
    figure("snapshot()", took)
    for extra in snaps[1:]:
        extra.delete()

    took = []
    for _ in range(args.runs):
        start = time.perf_counter()
        async with await restore(snap, memory_limit="3g") as sandbox:
            took.append(time.perf_counter() - start)
            assert (await sandbox.client.execute(CHECK)).text == expected
    figure("restore() into a fresh container", took)

    async with SandboxPool(args.forks, **options) as pool:  # type: ignore[arg-type]
        took = []
        for _ in range(args.runs):
            await pool.wait_ready(timeout=300)
            start = time.perf_counter()
            sandbox = await pool.restore(snap)
            took.append(time.perf_counter() - start)
            async with sandbox:
                assert (await sandbox.client.execute(CHECK)).text == expected
        figure("SandboxPool.restore()", took)
        took = []
        for _ in range(args.runs):
            await pool.wait_ready(timeout=300)
            start = time.perf_counter()
            sandboxes = await pool.fork(snap, args.forks)
            took.append(time.perf_counter() - start)
            for sandbox in sandboxes:
                assert (await sandbox.client.execute(CHECK)).text == expected
            await asyncio.gather(*(sandbox.close() for sandbox in sandboxes))
        figure(f"SandboxPool.fork({args.forks}) from a full pool", took)
    snap.delete()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default=os.environ.get("IPYBOX_TEST_IMAGE", DEFAULT_TAG))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--app-mb", type=int, default=100)
    parser.add_argument("--df-mb", type=int, default=50)
    parser.add_argument("--forks", type=int, default=4)
    asyncio.run(main(parser.parse_args()))
