"""Forking in a cell: legitimate uses work; forked copies of the kernel never linger (kernel_app.py)."""

from __future__ import annotations

import asyncio

import pytest

from ipybox import ExecutionClient, ExecutionError


async def _gone(client: ExecutionClient, pid: int) -> bool:
    """Whether a process is gone within 10 s: neither running nor an unreaped zombie."""
    for _ in range(100):
        if (await client.execute(f"import os\nprint(os.path.exists('/proc/{pid}'))")).text == "False":
            return True
        await asyncio.sleep(0.1)
    return False


async def test_pool_created_in_one_cell_serves_the_next(client: ExecutionClient) -> None:
    await client.execute(
        "import multiprocessing\n"
        "def square(x):\n"
        "    return x * x\n"
        "pool = multiprocessing.get_context('fork').Pool(2)\n"
        "print(pool.map(square, range(4)))"
    )
    result = await client.execute("print(pool.map(square, range(5)))\nprint(pool.apply(sum, ([1, 2, 3],)))")
    assert result.text == "[0, 1, 4, 9, 16]\n6"
    await client.execute("pool.close()\npool.join()")


async def test_process_output_is_forwarded(client: ExecutionClient) -> None:
    result = await client.execute(
        "import multiprocessing, time\n"
        "p = multiprocessing.get_context('fork').Process(target=print, args=('hello from the child',))\n"
        "p.start()\n"
        "p.join()\n"
        # ipykernel forwards a child's output through the kernel's IOPub thread, asynchronously.
        "time.sleep(0.5)\n"
        "print('exit code', p.exitcode)",
        timeout=30,
    )
    assert result.text is not None
    assert "hello from the child" in result.text
    assert result.text.endswith("exit code 0")


async def test_subprocess_run(client: ExecutionClient) -> None:
    result = await client.execute(
        "import subprocess, sys\n"
        "done = subprocess.run([sys.executable, '-c', 'print(6 * 7)'], capture_output=True, text=True, check=True)\n"
        "print(done.stdout.strip(), done.returncode)"
    )
    assert result.text == "42 0"


async def test_fork_with_a_child_that_exits_itself(client: ExecutionClient) -> None:
    result = await client.execute(
        "import os\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(7)\n"
        "print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))"
    )
    assert result.text == "7"
    assert (await client.execute("print('works')")).text == "works"


async def test_a_child_that_calls_sys_exit_ends_with_its_status(client: ExecutionClient) -> None:
    result = await client.execute(
        "import os, sys\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    sys.exit(3)\n"
        "print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))"
    )
    assert result.text == "3"


@pytest.mark.parametrize(
    "child",
    [
        "    pass",  # runs on to the end of the cell
        "    raise ValueError('in the child')",  # fails: the kernel's error, not the child's, is reported
    ],
    ids=["falls-through", "raises"],
)
async def test_a_child_that_returns_into_the_kernel_ends(client: ExecutionClient, child: str) -> None:
    # The parent waits a moment so that a child's reply or error, if any, would arrive first.
    result = await client.execute(
        f"import os, time\npid = os.fork()\nif pid == 0:\n{child}\ntime.sleep(0.5)\nif pid:\n    print(pid)"
    )
    assert result.text is not None and result.text.isdigit()
    assert await _gone(client, int(result.text))
    assert (await client.execute("print('works')")).text == "works"


async def test_a_child_that_returns_to_the_event_loop_ends(client: ExecutionClient) -> None:
    # Top-level await: the copy would give control back to the kernel's event loop mid-cell.
    result = await client.execute(
        "import asyncio, os\npid = os.fork()\nawait asyncio.sleep(0.2)\nprint('after the await', pid != 0, pid)"
    )
    assert result.text is not None
    assert result.text.startswith("after the await True")
    assert await _gone(client, int(result.text.split()[-1]))
    assert (await client.execute("print('works')")).text == "works"


async def test_the_error_of_a_failing_cell_is_the_kernels(client: ExecutionClient) -> None:
    # The child ends before it can report an error of its own; only the parent's error arrives.
    with pytest.raises(ExecutionError) as info:
        await asyncio.wait_for(
            client.execute(
                "import os, time\nif os.fork() == 0:\n    raise KeyError(os.getpid())\ntime.sleep(0.5)\n"
                "raise KeyError(os.getpid())"
            ),
            30,
        )
    kernel_pid = (await client.execute("import os\nprint(os.getpid())")).text
    assert info.value.message == f"KeyError: {kernel_pid}"
