"""File transfer throughput of ResourceClient against `docker cp`, in the same run, same container.

    .venv/bin/python bench/transfer.py [--tag TAG] [--size-mb 100] [--runs 3] [--memory-gb 1]

Moves one random file host -> sandbox and back with `upload_file` / `download_file`, and with
`docker cp` both ways; prints the median MB/s of `--runs` runs each (MB = 10^6 bytes). Every
round trip is checked byte for byte. With `--memory-gb N` (0 to skip) it then moves an N GB file
both ways and reports the peak memory growth of this process (ru_maxrss) and of the resource server
in the container (VmHWM of its process). Needs a Docker engine and the image.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

from ipybox import DEFAULT_TAG, ExecutionContainer, ResourceClient

MB = 1_000_000


def write_random_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as file:
        remaining = size
        while remaining:
            block = os.urandom(min(remaining, 4 << 20))
            file.write(block)
            digest.update(block)
            remaining -= len(block)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True).stdout


async def timed(action: Awaitable[None]) -> float:
    start = time.perf_counter()  # a coroutine does nothing until awaited
    await action
    return time.perf_counter() - start


async def throughput(container: ExecutionContainer, work: Path, size: int, runs: int) -> dict[str, list[float]]:
    source = work / "source.bin"
    expected = write_random_file(source, size)
    back = work / "back.bin"
    cid = container.container_id or ""
    seconds: dict[str, list[float]] = {
        "ipybox upload": [],
        "docker cp in": [],
        "ipybox download": [],
        "docker cp out": [],
    }

    async def docker_cp(*args: str) -> None:
        await asyncio.to_thread(docker, "cp", *args)

    async with ResourceClient(port=container.resource_port) as client:
        await client.upload_file("warmup.bin", source)  # first-use costs (page cache, connection) out of the runs
        for run in range(runs):
            seconds["ipybox upload"].append(await timed(client.upload_file(f"ipybox-{run}.bin", source)))
            seconds["docker cp in"].append(await timed(docker_cp(str(source), f"{cid}:/app/cp-{run}.bin")))
            back.unlink(missing_ok=True)
            seconds["ipybox download"].append(await timed(client.download_file(f"ipybox-{run}.bin", back)))
            assert sha256_of(back) == expected, "ipybox round trip changed the bytes"
            back.unlink()
            seconds["docker cp out"].append(await timed(docker_cp(f"{cid}:/app/cp-{run}.bin", str(back))))
            assert sha256_of(back) == expected, "docker cp round trip changed the bytes"
            back.unlink()
            docker("exec", cid, "sh", "-c", "rm -f /app/*.bin")
    source.unlink()
    return seconds


_SERVER_PEAK = """
import pathlib
for proc in pathlib.Path("/proc").glob("[0-9]*"):
    try:
        args = proc.joinpath("cmdline").read_bytes().split(b"\\0")
        if b"python" in args[0] and args[-3:-1] == [b"-m", b"ipybox_server"]:  # not docker-init
            print(next(l for l in proc.joinpath("status").read_text().splitlines() if l.startswith("VmHWM")))
    except OSError:
        pass
"""


def server_peak_kib(container_id: str) -> int:
    """VmHWM (peak resident set) of the resource server process in the container."""
    return int(docker("exec", container_id, "python", "-c", _SERVER_PEAK).split()[1])


async def memory_growth(container: ExecutionContainer, work: Path, size: int) -> list[tuple[str, str]]:
    source = work / "big.bin"
    write_random_file(source, size)
    cid = container.container_id or ""
    async with ResourceClient(port=container.resource_port) as client:
        await client.upload_file("small.bin", __file__)  # connection and code paths warmed up
        await client.download_file("small.bin", work / "small.bin")
        client_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        server_before = server_peak_kib(cid)
        up = await timed(client.upload_file("big.bin", source))
        server_after_upload = server_peak_kib(cid)
        down = await timed(client.download_file("big.bin", work / "big-back.bin"))
        client_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        server_after = server_peak_kib(cid)
    ok = sha256_of(source) == sha256_of(work / "big-back.bin")
    gb = size / 1e9
    return [
        (f"{gb:g} GB upload / download", f"{size / up / MB:.0f} / {size / down / MB:.0f} MB/s, bytes equal: {ok}"),
        (
            "client peak RSS (ru_maxrss): before / after",
            f"{client_before / 1024:.1f} / {client_after / 1024:.1f} MiB",
        ),
        (
            "server peak RSS (VmHWM): before / after up / after down",
            f"{server_before / 1024:.1f} / {server_after_upload / 1024:.1f} / {server_after / 1024:.1f} MiB",
        ),
    ]


async def main(tag: str, size: int, runs: int, memory_size: int) -> None:
    with tempfile.TemporaryDirectory(prefix="ipybox-bench-") as tmp:
        work = Path(tmp)
        async with ExecutionContainer(tag=tag) as container:
            seconds = await throughput(container, work, size, runs)
            rows = [
                (name, f"{size / statistics.median(times) / MB:.0f} MB/s", " ".join(f"{t:.3f}" for t in times))
                for name, times in seconds.items()
            ]
            print(f"{size / MB:g} MB file, median of {runs} runs")
            print(f"{'transfer':<16} | {'median':>9} | runs (s)")
            print(f"{'-' * 16}-|-{'-' * 9}-|-{'-' * 24}")
            for name, rate, times in rows:
                print(f"{name:<16} | {rate:>9} | {times}")
        if memory_size:
            async with ExecutionContainer(tag=tag) as container:
                figures = await memory_growth(container, work, memory_size)
            print()
            for name, value in figures:
                print(f"{name:<56} | {value}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default=DEFAULT_TAG)
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory-gb", type=float, default=1.0, help="size of the memory-growth transfer (0: skip)")
    args = parser.parse_args()
    asyncio.run(main(args.tag, args.size_mb * MB, args.runs, int(args.memory_gb * 1e9)))
