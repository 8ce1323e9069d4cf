"""Approvals of tool calls and shell escapes (issue 15) against a real sandbox.

The repository's MCP test server (tests/mcp_server/server.py) runs in the sandbox on the machinery
environment's Python (mcp 2.x, no network needed); its package is generated under /app/mcptools/test.
Each test connects its own client (a kernel of its own), so approvals are per test.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ipybox import ExecutionClient, ExecutionContainer, ExecutionTimeoutError, InvalidStateError, ResourceClient
from ipybox._wire import V1_PROTOCOL, decode_v1
from ipybox.approvals import AllowList
from ipybox.executor import Execution
from ipybox.outputs import ApprovalState, Error, ToolCallRequest

from .conftest import ContainerFactory, session_labels

SERVER_SOURCE = Path(__file__).parent.parent / "mcp_server" / "server.py"
PARAMS = {"command": "/opt/ipybox/venv/bin/python", "args": ["/app/mcp_test_server.py", "stdio"]}
IMPORTS = "from mcptools.test import ToolDenied, ToolApprovalExpired, echo, stats\n"


def echo_call(text: str) -> str:
    return f"echo.echo(echo.Params(text={text!r}))"


@pytest.fixture(scope="module")
async def container(image: str) -> AsyncIterator[ExecutionContainer]:
    async with ExecutionContainer(tag=image, labels=session_labels()) as container:
        async with ResourceClient(port=container.resource_port) as resources:
            await resources.upload_file("mcp_test_server.py", SERVER_SOURCE)
            await resources.generate_mcp_sources("mcptools", "test", PARAMS)
        yield container


def client_for(container: ExecutionContainer, **kwargs: Any) -> ExecutionClient:
    return ExecutionClient(port=container.executor_port, **kwargs)


async def requests_and_result(execution: Execution, decide: Any = None, timeout: float = 60) -> list[ToolCallRequest]:
    """Read `execution` with events(); each request goes to `decide` (if given); the requests seen."""
    seen = []
    async for event in execution.events(timeout=timeout):
        if isinstance(event, ToolCallRequest):
            seen.append(event)
            if decide is not None:
                await decide(event)
    return seen


async def test_approvals_are_off_by_default(container: ExecutionContainer) -> None:
    async with client_for(container) as client:
        execution = await client.submit(IMPORTS + f"print({echo_call('plain')})\n!echo shell-plain")
        events = [event async for event in execution.events()]
        result = await execution.result()
    assert not any(isinstance(event, ToolCallRequest) for event in events)
    assert result.text == "plain\nshell-plain"


async def test_an_allow_list_approves_and_denies(container: ExecutionContainer) -> None:
    async with client_for(container, approvals=AllowList(["test.echo"])) as client:
        assert (await client.execute(IMPORTS + f"print({echo_call('allowed')})")).text == "allowed"
        code = IMPORTS + "try:\n    stats.stats(stats.Params(values=[1]))\nexcept ToolDenied as exc:\n    print(exc)"
        text = (await client.execute(code)).text
    assert text == "test.stats: test.stats is not in the application's allow-list"


async def test_the_reader_approves_and_denies(container: ExecutionContainer) -> None:
    async with client_for(container, approvals=True) as client:
        execution = await client.submit(IMPORTS + f"print({echo_call('read')})")
        seen = await requests_and_result(execution, lambda request: request.approve())
        assert (await execution.result()).text == "read"
        assert [(r.kind, r.server, r.tool, r.arguments, r.state) for r in seen] == [
            ("tool", "test", "echo", {"text": "read"}, ApprovalState.APPROVED)
        ]
        assert seen[0].decided_by == "reader"

        code = (
            IMPORTS
            + f"try:\n    {echo_call('no')}\nexcept ToolDenied as exc:\n    print(type(exc).__name__, exc.reason)"
        )
        execution = await client.submit(code)
        seen = await requests_and_result(execution, lambda request: request.deny("not today"))
        assert (await execution.result()).text == "ToolDenied not today"
        with pytest.raises(InvalidStateError, match="denied already by the reader"):
            await seen[0].approve()


async def test_a_request_nobody_decides_expires(container: ExecutionContainer) -> None:
    async with client_for(container, approvals=True, approval_timeout=1) as client:
        code = (
            IMPORTS + f"try:\n    {echo_call('late')}\nexcept ToolApprovalExpired as exc:\n    print('expired:', exc)"
        )
        execution = await client.submit(code)
        started = time.monotonic()
        seen = await requests_and_result(execution)
        result = await execution.result()
    assert 1 <= time.monotonic() - started < 10
    assert result.text is not None and result.text.startswith(
        "expired: test.echo: not approved: no decision within 1 s"
    )
    assert seen[0].state is ApprovalState.EXPIRED and seen[0].decided_by == "sandbox"
    with pytest.raises(InvalidStateError, match="expired already by the sandbox .no decision within 1 s"):
        await seen[0].approve()


async def test_a_decision_after_the_execution_ended_is_refused(container: ExecutionContainer) -> None:
    async with client_for(container, approvals=True) as client:
        # The call comes from a thread the cell leaves running: its request is still open at the end.
        code = (
            IMPORTS
            + "import threading, time\nanswers = []\n"
            + f"def late():\n    try:\n        answers.append({echo_call('thread')})\n"
            + "    except ToolDenied as exc:\n        answers.append(exc.reason)\n"
            + "worker = threading.Thread(target=late)\nworker.start()\ntime.sleep(1)"
        )
        execution = await client.submit(code)
        seen = await requests_and_result(execution)  # read, never decided
        await execution.result()
        assert seen and seen[0].state is ApprovalState.DENIED
        with pytest.raises(InvalidStateError, match="its execution ended before a decision"):
            await seen[0].approve()
        with pytest.raises(InvalidStateError, match="its execution ended before a decision"):
            await seen[0].deny()
        text = (await client.execute("worker.join(10); print(answers)")).text
    assert text == "['its execution ended before a decision']"


async def test_many_concurrent_calls_are_each_decided(container: ExecutionContainer) -> None:
    async with client_for(container, approvals=True) as client:
        code = (
            IMPORTS
            + "from concurrent.futures import ThreadPoolExecutor\n"
            + "def one(i):\n    try:\n        return echo.echo(echo.Params(text=str(i)))\n"
            + "    except ToolDenied as exc:\n        return 'denied ' + exc.reason\n"
            + "with ThreadPoolExecutor(8) as pool:\n    print(list(pool.map(one, range(8))))"
        )
        execution = await client.submit(code)

        async def even_only(request: ToolCallRequest) -> None:
            if int(request.arguments["text"]) % 2 == 0:
                await request.approve()
            else:
                await request.deny(f"odd {request.arguments['text']}")

        seen = await requests_and_result(execution, even_only)
        text = (await execution.result()).text
    assert sorted(int(request.arguments["text"]) for request in seen) == list(range(8))
    expected = [str(i) if i % 2 == 0 else f"denied odd {i}" for i in range(8)]
    assert text == str(expected)


async def test_waiting_for_approval_does_not_count_against_the_timeout(container: ExecutionContainer) -> None:
    async with client_for(container, approvals=True) as client:
        execution = await client.submit(IMPORTS + f"print({echo_call('slow decision')})")

        async def after_three_seconds(request: ToolCallRequest) -> None:
            await asyncio.sleep(3)
            await request.approve()

        await requests_and_result(execution, after_three_seconds, timeout=2)
        assert (await execution.result()).text == "slow decision"
        # The clock still runs for the code itself.
        with pytest.raises(ExecutionTimeoutError):
            await client.execute("import time; time.sleep(5)", timeout=1)


async def test_a_reopened_websocket_gets_the_open_request_again(container: ExecutionContainer) -> None:
    async with client_for(container, approvals=True) as client:
        execution = await client.submit(IMPORTS + f"print({echo_call('after the cut')})")
        events = execution.events()
        request = await anext(event async for event in events if isinstance(event, ToolCallRequest))

        # Another websocket of the kernel that connects while the request is open gets it.
        transport = client._transport
        assert transport is not None and transport._session is not None
        async with transport._session.ws_connect(
            f"/api/kernels/{client.kernel_id}/channels",
            params={"session_id": uuid.uuid4().hex},
            protocols=(V1_PROTOCOL,),
        ) as other:
            async with asyncio.timeout(10):
                while True:
                    message = decode_v1((await other.receive()).data)
                    if message["channel"] == "ipybox":
                        break
        assert message["msg_type"] == "ipybox_approval_request"
        assert message["content"]["id"] == request.id
        assert message["parent_header"]["msg_id"] == execution.msg_id

        # The client's own websocket breaks; the re-opened one carries the decision.
        assert transport.ws is not None
        await transport.ws.close()
        await request.approve()
        async for _ in events:
            pass
        assert (await execution.result()).text == "after the cut"


async def test_a_caller_outside_every_kernel_is_refused_while_approvals_are_on(
    container: ExecutionContainer,
) -> None:
    # A process that left its kernel's tree (sh exits, its background child is re-parented).
    escape = (
        "import os, subprocess, sys, time\n"
        "script = 'from mcptools.test import ToolDenied, echo\\n"
        'try:\\n    print(echo.echo(echo.Params(text="outside")))\\n'
        'except ToolDenied as exc:\\n    print("denied:", exc.reason)\\n\'\n'
        "out = f'/tmp/outside-{os.getpid()}-{time.time_ns()}'\n"
        "env = {**os.environ, 'PYTHONPATH': os.pathsep.join(p for p in sys.path if p)}\n"
        "subprocess.run(['sh', '-c', f'({sys.executable} -c \"$0\" > {out} 2>&1 &)', script], env=env, check=True)\n"
        "for _ in range(200):\n"
        "    if os.path.exists(out) and open(out).read().strip():\n        break\n"
        "    time.sleep(0.05)\n"
        "time.sleep(0.2)\nprint(open(out).read().strip())"
    )
    async with client_for(container) as plain:
        assert (await plain.execute(escape)).text == "outside"  # approvals off everywhere: it runs
        async with client_for(container, approvals=AllowList(["test"])) as approving:
            text = (await plain.execute(escape)).text
            assert text is not None and text.startswith("denied: refused: the caller is a process outside every kernel")
            # The plain client's own kernel is not affected by the other kernel's approvals.
            assert (await plain.execute(IMPORTS + f"print({echo_call('own kernel')})")).text == "own kernel"
            assert (await approving.execute(IMPORTS + f"print({echo_call('approved')})")).text == "approved"


async def test_shell_escapes_are_approved_or_denied(container: ExecutionContainer) -> None:
    asked: list[tuple[str, str]] = []

    async def no_rm(request: ToolCallRequest) -> bool | str:
        asked.append((request.tool, request.arguments["command"]))
        return "no rm, please" if "rm " in request.arguments["command"] else True

    async with client_for(container, approvals=no_rm) as client:
        assert (await client.execute("x = 'world'\n!echo hello {x}")).text == "hello world"
        assert (await client.execute("%%bash\necho from bash")).text == "from bash"
        assert (await client.execute("files = !echo a b\nprint(files)")).text == "['a b']"
        result = await client.execute("!rm -f /tmp/nothing", raise_on_error=False)
        assert result.error is not None and result.error.name == "ShellEscapeDenied"
        assert "no rm, please" in result.error.value
        result = await client.execute("%%bash\nrm -f /tmp/nothing", raise_on_error=False)
        assert result.error is not None and result.error.name == "ShellEscapeDenied"
    assert asked[0] == ("system", "echo hello world")
    assert asked[1][0] == "%%bash" and "echo from bash" in asked[1][1]
    assert asked[2] == ("getoutput", "echo a b")


async def test_policies_per_execution_and_per_client(container: ExecutionContainer) -> None:
    async def only_short_texts(request: ToolCallRequest) -> bool | str:
        await asyncio.sleep(0)
        return len(request.arguments.get("text", "")) < 5 or "too long"

    async with client_for(container, approvals=AllowList(["shell"])) as client:
        code = IMPORTS + "for text in ['hi', 'much too long']:\n"
        code += "    try:\n        print(echo.echo(echo.Params(text=text)))\n"
        code += "    except ToolDenied as exc:\n        print(exc.reason)"
        text = (await client.execute(code, approve=only_short_texts)).text
        assert text == "hi\ntoo long"
        # The client's policy for the others; a policy's decisions show in events().
        execution = await client.submit(IMPORTS + f"{echo_call('x')}")
        seen = await requests_and_result(execution)
        result = await execution.result(raise_on_error=False)
        assert result.error is not None and result.error.name == "ToolDenied"
        assert seen[0].state is ApprovalState.DENIED and seen[0].decided_by == "policy"
        assert seen[0].reason == "test.echo is not in the application's allow-list"


async def test_without_a_policy_result_readers_deny(container: ExecutionContainer) -> None:
    async with client_for(container, approvals=True) as client:
        result = await client.execute(IMPORTS + echo_call("x"), raise_on_error=False)
    assert result.error is not None and result.error.name == "ToolDenied"
    assert "no approval policy decides it" in result.error.value


async def test_an_interrupted_call_withdraws_its_request(container: ExecutionContainer) -> None:
    async with client_for(container, approvals=True) as client:
        execution = await client.submit(IMPORTS + echo_call("interrupted"))
        events = execution.events()
        request = await anext(event async for event in events if isinstance(event, ToolCallRequest))
        await client.interrupt()
        errors = [event async for event in events if isinstance(event, Error)]
        assert errors and errors[0].error.name == "KeyboardInterrupt"
        async with asyncio.timeout(10):
            while request.state is ApprovalState.PENDING:
                await asyncio.sleep(0.05)
        # The sandbox withdraws it (the caller closed its connection), or the end of the execution
        # denies it, whichever the host sees first.
        assert (request.state, request.reason) in {
            (ApprovalState.EXPIRED, "the caller went away before a decision (interrupted?)"),
            (ApprovalState.DENIED, "its execution ended before a decision"),
        }
        with pytest.raises(InvalidStateError):
            await request.approve()


async def test_the_first_kernel_of_a_sandbox_and_a_reset_one_are_attributed(make_container: ContainerFactory) -> None:
    # The pre-started kernel has a provisioner of its own (prewarm.py); a reset kernel a new process.
    container = await make_container()
    async with client_for(container, approvals=AllowList(["shell.system"])) as client:
        assert (await client.execute("!echo first")).text == "first"
        result = await client.execute("%%bash\necho no", raise_on_error=False)
        assert result.error is not None and result.error.name == "ShellEscapeDenied"
        await client.reset()
        assert (await client.execute("!echo reset")).text == "reset"
        result = await client.execute("%%bash\necho no", raise_on_error=False)
        assert result.error is not None and result.error.name == "ShellEscapeDenied"


async def test_a_call_after_its_cell_ended_is_decided_by_the_client_policy_only(container: ExecutionContainer) -> None:
    start_late_call = (
        IMPORTS
        + "import threading, time\nanswers = []\n"
        + f"def late():\n    time.sleep(1)\n    try:\n        answers.append({echo_call('late')})\n"
        + "    except ToolDenied as exc:\n        answers.append(exc.reason)\n"
        + "worker = threading.Thread(target=late)\nworker.start()"
    )
    # The call comes while no execution runs (one running would be named by the kernel as the call's).
    async with client_for(container, approvals=True) as client:
        await client.execute(start_late_call)
        await asyncio.sleep(2.5)
        text = (await client.execute("worker.join(10); print(answers)")).text
    assert text is not None and text.startswith("['its execution is not running (the call came from code that outlived")
    async with client_for(container, approvals=AllowList(["test.echo"])) as client:
        await client.execute(start_late_call)
        await asyncio.sleep(2.5)
        assert (await client.execute("worker.join(10); print(answers)")).text == "['late']"
