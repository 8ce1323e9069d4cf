"""Code that ignores the interrupt: a timeout escalates to a kernel restart, and nothing is left running."""

from __future__ import annotations

import asyncio
import json

import pytest

from ipybox import ExecutionClient, ExecutionContainer, ExecutionError, ExecutionTimeoutError

# Each ignores SIGINT: at the OS level, or by never returning to the interpreter, which is where a
# Python signal handler runs.
RUNAWAYS = {
    "python-loop-sig-ign": "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass",
    "c-loop-sig-ign": "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nsum(range(10**15))",
    "c-loop": "sum(range(10**15))",
}

# Every process in the container as {"pid", "ppid", "cmd"}; /proc, as the image has no ps.
PROCESSES = """
import json, os
found = []
for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
        cmd = open(f'/proc/{pid}/cmdline', 'rb').read().replace(b'\\0', b' ').decode().strip()
        ppid = int(open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[1])
    except OSError:
        continue
    found.append({'pid': int(pid), 'ppid': ppid, 'cmd': cmd})
print(json.dumps(found))
"""


async def _restarting_timeout(client: ExecutionClient, code: str) -> ExecutionTimeoutError:
    # wait_for only guards the test against a hang: interrupt, 5 s grace and a restart take far less.
    with pytest.raises(ExecutionTimeoutError) as info:
        await asyncio.wait_for(client.execute(code, timeout=2), 30)
    return info.value


@pytest.mark.parametrize("code", RUNAWAYS.values(), ids=RUNAWAYS.keys())
async def test_timeout_restarts_a_kernel_that_ignores_the_interrupt(client: ExecutionClient, code: str) -> None:
    await client.execute("state = 'old'")
    error = await _restarting_timeout(client, code)
    assert isinstance(error, TimeoutError)
    assert "timeout=2" in str(error) and "restarted" in str(error) and "state" in str(error)
    assert error.restarted is True
    # The next execution runs in the fresh kernel.
    assert (await client.execute("print('fresh')", timeout=30)).text == "fresh"
    with pytest.raises(ExecutionError, match="NameError"):
        await client.execute("state")


async def test_an_interruptible_timeout_keeps_the_kernel(client: ExecutionClient) -> None:
    await client.execute("state = 'kept'")
    with pytest.raises(ExecutionTimeoutError, match="interrupted and keeps its state") as info:
        await asyncio.wait_for(client.execute("while True:\n    pass", timeout=1), 30)
    assert "restarted" not in str(info.value)
    assert info.value.restarted is False
    assert (await client.execute("print(state)")).text == "kept"


async def test_executions_queued_behind_a_runaway_fail_instead_of_hanging(client: ExecutionClient) -> None:
    runaway = await client.submit(RUNAWAYS["python-loop-sig-ign"])
    queued = await client.submit("print('never')")
    with pytest.raises(ExecutionTimeoutError, match="restarted") as timed_out:
        await asyncio.wait_for(runaway.result(timeout=2), 30)
    assert timed_out.value.restarted is True
    with pytest.raises(Exception, match="restarted") as info:
        await asyncio.wait_for(queued.result(timeout=30), 30)
    assert not isinstance(info.value, TimeoutError)
    assert (await client.execute("print('next')")).text == "next"


async def test_no_process_survives_the_restart(make_container) -> None:  # type: ignore[no-untyped-def]
    container: ExecutionContainer = await make_container()
    async with ExecutionClient(port=container.executor_port) as client:
        before = json.loads((await client.execute(PROCESSES)).text or "[]")
        # The runaway starts children of its own before it spins.
        await _restarting_timeout(
            client,
            "import subprocess, sys\n"
            "children = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']) for _ in range(2)]\n"
            + RUNAWAYS["python-loop-sig-ign"],
        )
        after = json.loads((await client.execute(PROCESSES)).text or "[]")
        kernel_pid = int((await client.execute("import os\nprint(os.getpid())")).text or "0")
    old_kernels = {p["pid"] for p in before if _is_kernel(p["cmd"])}
    assert old_kernels and kernel_pid not in old_kernels
    survivors = [p for p in after if p["pid"] in old_kernels or "time.sleep(600)" in p["cmd"]]
    assert survivors == [], f"left running after the restart: {survivors}"
    # Only the servers and the new kernel (plus this cell's own process listing, gone by now).
    assert {p["pid"] for p in after} - {p["pid"] for p in before} <= {kernel_pid}, after


def _is_kernel(cmd: str) -> bool:
    """A kernel process: launched by the kernelspec (`ipybox_server.kernel_launcher`) or pre-warmed."""
    return "kernel_launcher" in cmd or "kernel_stub" in cmd or "ipykernel" in cmd
