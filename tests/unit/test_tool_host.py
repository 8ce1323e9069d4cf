"""ToolHost and the sandbox side of host-side MCP servers (`ipybox_server.tool_hosts`), in one process.

The resource app runs in-process (aiohttp's TestServer: origin and token checks as in the container),
the ToolHost connects to it with a real websocket, and its MCP servers are real stdio servers on this
host (tests/mcp_server). What a kernel's call does in the sandbox's server is `tool_hosts.call`, called
here directly. Containers and cells: tests/integration/test_tool_host.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ipybox" / "_image"))

from ipybox._errors import AuthenticationError, InvalidServerParamsError, InvalidStateError, ToolHostError  # noqa: E402
from ipybox.resource.client import ResourceClient  # noqa: E402
from ipybox.tool_host import ToolHost  # noqa: E402
from ipybox_server import mcp_call, resource, tool_hosts, tools  # noqa: E402

TOKEN = "unit-secret"
HOST_SERVER = Path(__file__).resolve().parents[1] / "mcp_server" / "host_server.py"
TEST_SERVER = Path(__file__).resolve().parents[1] / "mcp_server" / "server.py"
MARKER = "host-marker-" + os.urandom(8).hex()


def host_server(**env: str) -> dict[str, Any]:
    return {"command": sys.executable, "args": [str(HOST_SERVER)], "env": env}


@pytest.fixture
async def port() -> AsyncIterator[int]:
    server = TestServer(resource.create_app(TOKEN), host="127.0.0.1")
    await server.start_server()
    try:
        yield server.port  # type: ignore[misc]
    finally:
        await server.close()


def unique(prefix: str) -> str:
    # tool_hosts' registry is module state shared by every test of the session
    return f"{prefix}_{os.urandom(4).hex()}"


async def call(server: str, tool: str, arguments: dict[str, Any] | None = None, timeout: float | None = 30) -> Any:
    return await tool_hosts.call(server, tool, arguments or {}, timeout)


async def failure(server: str, tool: str, arguments: dict[str, Any] | None = None, timeout: float | None = 30) -> Any:
    with pytest.raises(tool_hosts.Failed) as info:
        await call(server, tool, arguments, timeout)
    return info.value


async def test_calls_reach_the_host_server_and_its_env_stays_on_the_host(port: int) -> None:
    name = unique("host")
    async with ToolHost(port, {name: host_server(IPYBOX_HOST_MARKER=MARKER)}, "127.0.0.1", token=TOKEN) as host:
        assert tool_hosts.serves(name) and host.connected
        digest = await call(name, "marker_sha256")
        assert not digest["is_error"] and digest["text"] == hashlib.sha256(MARKER.encode()).hexdigest()
        assert (await call(name, "add", {"a": 2, "b": 3}))["structured"] == {"result": 5}
        # Concurrent calls on the one session; each answer comes back to its own caller.
        answers = await asyncio.gather(*(call(name, "add", {"a": i, "b": 1}) for i in range(20)))
        assert [a["structured"]["result"] for a in answers] == [i + 1 for i in range(20)]
        pids = {(await call(name, "pid"))["text"] for _ in range(3)}
        assert len(pids) == 1, "one session serves every call"
        assert host.stats()[name]["starts"] == 1
        assert tool_hosts.describe()[name] == {"where": "host", "pid": None, "connected": True, "calls": 25}


async def test_the_repository_test_server_results_and_tool_errors(port: int) -> None:
    name = unique("test")
    params = {"command": sys.executable, "args": [str(TEST_SERVER)]}
    async with ToolHost(port, {name: params}, "127.0.0.1", token=TOKEN):
        assert (await call(name, "echo", {"text": "hi"}))["text"] == "hi"
        assert (await call(name, "stats", {"values": [1, 2]}))["structured"] == {"count": 2, "total": 3}
        failed = await call(name, "fail")
        assert failed["is_error"] and "the tool failed on purpose" in failed["text"]
        unknown = await call(name, "no_such_tool")
        assert unknown["is_error"] and "no_such_tool" in unknown["text"]


async def test_an_unknown_name_is_unknown_and_a_departed_one_is_unavailable(port: int) -> None:
    name = unique("gone")
    assert (await failure(name, "pid")).kind == "unknown_server"
    async with ToolHost(port, {name: host_server()}, "127.0.0.1", token=TOKEN):
        await call(name, "pid")
    assert tool_hosts.serves(name)
    gone = await failure(name, "pid")
    assert gone.kind == "unavailable" and name in str(gone) and "ToolHost" in str(gone)


async def test_closing_the_tool_host_mid_call_fails_the_call_at_once(port: int) -> None:
    name = unique("midcall")
    host = ToolHost(port, {name: host_server()}, "127.0.0.1", token=TOKEN)
    await host.start()
    pending = asyncio.create_task(call(name, "sleep", {"seconds": 60}, timeout=None))
    await asyncio.sleep(1.0)
    start = time.monotonic()
    await host.close()
    with pytest.raises(tool_hosts.Failed) as info:
        await asyncio.wait_for(pending, 10)
    assert info.value.kind == "unavailable"
    assert time.monotonic() - start < 10


async def test_a_killed_tool_host_process_fails_the_call_at_once(port: int, tmp_path: Path) -> None:
    """The host's process dies (SIGKILL): its socket closes and the sandbox fails the pending call."""
    name = unique("killed")
    script = tmp_path / "host.py"
    script.write_text(
        "import asyncio, json, sys\n"
        "from ipybox.tool_host import ToolHost\n"
        "async def main():\n"
        f"    async with ToolHost({port}, json.loads(sys.argv[1]), '127.0.0.1', token={TOKEN!r}):\n"
        "        print('ready', flush=True)\n"
        "        await asyncio.sleep(600)\n"
        "asyncio.run(main())\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), json.dumps({name: host_server()}), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        assert await asyncio.wait_for(process.stdout.readline(), 60) == b"ready\n"
        pending = asyncio.create_task(call(name, "sleep", {"seconds": 60}, timeout=None))
        await asyncio.sleep(1.0)
        process.send_signal(signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(tool_hosts.Failed) as info:
            await asyncio.wait_for(pending, 10)
        assert info.value.kind == "unavailable"
        assert time.monotonic() - start < 5
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_a_crashed_server_fails_its_call_and_the_next_call_restarts_it(port: int) -> None:
    name = unique("crash")
    async with ToolHost(port, {name: host_server()}, "127.0.0.1", token=TOKEN) as host:
        first = int((await call(name, "pid"))["text"])
        crashed = await failure(name, "exit_now")
        assert crashed.kind == "crash" and "exit_now" in str(crashed)
        second = int((await call(name, "pid"))["text"])
        assert second != first and host.stats()[name]["starts"] == 2
        # Killed between calls: the next call finds the session dead and starts it again.
        os.kill(second, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            try:
                third = int((await call(name, "pid"))["text"])
                break
            except tool_hosts.Failed as exc:  # the call that saw the death
                assert exc.kind == "crash"
                assert time.monotonic() < deadline
        assert third not in (first, second)


async def test_a_connection_the_sandbox_drops_is_opened_again(port: int) -> None:
    name = unique("reconnect")
    async with ToolHost(port, {name: host_server()}, "127.0.0.1", token=TOKEN) as host:
        before = int((await call(name, "pid"))["text"])
        await tool_hosts._served[name].ws.close()  # as a missed heartbeat would
        assert (await failure(name, "pid")).kind == "unavailable"
        deadline = time.monotonic() + 10
        while not (name in tool_hosts._served and host.connected):
            assert time.monotonic() < deadline, "the ToolHost did not reconnect"
            await asyncio.sleep(0.1)
        assert int((await call(name, "pid"))["text"]) == before, "the host's session outlives the connection"


async def test_a_timed_out_call_is_cancelled_on_the_host(port: int) -> None:
    name = unique("timeout")
    async with ToolHost(port, {name: host_server()}, "127.0.0.1", token=TOKEN) as host:
        timed_out = await failure(name, "sleep", {"seconds": 30}, timeout=0.5)
        assert timed_out.kind == "timeout" and "CALL_TIMEOUT" in str(timed_out)
        deadline = time.monotonic() + 5
        while host.stats()[name]["running"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert host.stats()[name]["running"] == 0, "the host still runs the abandoned call"
        assert (await call(name, "add", {"a": 1, "b": 1}))["structured"] == {"result": 2}


async def test_a_name_registered_in_the_sandbox_is_refused(port: int) -> None:
    name = unique("taken")
    tools.register(name, {"type": "stdio", "command": "true", "args": []})
    try:
        with pytest.raises(ToolHostError, match=f"{name}.*registered in the sandbox"):
            async with ToolHost(port, {name: host_server()}, "127.0.0.1", token=TOKEN):
                pass
        assert not tool_hosts.serves(name)
    finally:
        await tools.unregister(name)


async def test_an_offered_name_cannot_be_registered_in_the_sandbox_until_its_host_leaves(port: int) -> None:
    name = unique("held")
    params = {"command": "true"}
    async with aiohttp.ClientSession(headers={"Authorization": f"token {TOKEN}"}) as session:
        url = f"http://127.0.0.1:{port}/tools/servers/{name}"
        async with ToolHost(port, {name: host_server()}, "127.0.0.1", token=TOKEN):
            async with session.put(url, json=params) as response:
                assert response.status == 409 and "served by the host" in (await response.json())["error"]
        async with session.put(url, json=params) as response:
            assert response.status == 200
    try:
        assert not tool_hosts.serves(name) and tools.registered_in_sandbox(name)
    finally:
        await tools.unregister(name)


async def test_a_newer_offer_of_a_name_takes_it_over(port: int) -> None:
    name = unique("twice")
    async with ToolHost(port, {name: host_server(IPYBOX_HOST_MARKER="first")}, "127.0.0.1", token=TOKEN):
        async with ToolHost(port, {name: host_server(IPYBOX_HOST_MARKER="second")}, "127.0.0.1", token=TOKEN):
            assert (await call(name, "marker_sha256"))["text"] == hashlib.sha256(b"second").hexdigest()
        # The newer one left: the name is gone with it (not handed back to the older one).
        assert (await failure(name, "pid")).kind == "unavailable"


async def test_a_server_that_cannot_start_fails_start_and_leaves_nothing(port: int) -> None:
    name = unique("broken")
    params = {
        "command": sys.executable,
        "args": ["-c", "import sys; sys.stderr.write('no such thing\\n'); sys.exit(2)"],
    }
    with pytest.raises(ToolHostError, match=f"{name}.*could not start.*no such thing"):
        async with ToolHost(port, {name: params}, "127.0.0.1", token=TOKEN):
            pass
    assert not tool_hosts.serves(name)


async def test_wrong_secret(port: int) -> None:
    with pytest.raises(AuthenticationError):
        async with ToolHost(port, {unique("auth"): host_server()}, "127.0.0.1", token="wrong"):
            pass


async def test_lifecycle() -> None:
    host = ToolHost(1, {"a": host_server()})
    await host.close()
    await host.close()
    with pytest.raises(InvalidStateError):
        await host.start()
    with pytest.raises(InvalidStateError):
        await host.generate_mcp_sources()


@pytest.mark.parametrize(
    ("servers", "error", "match"),
    [
        ({"gh": {"url": "http://[YOUR-HOST-IP-ADDRESS]:8000/mcp"}}, InvalidServerParamsError, "YOUR-HOST-IP-ADDRESS"),
        ({"gh": {"command": ""}}, InvalidServerParamsError, "command"),
        ({"gh": {"url": "ftp://example/mcp"}}, InvalidServerParamsError, "http"),
        ({"not-a-name": {"command": "x"}}, ValueError, "identifier"),
        ({"class": {"command": "x"}}, ValueError, "identifier"),
        ({}, ValueError, "at least one"),
    ],
)
def test_bad_parameters_are_refused_before_anything_starts(servers: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ToolHost(1, servers)


async def test_the_offer_frames_are_checked(port: int) -> None:
    """What the sandbox's server does with offers other than a ToolHost's."""
    async with aiohttp.ClientSession(headers={"Authorization": f"token {TOKEN}"}) as session:
        url = f"http://127.0.0.1:{port}/tools/host"
        for offer in (
            {"type": "hello"},
            {"type": "offer", "servers": []},
            {"type": "offer", "servers": ["a-b"]},
            {"type": "offer", "servers": ["x", "x"]},
        ):
            async with session.ws_connect(url) as ws:
                await ws.send_json(offer)
                reply = await ws.receive_json(timeout=5)
                assert reply["type"] == "refused", (offer, reply)
        async with session.get(url) as response:  # not an upgrade
            assert response.status == 400 and "websocket" in (await response.json())["error"]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/tools/host") as response:
            assert response.status == 401


async def test_generation_sends_the_tool_list_not_the_parameters(port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[dict[str, Any]] = []

    async def record(link: Any, server_name: str, body: dict[str, Any]) -> list[str]:
        sent.append(body)
        return ["recorded"]

    monkeypatch.setattr("ipybox.resource._mcp._generate", record)
    name = unique("gen")
    async with ToolHost(port, {name: host_server(IPYBOX_HOST_MARKER=MARKER)}, "127.0.0.1", token=TOKEN) as host:
        assert await host.generate_mcp_sources("pkgs") == {name: ["recorded"]}
    [body] = sent
    assert body["relpath"] == "pkgs" and body["server_name"] == name and "server_params" not in body
    assert {tool["name"] for tool in body["tools"]} == {"marker_sha256", "pid", "sleep", "exit_now", "add"}
    add = next(tool for tool in body["tools"] if tool["name"] == "add")
    assert add["inputSchema"]["required"] == ["a", "b"] and "outputSchema" in add
    assert MARKER not in json.dumps(body) and "host_server.py" not in json.dumps(body)


async def test_resource_client_refuses_the_placeholder_url_before_sending(port: int) -> None:
    """Issue 15 point 5: the seed's example 10b URL. Before: RemotePathError from the server's 400."""
    async with ResourceClient(port, "127.0.0.1", token=TOKEN) as client:
        with pytest.raises(InvalidServerParamsError) as info:
            await client.generate_mcp_sources("mcpgen", "github", {"url": "http://[YOUR-HOST-IP-ADDRESS]:8000/mcp"})
    message = str(info.value)
    assert "http://[YOUR-HOST-IP-ADDRESS]:8000/mcp" in message and "host name or address" in message
    assert isinstance(info.value, ValueError)


def test_content_text_renders_each_block_kind() -> None:
    from mcp.types import CallToolResult, EmbeddedResource, ImageContent, TextContent, TextResourceContents

    result = CallToolResult(
        content=[
            TextContent(type="text", text="one"),
            ImageContent(type="image", data="AA==", mime_type="image/png"),
            EmbeddedResource(type="resource", resource=TextResourceContents(uri="file:///x", text="two")),
        ]
    )
    assert mcp_call.content_text(result) == "one\n[image content not shown]\ntwo"
