"""The kernel's own round-trip floor: an async ZeroMQ client talking to a kernel directly.

Runs inside a sandbox container (bench/core.py sends it there), so no gateway, websocket or
docker-proxy is on the path: what is left is the kernel itself. Prints one line:
`kernel floor p50 X ms p95 Y ms`.
"""

import asyncio
import statistics
import time

from jupyter_client.manager import AsyncKernelManager


async def main(cells: int = 500) -> None:
    manager = AsyncKernelManager(kernel_name="python3")
    await manager.start_kernel()
    client = manager.client()
    client.start_channels()
    await client.wait_for_ready()

    async def run(code: str) -> None:
        msg_id = client.execute(code)
        while True:
            message = await client.get_iopub_msg()
            if (
                message["parent_header"].get("msg_id") == msg_id
                and message["msg_type"] == "status"
                and message["content"]["execution_state"] == "idle"
            ):
                return

    await run("x = 0")
    for _ in range(20):  # warm-up, as bench/core.py does
        await run("x += 1")
    timings = []
    for _ in range(cells):
        start = time.perf_counter()
        await run("x += 1")
        timings.append(time.perf_counter() - start)
    timings.sort()
    p50, p95 = statistics.median(timings) * 1000, timings[int(0.95 * (len(timings) - 1))] * 1000
    print(f"kernel floor p50 {p50:.2f} ms p95 {p95:.2f} ms")
    client.stop_channels()
    await manager.shutdown_kernel(now=True)


if __name__ == "__main__":
    asyncio.run(main())
