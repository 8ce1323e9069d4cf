"""Core figures of one ipybox sandbox on this machine.

    .venv/bin/python bench/core.py [--tag TAG] [--runs N]

Prints one table: cold start (ExecutionContainer entered -> first result of `print(1)`), trivial
cell round trip p50/p95, 10 MB of stdout in one cell (time and bytes received), and the idle memory
of one container with one kernel. Needs a Docker engine and the image (scripts/test builds it).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import aiodocker

from ipybox import DEFAULT_TAG, ExecutionClient, ExecutionContainer

TEN_MB = 10_000_000


@dataclass
class Figure:
    name: str
    value: str
    target: str


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


async def cold_start(tag: str, runs: int) -> list[float]:
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        async with ExecutionContainer(tag=tag) as container:
            async with ExecutionClient(port=container.executor_port) as client:
                result = await client.execute("print(1)")
                timings.append(time.perf_counter() - start)
                assert result.text == "1"
        # Let the engine finish removing the container before the next start is timed.
        await asyncio.sleep(0.5)
    return timings


async def round_trips(client: ExecutionClient, cells: int) -> list[float]:
    await client.execute("x = 0")
    for _ in range(20):  # warm-up
        await client.execute("x += 1")
    timings = []
    for _ in range(cells):
        start = time.perf_counter()
        await client.execute("x += 1")
        timings.append(time.perf_counter() - start)
    return timings


async def ten_megabytes(client: ExecutionClient) -> tuple[float, int, float, int]:
    start = time.perf_counter()
    one_line = await client.execute(f"print('x' * {TEN_MB}, end='')")
    one_line_time = time.perf_counter() - start
    start = time.perf_counter()
    many_lines = await client.execute("for i in range(1_000_000):\n    print(f'{i:09d}')")
    many_lines_time = time.perf_counter() - start
    return one_line_time, len(one_line.text or ""), many_lines_time, len(many_lines.text or "") + 1


async def kernel_floor(container: ExecutionContainer) -> str:
    """p50/p95 of the same trivial cell through a ZeroMQ client inside the container."""
    code = (Path(__file__).parent / "kernel_floor.py").read_text()
    docker = aiodocker.Docker()
    try:
        target = await docker.containers.get(container.container_id or "")
        execution = await target.exec(cmd=["python", "-c", code], stdout=True, stderr=False)
        output = []
        async with execution.start(detach=False) as stream:
            while (message := await stream.read_out()) is not None:
                output.append(message.data.decode())
    finally:
        await docker.close()
    line = "".join(output).strip().splitlines()[-1]  # "kernel floor p50 X ms p95 Y ms"
    words = line.split()
    return f"{float(words[3]):.2f} / {float(words[6]):.2f} ms"


async def idle_memory(tag: str) -> float:
    """MiB used by one idle container with one connected kernel, as `docker stats` computes it."""
    async with ExecutionContainer(tag=tag) as container:
        async with ExecutionClient(port=container.executor_port) as client:
            await client.execute("print(1)")
            await asyncio.sleep(3)  # let start-up garbage settle
            docker = aiodocker.Docker()
            try:
                stats = await (await docker.containers.get(container.container_id or "")).stats(stream=False)
            finally:
                await docker.close()
    memory = stats[0]["memory_stats"]
    inactive = memory.get("stats", {}).get("total_inactive_file", memory.get("stats", {}).get("inactive_file", 0))
    return float(memory["usage"] - inactive) / 2**20


async def main(tag: str, runs: int, cells: int) -> list[Figure]:
    starts = await cold_start(tag, runs)
    async with ExecutionContainer(tag=tag) as container:
        async with ExecutionClient(port=container.executor_port) as client:
            trips = await round_trips(client, cells)
            one_line_time, one_line_bytes, lines_time, lines_bytes = await ten_megabytes(client)
        floor = await kernel_floor(container)
    memory = await idle_memory(tag)
    ms = 1000
    return [
        Figure(
            f"cold start p50 / p95 ({runs} runs)",
            f"{statistics.median(starts):.3f} / {percentile(starts, 0.95):.3f} s",
            "<= 0.8 s p50",
        ),
        Figure(
            f"trivial cell round trip p50 / p95 ({cells} cells)",
            f"{statistics.median(trips) * ms:.2f} / {percentile(trips, 0.95) * ms:.2f} ms",
            "<= 3 ms p50",
        ),
        Figure("kernel's own floor p50 / p95 (ZeroMQ client in the container)", floor, "(reference)"),
        Figure(
            "10 MB stdout, one line: time, bytes received",
            f"{one_line_time:.3f} s, {one_line_bytes:,} of {TEN_MB:,} B",
            "complete, <= 1 s",
        ),
        Figure(
            "10 MB stdout, 1M lines: time, bytes received",
            f"{lines_time:.3f} s, {lines_bytes:,} of {TEN_MB:,} B",
            "complete, <= 1 s",
        ),
        Figure("idle memory, one container + one kernel", f"{memory:.1f} MiB", "<= 150 MiB"),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default=DEFAULT_TAG)
    parser.add_argument("--runs", type=int, default=10, help="cold starts to time")
    parser.add_argument("--cells", type=int, default=500, help="trivial cells to time")
    args = parser.parse_args()
    figures = asyncio.run(main(args.tag, args.runs, args.cells))
    width = max(len(f.name) for f in figures)
    value_width = max(len(f.value) for f in figures)
    print(f"{'figure':<{width}} | {'measured':<{value_width}} | target")
    print(f"{'-' * width}-|-{'-' * value_width}-|-{'-' * 18}")
    for figure in figures:
        print(f"{figure.name:<{width}} | {figure.value:<{value_width}} | {figure.target}")
