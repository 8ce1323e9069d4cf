"""ExecutionClient against a real container: results, errors, streaming, timeouts, routing, death."""

from __future__ import annotations

import asyncio

import pytest

from ipybox import (
    ExecutionClient,
    ExecutionContainer,
    ExecutionError,
    InvalidStateError,
    KernelDiedError,
)


async def test_state_persists_between_executions(client: ExecutionClient) -> None:
    await client.execute("x = 41")
    result = await client.execute("print(x + 1)")
    assert result.text == "42"
    assert result.images == []


async def test_no_output_gives_none(client: ExecutionClient) -> None:
    result = await client.execute("y = 1")
    assert result.text is None


async def test_text_is_stdout_stderr_and_results_joined_and_stripped(client: ExecutionClient) -> None:
    code = "import sys\nprint('out')\nprint('err', file=sys.stderr)\ndisplay('shown')\n6 * 7"
    result = await client.execute(code)
    assert result.text == "out\nerr\n'shown'\n42"


async def test_error_has_message_and_plain_trace(client: ExecutionClient) -> None:
    with pytest.raises(ExecutionError) as info:
        await client.execute("def f():\n    return 1 / 0\nf()")
    assert info.value.message == "ZeroDivisionError: division by zero"
    assert info.value.trace is not None
    assert "ZeroDivisionError" in info.value.trace and "return 1 / 0" in info.value.trace
    assert "\x1b[" not in info.value.trace
    # The kernel is fine afterwards.
    assert (await client.execute("print('still here')")).text == "still here"


async def test_output_before_error_is_streamed(client: ExecutionClient) -> None:
    execution = await client.submit("print('before')\nraise ValueError('bad')")
    chunks = []
    with pytest.raises(ExecutionError, match="ValueError: bad"):
        async for chunk in execution.stream():
            chunks.append(chunk)
    assert "".join(chunks).strip() == "before"


async def test_stream_yields_chunks_as_they_arrive(client: ExecutionClient) -> None:
    # The cell waits until the client has seen the first chunk: only true streaming can finish it.
    await client.execute("import os, time")
    execution = await client.submit(
        "print('first', flush=True)\n"
        "deadline = time.time() + 30\n"
        "while not os.path.exists('/tmp/seen') and time.time() < deadline:\n"
        "    time.sleep(0.01)\n"
        "print('second' if os.path.exists('/tmp/seen') else 'not streamed')"
    )
    chunks = []
    async with ExecutionClient(port=client.port) as helper:
        async for chunk in execution.stream(timeout=60):
            chunks.append(chunk)
            if chunk.strip() == "first":
                await helper.execute("open('/tmp/seen', 'w').close()")
    assert [c.strip() for c in chunks] == ["first", "second"]


async def test_timeout_interrupts_and_keeps_state(client: ExecutionClient) -> None:
    await client.execute("kept = 'yes'")
    with pytest.raises(TimeoutError, match=r"timeout=1"):
        await client.execute("import time\ntime.sleep(60)", timeout=1)
    result = await client.execute("print(kept)", timeout=10)
    assert result.text == "yes"


async def test_two_submitted_executions_keep_their_own_output(client: ExecutionClient) -> None:
    first = await client.submit("import time\nfor i in range(3):\n    print('a', i, flush=True)\n    time.sleep(0.05)")
    second = await client.submit("for i in range(3):\n    print('b', i)")
    second_result, first_result = await asyncio.gather(second.result(), first.result())
    assert first_result.text == "a 0\na 1\na 2"
    assert second_result.text == "b 0\nb 1\nb 2"


async def test_ten_megabytes_arrive_complete_and_in_order(client: ExecutionClient) -> None:
    code = "for i in range(1_000_000):\n    print(f'{i:09d}')"  # 10 bytes a line, 10 MB
    result = await client.execute(code, timeout=120)
    assert result.text is not None
    lines = result.text.split("\n")
    assert len(lines) == 1_000_000
    assert lines == [f"{i:09d}" for i in range(1_000_000)]


async def test_one_ten_megabyte_string(client: ExecutionClient) -> None:
    result = await client.execute("print('x' * 10_000_000)", timeout=120)
    assert result.text == "x" * 10_000_000


async def test_top_level_await(client: ExecutionClient) -> None:
    result = await client.execute("import asyncio\nawait asyncio.sleep(0.01)\nprint(await asyncio.sleep(0, 'awaited'))")
    assert result.text == "awaited"


async def test_matplotlib_plot_returns_image(client: ExecutionClient) -> None:
    result = await client.execute(
        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [3, 1, 2])\nplt.title('t')\nplt.show()\nprint('plotted')"
    )
    assert result.text == "plotted"
    assert len(result.images) == 1
    assert result.images[0].size[0] > 100 and result.images[0].format == "PNG"


async def test_two_images_in_order(client: ExecutionClient) -> None:
    code = (
        "from PIL import Image\nfrom IPython.display import display\n"
        "display(Image.new('RGB', (10, 20), 'red'))\ndisplay(Image.new('RGB', (30, 40), 'blue'))"
    )
    result = await client.execute(code)
    assert [image.size for image in result.images] == [(10, 20), (30, 40)]


async def test_kernel_death_is_reported_not_hung(shared_container: ExecutionContainer) -> None:
    async with ExecutionClient(port=shared_container.executor_port) as client:
        await client.execute("state = 1")
        with pytest.raises(KernelDiedError, match="died"):
            # wait_for guards the test against a hang; the error must come well before it.
            await asyncio.wait_for(client.execute("import os\nos._exit(1)", timeout=60), 30)


async def test_clients_have_separate_kernels(shared_container: ExecutionContainer) -> None:
    async with ExecutionClient(port=shared_container.executor_port) as one:
        async with ExecutionClient(port=shared_container.executor_port) as two:
            assert one.kernel_id != two.kernel_id
            await one.execute("only_here = 1")
            with pytest.raises(ExecutionError, match="NameError"):
                await two.execute("only_here")


async def test_disconnect_is_idempotent_and_shuts_kernel_down(shared_container: ExecutionContainer) -> None:
    client = ExecutionClient(port=shared_container.executor_port)
    await client.connect()
    kernel_id = client.kernel_id
    await client.disconnect()
    await client.disconnect()
    with pytest.raises(InvalidStateError):
        _ = client.kernel_id
    with pytest.raises(RuntimeError, match="connect"):
        await client.execute("1")
    async with ExecutionClient(port=shared_container.executor_port) as other:
        session = other._transport._session if other._transport is not None else None
        assert session is not None
        async with session.get(f"/api/kernels/{kernel_id}") as response:
            assert response.status == 404
        async with session.get(f"/api/kernels/{other.kernel_id}") as response:
            assert response.status == 200


async def test_cwd_and_sys_path(client: ExecutionClient) -> None:
    result = await client.execute("import os, sys\nprint(os.getcwd())\nprint('/app' in sys.path)")
    assert result.text == "/app\nTrue"


async def test_kernel_is_usable_after_death_with_fresh_state(shared_container: ExecutionContainer) -> None:
    async with ExecutionClient(port=shared_container.executor_port) as client:
        await client.execute("before_death = 1")
        with pytest.raises(KernelDiedError):
            await asyncio.wait_for(client.execute("import os\nos._exit(1)", timeout=60), 30)
        # The gateway restarted the kernel; give it the time a restart takes, then it serves again.
        result = await asyncio.wait_for(client.execute("print('back')", timeout=60), 60)
        assert result.text == "back"
        with pytest.raises(ExecutionError, match="NameError"):
            await client.execute("before_death")


async def test_first_kernel_of_a_fresh_container_is_the_prewarmed_one(make_container) -> None:  # type: ignore[no-untyped-def]
    container = await make_container()
    async with ExecutionClient(port=container.executor_port) as client:
        result = await client.execute("import os\nprint(os.getcwd(), os.getppid() > 1, 'IPYBOX_TOKEN' in os.environ)")
        assert result.text == "/app True False"
        # The adopted kernel is interruptible like any other (its own process group).
        with pytest.raises(TimeoutError):
            await client.execute("import time\ntime.sleep(30)", timeout=1)
        assert (await client.execute("print('alive')")).text == "alive"


async def test_heartbeat_detects_a_silent_server(make_container) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal

    from ipybox import ExecutionOutcomeUnknownError

    container = await make_container()
    server = container._server
    assert server is not None
    async with ExecutionClient(port=container.executor_port, heartbeat_interval=1) as client:
        execution = await client.submit("import time\ntime.sleep(30)")
        # The gateway's process stops answering pings (SIGSTOP, not a pause: a paused sandbox is
        # waited for, tests/integration/test_pause.py); the connection itself stays up.
        os.kill(server.pid, signal.SIGSTOP)
        try:
            # The execution was running when the connection died: whether it ran to its end is unknown.
            with pytest.raises(ExecutionOutcomeUnknownError):
                await asyncio.wait_for(execution.result(timeout=60), 20)
        finally:
            os.kill(server.pid, signal.SIGCONT)


async def test_a_killed_container_fails_the_running_cell_saying_so(make_container) -> None:  # type: ignore[no-untyped-def]
    # Before: three seconds of reconnect attempts, then "could not be re-opened (UnixClientConnectorError(...))".
    import aiodocker

    from ipybox import ExecutionOutcomeUnknownError

    container = await make_container()
    async with ExecutionClient(port=container.executor_port) as client:
        execution = await client.submit("import time\ntime.sleep(60)")
        await asyncio.sleep(0.5)
        docker = aiodocker.Docker()
        try:
            await (await docker.containers.get(container.container_id)).kill()
        finally:
            await docker.close()
        with pytest.raises(ExecutionOutcomeUnknownError, match="the sandbox's container has ended"):
            await asyncio.wait_for(execution.result(timeout=60), 20)
