"""Every speed figure of issue #7 on this machine, in one table (bench/run calls this).

    .venv/bin/python bench/core.py [--tag TAG] [--runs N] [--cells N] [--fleet N] [--record FILE]

Cold start (ExecutionContainer entered -> first result of `print(1)`), warm start from a SandboxPool
(acquired -> first result), trivial cell round trip against the kernel's own floor measured in the
same run, 10 MB of stdout, idle memory of one sandbox, how many idle sandboxes live at once each
answering a cell, 100 MB transfers against `docker cp`, and MCP tool calls from a cell (first and
warm), pause/resume (bench/lifecycle.py). With `--record FILE` the table is also appended to FILE's
history section with the date and commit. Needs a Docker engine and the image (scripts/test builds it).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import aiodocker
import lifecycle  # bench/lifecycle.py
import tool_calls  # bench/tool_calls.py
import transfer  # bench/transfer.py: this directory is on sys.path

from ipybox import DEFAULT_TAG, ExecutionClient, ExecutionContainer, SandboxPool

TEN_MB = 10_000_000


@dataclass
class Figure:
    name: str
    value: str
    target: str
    met: str = ""


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


async def warm_start(tag: str, runs: int) -> list[float]:
    """Acquire a ready sandbox from a pool and get the first result of `print(1)`."""
    timings = []
    async with SandboxPool(2, tag=tag) as pool:
        for _ in range(runs):
            await pool.wait_ready(timeout=60)
            start = time.perf_counter()
            async with pool.sandbox() as sandbox:
                result = await sandbox.client.execute("print(1)")
                timings.append(time.perf_counter() - start)
                assert result.text == "1"
    return timings


async def fleet(tag: str, count: int) -> tuple[int, float, float, float]:
    """Start `count` sandboxes, keep them all alive, and have each answer a cell.

    Returns how many answered, the seconds to start them all, the host memory they use per sandbox
    (MemAvailable before and after, so docker-proxy and engine costs count too) and one sandbox's
    round trip p50 while all are alive.
    """
    before = _mem_available()
    started: list[tuple[ExecutionContainer, ExecutionClient]] = []
    slots = asyncio.Semaphore(4)

    async def one() -> None:
        async with slots:
            container = ExecutionContainer(tag=tag)
            await container.run()
            client = ExecutionClient(port=container.executor_port)
            started.append((container, client))
            await client.connect()

    begin = time.perf_counter()
    try:
        await asyncio.gather(*(one() for _ in range(count)))
        results = await asyncio.gather(*(c.execute(f"print({i})") for i, (_, c) in enumerate(started)))
        seconds = time.perf_counter() - begin
        answered = sum(r.text == str(i) for i, r in enumerate(results))
        await asyncio.sleep(3)
        per_sandbox = (before - _mem_available()) / count / 2**20
        trips = await round_trips(started[0][1], 200)
        return answered, seconds, per_sandbox, statistics.median(trips)
    finally:
        kills = asyncio.Semaphore(8)

        async def remove(container: ExecutionContainer, client: ExecutionClient) -> None:
            async with kills:
                await client.disconnect()
                await container.kill()

        await asyncio.gather(*(remove(*pair) for pair in started), return_exceptions=True)


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


async def transfers(tag: str, size: int, runs: int) -> dict[str, float]:
    """Median MB/s of a `size`-byte file both ways, through ipybox and through `docker cp`."""
    with tempfile.TemporaryDirectory(prefix="ipybox-bench-") as tmp:
        async with ExecutionContainer(tag=tag) as container:
            seconds = await transfer.throughput(container, Path(tmp), size, runs)
    return {name: size / statistics.median(times) / 1e6 for name, times in seconds.items()}


async def kernel_floor(container: ExecutionContainer) -> tuple[float, float]:
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
    return float(words[3]), float(words[6])


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


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


async def main(tag: str, runs: int, cells: int, fleet_size: int, calls: int) -> list[Figure]:
    ms = 1000
    figures: list[Figure] = []
    starts = await cold_start(tag, runs)
    figures.append(
        Figure(
            f"cold start p50 / p95 ({runs} runs)",
            f"{statistics.median(starts):.3f} / {percentile(starts, 0.95):.3f} s",
            "<= 0.5 s p50",
            _met(statistics.median(starts) <= 0.5),
        )
    )
    warm = await warm_start(tag, runs)
    figures.append(
        Figure(
            f"warm start from a pool p50 / p95 ({runs} runs)",
            f"{statistics.median(warm) * ms:.1f} / {percentile(warm, 0.95) * ms:.1f} ms",
            "<= 50 ms p50",
            _met(statistics.median(warm) <= 0.05),
        )
    )
    async with ExecutionContainer(tag=tag) as container:
        async with ExecutionClient(port=container.executor_port) as client:
            trips = await round_trips(client, cells)
            one_line_time, one_line_bytes, lines_time, lines_bytes = await ten_megabytes(client)
        floor_p50, floor_p95 = await kernel_floor(container)
    trip_p50 = statistics.median(trips) * ms
    ratio = trip_p50 / floor_p50
    figures += [
        Figure(
            f"trivial cell round trip p50 / p95 ({cells} cells)",
            f"{trip_p50:.2f} / {percentile(trips, 0.95) * ms:.2f} ms ({ratio:.2f} x the floor)",
            "<= 1.15 x the floor (p50)",
            _met(ratio <= 1.15),
        ),
        Figure(
            "kernel's own floor p50 / p95 (ZeroMQ client in the container)",
            f"{floor_p50:.2f} / {floor_p95:.2f} ms",
            "(reference)",
        ),
        Figure(
            "10 MB stdout, one line: time, bytes received",
            f"{one_line_time:.3f} s, {one_line_bytes:,} of {TEN_MB:,} B",
            "complete, <= 0.3 s",
            _met(one_line_bytes == TEN_MB and one_line_time <= 0.3),
        ),
        Figure(
            "10 MB stdout, 1M lines: time, bytes received",
            f"{lines_time:.3f} s, {lines_bytes:,} of {TEN_MB:,} B",
            "complete",
            _met(lines_bytes == TEN_MB),
        ),
    ]
    first_call, call_p50, call_p95 = await tool_calls.measure(tag, calls)
    figures.append(
        Figure(
            f"MCP tool call from a cell, stdio server in the sandbox: first / warm p50 / p95 ({calls} calls)",
            f"{first_call * ms:.0f} / {call_p50 * ms:.2f} / {call_p95 * ms:.2f} ms",
            "<= 10 ms p50",
            _met(call_p50 <= 0.01),
        )
    )
    paused = await lifecycle.measure(tag, runs * 3)
    figures.append(
        Figure(
            f"pause / resume p50 ({runs * 3} each; "
            f"p95 {paused['pause_p95'] * ms:.0f} / {paused['resume_p95'] * ms:.0f} ms)",
            f"{paused['pause_p50'] * ms:.1f} / {paused['resume_p50'] * ms:.1f} ms",
            "<= 50 ms p50 each",
            _met(max(paused["pause_p50"], paused["resume_p50"]) <= 0.05),
        )
    )
    memory = await idle_memory(tag)
    figures.append(
        Figure("idle memory, one container + one kernel", f"{memory:.1f} MiB", "<= 90 MiB", _met(memory <= 90))
    )
    if fleet_size:
        answered, seconds, per_sandbox, busy_trip = await fleet(tag, fleet_size)
        figures.append(
            Figure(
                f"idle sandboxes alive at once, each answering a cell ({fleet_size} started)",
                f"{answered} answered; all up in {seconds:.0f} s; {per_sandbox:.0f} MiB host memory each; "
                f"round trip p50 meanwhile {busy_trip * ms:.2f} ms",
                ">= 100",
                _met(answered >= 100),
            )
        )
    rates = await transfers(tag, 100_000_000, 3)
    up, cp_in = rates["ipybox upload"], rates["docker cp in"]
    down, cp_out = rates["ipybox download"], rates["docker cp out"]
    figures += [
        Figure(
            "100 MB upload: ipybox / docker cp (median of 3)",
            f"{up:.0f} / {cp_in:.0f} MB/s",
            ">= docker cp",
            _met(up >= cp_in),
        ),
        Figure(
            "100 MB download: ipybox / docker cp (median of 3)",
            f"{down:.0f} / {cp_out:.0f} MB/s",
            ">= docker cp",
            _met(down >= cp_out),
        ),
    ]
    return figures


def table(figures: list[Figure]) -> str:
    lines = ["| figure | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {f.name} | {f.value} | {f.target} | {f.met} |" for f in figures]
    return "\n".join(lines)


def record(path: Path, figures: list[Figure], seconds: float) -> None:
    """Append this run's table, with date and commit, to the history section of `path`."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    if dirty.stdout.strip():
        commit += " + uncommitted changes"
    text = path.read_text()
    marker = "## History"
    if marker not in text:
        text = text.rstrip() + f"\n\n{marker}\nEvery `bench/run --record` appends its table here, newest last.\n"
    text = text.rstrip() + f"\n\n### {date.today().isoformat()}, commit {commit} ({seconds:.0f} s)\n{table(figures)}\n"
    path.write_text(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default=DEFAULT_TAG)
    parser.add_argument("--runs", type=int, default=10, help="cold and warm starts to time")
    parser.add_argument("--cells", type=int, default=500, help="trivial cells to time")
    parser.add_argument("--fleet", type=int, default=100, help="idle sandboxes to keep alive at once (0: skip)")
    parser.add_argument("--tool-calls", type=int, default=200, help="warm MCP tool calls to time")
    parser.add_argument("--record", type=Path, help="append the table to this file's history (docs/benchmarks.md)")
    args = parser.parse_args()
    begin = time.perf_counter()
    figures = asyncio.run(main(args.tag, args.runs, args.cells, args.fleet, args.tool_calls))
    elapsed = time.perf_counter() - begin
    print(table(figures))
    print(f"\n{elapsed:.0f} s")
    if args.record:
        record(args.record, figures, elapsed)
