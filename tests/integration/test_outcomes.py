"""Every execution's outcome is reported truthfully (issue 12).

An execution the kernel skipped is not a success; a queued execution's timeout never touches the
cell that runs before it; a refused oversize message gives the same exactly-once answer as a cut;
cancelling a call at any await point leaves nothing behind in the client.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import nbformat
import pytest

from ipybox import (
    ClientState,
    ExecutionAbortedError,
    ExecutionClient,
    ExecutionContainer,
    ExecutionError,
    ExecutionOutcomeUnknownError,
    _tokens,
)
from tests.adversarial.test_connection_cut import CutProxy

FAILS_LATE = "import time; time.sleep(0.5); 1/0"
SKIPPED = "x = 1; print('b ran')"


def pending(client: ExecutionClient) -> int:
    """Executions the client still routes output to (none once every execution has ended)."""
    return len(client._router.executions())


async def test_aborted_execution_raises_from_result(client: ExecutionClient) -> None:
    first = await client.submit(FAILS_LATE)
    second = await client.submit(SKIPPED)
    with pytest.raises(ExecutionError, match="ZeroDivisionError"):
        await first.result()
    with pytest.raises(ExecutionAbortedError) as info:
        await second.result()
    message = str(info.value)
    assert "did not run" in message and "ZeroDivisionError: division by zero" in message, message
    assert not isinstance(info.value, ExecutionError)
    assert (await client.execute("print('x' in globals())")).text == "False"
    assert pending(client) == 0


async def test_aborted_execution_raises_from_stream_and_events(client: ExecutionClient) -> None:
    first = await client.submit(FAILS_LATE)
    streamed = await client.submit(SKIPPED)
    evented = await client.submit(SKIPPED)
    with pytest.raises(ExecutionError):
        await first.result()
    with pytest.raises(ExecutionAbortedError):
        async for _ in streamed.stream():
            pass
    with pytest.raises(ExecutionAbortedError):
        async for _ in evented.events():
            pass
    with pytest.raises(ExecutionAbortedError):
        await evented.result(raise_on_error=False)


async def test_aborted_execution_in_exported_notebook(client: ExecutionClient, tmp_path: Path) -> None:
    first = await client.submit(FAILS_LATE)
    second = await client.submit(SKIPPED)
    with pytest.raises(ExecutionError):
        await first.result()
    with pytest.raises(ExecutionAbortedError):
        await second.result()
    path = tmp_path / "run.ipynb"
    await client.export_notebook(path)
    notebook = nbformat.read(path, as_version=4)
    cell = notebook.cells[-1]
    assert cell.source == SKIPPED
    assert cell.execution_count is None
    [output] = cell.outputs
    assert output.output_type == "error" and output.ename == "ExecutionAbortedError", output
    assert "did not run" in output.evalue


async def test_queued_timeout_never_touches_the_running_cell(client: ExecutionClient) -> None:
    running = await client.submit("import time; time.sleep(2); print('first done')")
    queued = await client.submit("print('second ran')")
    # The clock of a queued execution starts when the kernel starts it: 0.5 s is plenty for a print.
    result = await queued.result(timeout=0.5)
    assert result.text == "second ran"
    assert (await running.result()).text == "first done"


async def test_queued_timeout_counts_from_its_own_start(client: ExecutionClient) -> None:
    running = await client.submit("import time; time.sleep(1.5); print('first done')")
    queued = await client.submit("import time; time.sleep(30)")
    with pytest.raises(TimeoutError) as info:
        await queued.result(timeout=1)
    assert "timeout=1" in str(info.value)
    # The interrupt hit the queued execution's own run; the one before it ended normally.
    assert (await running.result()).text == "first done"
    assert (await client.execute("print('alive')")).text == "alive"


@pytest.fixture
async def container(make_container) -> ExecutionContainer:  # type: ignore[no-untyped-def]
    started: ExecutionContainer = await make_container()
    return started


class RefusingProxy(CutProxy):
    """A CutProxy that refuses the next `refusals` connections (after waiting `delays`, one each)."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.refusals = 0
        self.delays: list[float] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.delays:
            await asyncio.sleep(self.delays.pop(0))
        if self.refusals > 0:
            self.refusals -= 1
            writer.transport.abort()
            return
        await super()._handle(reader, writer)


async def _proxied_client(container: ExecutionContainer, **options: Any) -> tuple[RefusingProxy, ExecutionClient]:
    proxy = RefusingProxy(container.executor_port)
    port = await proxy.start()
    token = _tokens.lookup("127.0.0.1", container.executor_port)
    client = ExecutionClient(port=port, host="127.0.0.1", token=token, **options)
    await client.connect()
    return proxy, client


# One display message of 2 MB: more than max_output_bytes=1000 plus the 1 MiB frame slack, so the
# client refuses it by its header and re-opens the websocket. (Stream text would not do: the kernel
# sends it in chunks the client can read.)
OVERSIZE = "import time; display({'text/html': 'x' * 2_000_000}, raw=True); time.sleep(0.3); print('end')"


async def test_oversize_reopen_retries_like_a_cut(container: ExecutionContainer) -> None:
    proxy, client = await _proxied_client(container, max_output_bytes=1000)
    try:
        # The first re-open attempts fail (aiohttp itself retries a reset connection once), the next
        # one goes through.
        proxy.refusals = 2
        result = await (await client.submit(OVERSIZE)).result(timeout=30)
        assert result.truncated and result.dropped_bytes >= 2_000_000
        assert (await client.execute("print('next')")).text == "next"
    finally:
        await client.disconnect()
        await proxy.close()


async def test_oversize_reopen_that_fails_reports_unknown_outcome(container: ExecutionContainer) -> None:
    proxy, client = await _proxied_client(container, max_output_bytes=1000)
    try:
        proxy.refuse = True
        execution = await client.submit(OVERSIZE)
        with pytest.raises(ExecutionOutcomeUnknownError) as info:
            await execution.result(timeout=30)
        assert "may or may not have run" in str(info.value)
    finally:
        proxy.refuse = False
        await client.disconnect()
        await proxy.close()


async def test_submit_cancelled_during_reopen_is_forgotten(container: ExecutionContainer) -> None:
    """A submit() cancelled while the websocket is re-opened must not stay pending: a later
    oversize message would be charged to it instead of the execution that sent it."""
    proxy, client = await _proxied_client(container, max_output_bytes=1000)
    try:
        proxy.delays = [0.4]  # the re-open takes 0.4 s: submit() waits meanwhile
        first = await client.submit(OVERSIZE)
        await asyncio.sleep(0.15)  # the oversize message has arrived and closed the websocket
        waiting = asyncio.create_task(client.submit("print('never sent')"))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await first.result(timeout=30)
        assert pending(client) == 0
        # The next oversize message is charged to the execution that sent it.
        result = await (await client.submit(OVERSIZE)).result(timeout=30)
        assert result.truncated and result.dropped_bytes >= 2_000_000, result
    finally:
        await client.disconnect()
        await proxy.close()


async def test_result_cancelled_at_every_await_point(client: ExecutionClient) -> None:
    """Cancel `result()` after N turns of the event loop (every N up to 16, then doubling) until it
    completes first: the execution can be read again afterwards and nothing stays pending."""
    for turns in [*range(16), *(2**k for k in range(4, 20))]:
        execution = await client.submit(f"print({turns})")
        task = asyncio.create_task(execution.result(timeout=30))
        for _ in range(turns):
            await asyncio.sleep(0)
        cancelled = task.cancel()
        try:
            result = await task
        except asyncio.CancelledError:
            result = await execution.result(timeout=30)
        assert result.text == str(turns)
        assert pending(client) == 0
        if not cancelled:
            break
    else:
        pytest.fail("result() never completed")


async def test_submit_cancelled_at_every_await_point(client: ExecutionClient) -> None:
    marker = uuid.uuid4().hex
    for turns in range(50):
        task = asyncio.create_task(client.submit(f"print('{marker}-{turns}')"))
        for _ in range(turns):
            await asyncio.sleep(0)
        cancelled = task.cancel()
        try:
            execution = await task
        except asyncio.CancelledError:
            execution = None
        if execution is not None:
            assert (await execution.result(timeout=30)).text == f"{marker}-{turns}"
        # Whatever happened, the client still works and routes nothing to a lost execution.
        assert (await client.execute("print('ok')")).text == "ok"
        assert pending(client) == 0
        if not cancelled:
            break


COUNT_KERNELS = """
import os
count = 0
for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
        cmdline = open(f'/proc/{pid}/cmdline', 'rb').read()
    except OSError:
        continue
    count += b'.json' in cmdline and b'kernel' in cmdline
print(count)
"""


async def test_connect_cancelled_at_every_await_point(shared_container: ExecutionContainer) -> None:
    """A connect() cancelled at any point leaves no kernel in the gateway and no open session."""

    async def kernels() -> int:
        """Kernel processes running in the container (the gateway does not list kernels)."""
        async with ExecutionClient(port=shared_container.executor_port) as probe:
            result = await probe.execute(COUNT_KERNELS)
        return int(result.text or "0") - 1  # the probe's own kernel

    before = await kernels()
    # Loop turns are cheap while connect() waits on the network: every count up to 8, then doubling
    # until connect() completes first. Every await point of connect() lies in one of these spans.
    for turns in [*range(8), *(2**k for k in range(3, 24))]:
        client = ExecutionClient(port=shared_container.executor_port)
        task = asyncio.create_task(client.connect())
        for _ in range(turns):
            await asyncio.sleep(0)
        cancelled = task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            assert client.state in (ClientState.NEW, ClientState.CLOSED), client.state
        else:
            await client.disconnect()
        if not cancelled:
            break
    else:
        pytest.fail("connect() never completed")
    # Shutting a kernel down is asynchronous in the gateway; give it a moment.
    for _ in range(50):
        if await kernels() <= before:
            break
        await asyncio.sleep(0.2)
    assert await kernels() <= before
