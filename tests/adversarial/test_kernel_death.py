"""A kernel that dies (exit, SIGKILL, segfault, a crash at every start) fails its execution at once, never hangs."""

from __future__ import annotations

import asyncio
import time

import pytest

from ipybox import ExecutionClient, ExecutionContainer, ExecutionError, KernelDiedError

DEATHS = {
    "os-exit": "import os\nos._exit(1)",
    "sigkill": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "segfault": "import ctypes\nctypes.string_at(0)",
}

# The gateway restarts a dead kernel at once; a death is reported within about a second. The
# bound is generous so a loaded machine does not fail the test.
DETECTION_BOUND = 10.0


@pytest.mark.parametrize("code", DEATHS.values(), ids=DEATHS.keys())
async def test_a_dying_kernel_fails_the_execution_and_the_next_one_runs_fresh(
    client: ExecutionClient, code: str
) -> None:
    await client.execute("state = 'old'")
    start = time.monotonic()
    with pytest.raises(KernelDiedError, match="died") as info:
        await asyncio.wait_for(client.execute(code, timeout=60), 60)
    elapsed = time.monotonic() - start
    assert elapsed < DETECTION_BOUND, f"the death took {elapsed:.1f} s to be reported"
    assert "restarted" in str(info.value)
    # The same client goes on with the restarted kernel, whose state is fresh.
    assert (await asyncio.wait_for(client.execute("print('fresh')", timeout=30), 60)).text == "fresh"
    with pytest.raises(ExecutionError, match="NameError"):
        await asyncio.wait_for(client.execute("state", timeout=30), 60)


CRASH_AT_START = """
from pathlib import Path
startup = Path.home() / '.ipython' / 'profile_default' / 'startup'
startup.mkdir(parents=True, exist_ok=True)
(startup / '00-crash.py').write_text('import os; os._exit(1)\\n')
"""


async def test_a_kernel_that_dies_at_every_start_is_reported_dead(make_container) -> None:  # type: ignore[no-untyped-def]
    container: ExecutionContainer = await make_container()
    async with ExecutionClient(port=container.executor_port) as client:
        await client.execute(CRASH_AT_START)
        start = time.monotonic()
        # The gateway restarts the kernel up to 5 times, each dies in its start-up, then it gives up.
        # The first death reports a restart; the give-up comes while a later call waits for the kernel.
        errors: list[KernelDiedError] = []
        while not errors or "could not be restarted" not in str(errors[-1]):
            assert time.monotonic() - start < 60, f"no 'could not be restarted' within 60 s: {errors}"
            with pytest.raises(KernelDiedError) as info:
                await asyncio.wait_for(
                    client.execute("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", timeout=60), 90
                )
            errors.append(info.value)
        elapsed = time.monotonic() - start
        assert elapsed < 60, f"the dead kernel took {elapsed:.1f} s to be reported"
        # From now on every call fails at once instead of waiting for a kernel that never comes.
        for call in (client.execute("print(1)", timeout=60), client.submit("print(1)")):
            start = time.monotonic()
            with pytest.raises(KernelDiedError, match="could not be restarted"):
                await asyncio.wait_for(call, 10)
            assert time.monotonic() - start < 2
