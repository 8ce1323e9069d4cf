"""Pause and resume of one sandbox, idle and with a cell spinning on a core (bench/run calls `measure`).

    .venv/bin/python bench/lifecycle.py [--tag TAG] [--runs N]

Times `ExecutionContainer.pause()` and `resume()` N times each (the engine's freezer; a pause that the
engine reports as "unable to freeze" is retried and counted in the figure), then a client's first
execute after a resume, and `ExecutionContainer.attach()` plus a client on its existing kernel (what a
second process does). The figures depend on the machine's load: the freezer waits for busy processes.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from ipybox import DEFAULT_TAG, ExecutionClient, ExecutionContainer

SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass"


def _p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _cycle(container: ExecutionContainer, runs: int) -> tuple[list[float], list[float]]:
    pauses, resumes = [], []
    for _ in range(runs):
        begin = time.perf_counter()
        await container.pause()
        pauses.append(time.perf_counter() - begin)
        await asyncio.sleep(0.02)
        begin = time.perf_counter()
        await container.resume()
        resumes.append(time.perf_counter() - begin)
        await asyncio.sleep(0.02)
    return pauses, resumes


async def measure(tag: str, runs: int) -> dict[str, float]:
    """Figures in seconds: pause/resume p50 and p95, idle and busy; execute after resume; attach."""
    figures: dict[str, float] = {}
    async with ExecutionContainer(tag=tag, memory_limit="1g") as container:
        async with ExecutionClient(port=container.executor_port) as client:
            await client.execute("x = 42")
            pauses, resumes = await _cycle(container, runs)
            figures |= {
                "pause_p50": statistics.median(pauses),
                "pause_p95": _p(pauses, 0.95),
                "resume_p50": statistics.median(resumes),
                "resume_p95": _p(resumes, 0.95),
            }
            spinning = await client.submit(SPIN.format(seconds=runs * 0.2 + 10))
            await asyncio.sleep(0.5)
            pauses, resumes = await _cycle(container, runs)
            figures |= {"pause_busy_p50": statistics.median(pauses), "resume_busy_p50": statistics.median(resumes)}
            await spinning.result(timeout=120)
            await container.pause()
            await container.resume()
            begin = time.perf_counter()
            await client.execute("x")
            figures["execute_after_resume"] = time.perf_counter() - begin
            kernel_id = client.kernel_id
            await client.disconnect(shutdown=False)
        attaches = []
        for _ in range(5):
            begin = time.perf_counter()
            attached = await ExecutionContainer.attach(container.container_id or "")
            again = ExecutionClient(port=attached.executor_port, kernel_id=kernel_id)
            await again.connect()
            await again.execute("x")
            attaches.append(time.perf_counter() - begin)
            await again.disconnect(shutdown=False)
            await attached.detach()
        figures["attach_and_execute"] = statistics.median(attaches)
    return figures


def report(figures: dict[str, float], runs: int) -> str:
    ms = {name: value * 1000 for name, value in figures.items()}
    return (
        f"pause   p50 {ms['pause_p50']:.1f} ms (p95 {ms['pause_p95']:.1f}), busy cell p50 {ms['pause_busy_p50']:.1f} ms"
        f"  [n={runs}]\n"
        f"resume  p50 {ms['resume_p50']:.1f} ms (p95 {ms['resume_p95']:.1f}), busy cell p50 "
        f"{ms['resume_busy_p50']:.1f} ms\n"
        f"first execute after resume {ms['execute_after_resume']:.1f} ms; attach + connect to the kernel + "
        f"execute p50 {ms['attach_and_execute']:.1f} ms (n=5)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default=DEFAULT_TAG)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    print(report(asyncio.run(measure(args.tag, args.runs)), args.runs))
