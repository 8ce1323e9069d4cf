"""MCP tool calls from a cell to a stdio server in the sandbox (bench/run calls `measure`).

    .venv/bin/python bench/tool_calls.py [--tag TAG] [--calls N]

Uploads the repository's test server (tests/mcp_server/server.py), generates its package, and times
in the kernel, with `time.perf_counter` around each call, the first call (it may start the server)
and then N calls of `echo` in one cell. The generated-module API is the seed's, so the same script
measures any image (A/B: `--tag` of an old build).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from pathlib import Path

from ipybox import DEFAULT_TAG, ExecutionClient, ExecutionContainer, ResourceClient

SERVER = Path(__file__).resolve().parent.parent / "tests" / "mcp_server" / "server.py"
# The test server is written for mcp 2.x; the user environment's `python` has mcp 1.x.
PARAMS = {"command": "uvx", "args": ["--with", "mcp==2.3.0", "python", "/app/bench_mcp_server.py"]}

TIMED_CELL = """
import json, time
from benchtools.testsrv.echo import Params, echo
begin = time.perf_counter(); echo(Params(text="first")); first = time.perf_counter() - begin
samples = []
for _ in range({calls}):
    begin = time.perf_counter(); echo(Params(text="hi")); samples.append(time.perf_counter() - begin)
print(json.dumps({{"first": first, "samples": samples}}))
"""


async def measure(tag: str, calls: int) -> tuple[float, float, float]:
    """(first call, p50, p95) in seconds: the first call of a fresh kernel, then `calls` warm ones."""
    async with ExecutionContainer(tag=tag) as container:
        async with ResourceClient(port=container.resource_port) as resource:
            with tempfile.TemporaryDirectory() as tmp:
                copy = Path(tmp) / "server.py"
                copy.write_text(SERVER.read_text())
                await resource.upload_file("bench_mcp_server.py", copy)
            await resource.generate_mcp_sources("benchtools", "testsrv", PARAMS)
        async with ExecutionClient(port=container.executor_port) as client:
            result = await client.execute(TIMED_CELL.format(calls=calls), timeout=calls * 5 + 120)
    data = json.loads(result.text or "{}")
    samples = sorted(data["samples"])
    p95 = samples[min(len(samples) - 1, round(0.95 * (len(samples) - 1)))]
    return data["first"], statistics.median(samples), p95


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default=DEFAULT_TAG)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    first, p50, p95 = asyncio.run(measure(args.tag, args.calls))
    warm = f"warm p50 {p50 * 1000:.2f} ms, p95 {p95 * 1000:.2f} ms"
    print(f"first call {first * 1000:.1f} ms; {warm} ({args.calls} calls)")
