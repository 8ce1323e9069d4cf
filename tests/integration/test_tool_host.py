"""Host-side MCP servers (issue 15): servers run on the host (ToolHost), cells call them through generated
modules, and nothing of their parameters enters the sandbox.

Servers on the host: the repository's stdio test server, tests/mcp_server/host_server.py (a marker in its
env, its pid, sleeps, exits mid-call), mcp-server-time from PyPI (`uvx`) and server-everything from npm
(`npx`), both fetched from the registries.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ipybox import ExecutionClient, ExecutionContainer, ResourceClient
from ipybox._errors import (
    ExecutionError,
    ExecutionTimeoutError,
    InvalidServerParamsError,
    RemoteFileNotFoundError,
    ResourceError,
)
from ipybox.tool_host import ToolHost
from tests.integration.conftest import ContainerFactory

MCP_DIR = Path(__file__).resolve().parents[1] / "mcp_server"
HOST_SERVER = MCP_DIR / "host_server.py"
TEST_SERVER = MCP_DIR / "server.py"
EVERYTHING = "@modelcontextprotocol/server-everything@2026.8.31"


def host_server(**env: str) -> dict[str, Any]:
    return {"command": sys.executable, "args": [str(HOST_SERVER)], "env": env}


@pytest.fixture
async def container(make_container: ContainerFactory) -> ExecutionContainer:
    return await make_container()


@pytest.fixture
async def client(container: ExecutionContainer) -> AsyncIterator[ExecutionClient]:
    async with ExecutionClient(port=container.executor_port) as client:
        yield client


async def output(client: ExecutionClient, code: str, timeout: float = 120) -> str:
    result = await client.execute(code, timeout=timeout)
    return result.text or ""


async def test_cells_call_host_side_servers_through_generated_modules(
    container: ExecutionContainer, client: ExecutionClient
) -> None:
    servers = {
        "repo": {"command": sys.executable, "args": [str(TEST_SERVER)]},
        "hostside": host_server(),
    }
    async with ToolHost(container.resource_port, servers) as tools:
        # The websocket takes ResourceClient's verified route (here: the server's own unix socket).
        assert tools._resources is not None and tools._resources._via.startswith("unix socket"), tools._resources._via
        modules = await tools.generate_mcp_sources()
        assert "echo" in modules["repo"] and "get_weather" in modules["repo"] and "add" in modules["hostside"]
        text = await output(
            client,
            "from mcptools.repo.echo import Params, echo\n"
            "from mcptools.repo import get_weather, stats, fail, ToolError\n"
            "from mcptools.hostside import add\n"
            "print(echo(Params(text='hi')))\n"
            "print(get_weather.get_weather(get_weather.Params(city='Graz', days=2)))\n"
            "print(stats.stats(stats.Params(values=[1, 2.5])))\n"
            "print(add.add(add.Params(a=2, b=40)))\n"
            "try:\n"
            "    fail.fail(fail.Params())\n"
            "except ToolError as e:\n"
            "    print('ToolError', e.server, e.tool, e)\n",
        )
        lines = text.splitlines()
        assert lines[0] == "hi"
        assert lines[1] == "Graz: sunny for 2 day(s)"
        assert lines[2] == "{'count': 2.0, 'total': 3.5}" or "count" in lines[2]
        assert lines[3] == "42"
        assert lines[4].startswith("ToolError repo fail ") and "failed on purpose" in lines[4]
        # Concurrent calls from threads of one cell, all on the host's one session.
        text = await output(
            client,
            "from concurrent.futures import ThreadPoolExecutor\n"
            "from mcptools.hostside import add, pid\n"
            "with ThreadPoolExecutor(8) as pool:\n"
            "    sums = list(pool.map(lambda i: add.add(add.Params(a=i, b=1)), range(40)))\n"
            "print(sums == [i + 1 for i in range(40)], len({pid.pid(pid.Params()) for _ in range(5)}))\n",
        )
        assert text == "True 1"
        assert tools.stats()["hostside"]["starts"] == 1


@pytest.fixture
def loopback_http_server() -> Any:
    """The repository's test server over streamable HTTP on the host's 127.0.0.1: out of the sandbox's reach."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, str(TEST_SERVER), "streamable-http", "127.0.0.1", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "the HTTP test server did not start"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def test_an_http_server_only_the_host_reaches(
    container: ExecutionContainer, client: ExecutionClient, loopback_http_server: str
) -> None:
    marker = "headermarker" + os.urandom(12).hex()
    params = {"url": loopback_http_server, "headers": {"X-Ipybox-Test": marker}}
    async with ToolHost(container.resource_port, {"remote": params}) as tools:
        await tools.generate_mcp_sources()
        text = await output(
            client,
            "from mcptools.remote.echo import Params, echo\n"
            "print(echo(Params(text='over http, from the host')))\n"
            "import urllib.request\n"
            "try:\n"
            f"    urllib.request.urlopen({loopback_http_server[::-1]!r}[::-1], timeout=3)\n"  # not in the source
            "    print('reached')\n"
            "except OSError as e:\n"
            "    print('unreachable')\n",
        )
        assert text == "over http, from the host\nunreachable"
        reversed_markers = f"[m[::-1] for m in {[marker[::-1], loopback_http_server[::-1]]!r}]"
        found = json.loads(await output(client, MARKER_SCAN.replace("MARKERS", reversed_markers), timeout=300))
        assert found[marker] == [], "the header reached the sandbox"
        assert found[loopback_http_server] == [], "the server's URL reached the sandbox"


async def test_a_pypi_server_on_the_host(container: ExecutionContainer, client: ExecutionClient) -> None:
    # mcp-server-time from PyPI, run by uvx on the host (uv is a dev dependency; it reads the host's CA bundle
    # from SSL_CERT_FILE, which the SDK's default environment for stdio servers leaves out).
    uvx = Path(sys.executable).with_name("uvx")
    env = {
        name: os.environ[name] for name in ("SSL_CERT_FILE", "UV_INDEX_URL", "UV_DEFAULT_INDEX") if name in os.environ
    }
    params = {"command": str(uvx), "args": ["mcp-server-time==2026.10.19"], "env": env}
    async with ToolHost(container.resource_port, {"hosttime": params}) as tools:
        assert sorted((await tools.generate_mcp_sources("hostpkgs"))["hosttime"]) == [
            "convert_time",
            "get_current_time",
        ]
        text = await output(
            client,
            "from hostpkgs.hosttime.get_current_time import Params, get_current_time\n"
            "now = get_current_time(Params(timezone='UTC'))\n"
            "print(now.timezone)\n",
        )
        assert text == "UTC"
        assert tools.stats()["hosttime"]["calls"] >= 1


async def test_an_npm_server_on_the_host(container: ExecutionContainer, client: ExecutionClient) -> None:
    params = {"command": "npx", "args": ["-y", EVERYTHING]}
    async with ToolHost(container.resource_port, {"everything": params}) as tools:
        modules = await tools.generate_mcp_sources("hostpkgs")
        assert "echo" in modules["everything"] and "get_sum" in modules["everything"]
        text = await output(
            client,
            "from hostpkgs.everything import echo, get_sum\n"
            "print(echo.echo(echo.Params(message='from the host')))\n"
            "print(get_sum.get_sum(get_sum.Params(a=2, b=3)))\n",
        )
        assert text.splitlines()[0] == "Echo: from the host"
        assert "5" in text.splitlines()[1]


MARKER_SCAN = r"""
import json, os, sys
markers = [m.encode() for m in MARKERS]
hits = {m.decode(): [] for m in markers}
def scan(path, data):
    for m in markers:
        if m in data:
            hits[m.decode()].append(path)
for pid in os.listdir('/proc'):
    if pid.isdigit():
        for name in ('environ', 'cmdline'):
            try:
                with open(f'/proc/{pid}/{name}', 'rb') as f:
                    scan(f'/proc/{pid}/{name}', f.read())
            except OSError:
                pass
for root, dirs, files in os.walk('/'):
    dirs[:] = [d for d in dirs if os.path.join(root, d) not in ('/proc', '/sys', '/dev')]
    for file in files:
        path = os.path.join(root, file)
        try:
            if not os.path.islink(path) and os.path.isfile(path):
                with open(path, 'rb') as f:
                    scan(path, f.read())
        except OSError:
            pass
print(json.dumps(hits))
"""


async def test_a_host_servers_marker_never_enters_the_container(
    container: ExecutionContainer, client: ExecutionClient
) -> None:
    marker = "hostmarker" + os.urandom(12).hex()
    control = "control" + os.urandom(12).hex()  # planted in the sandbox: the scans must find it
    async with ToolHost(container.resource_port, {"secretive": host_server(IPYBOX_HOST_MARKER=marker)}) as tools:
        await tools.generate_mcp_sources()
        # The host's server has the marker (its hash comes back), ...
        digest = await output(
            client, "from mcptools.secretive import marker_sha256 as m\nprint(m.marker_sha256(m.Params()))"
        )
        assert digest == hashlib.sha256(marker.encode()).hexdigest()
        # ... but no file and no process environment in the container holds it: searched by a cell (the
        # strings reversed in the cell's source, so that the kernel's history does not plant them) ...
        reversed_markers = f"[m[::-1] for m in {[marker[::-1], control[::-1]]!r}]"
        await output(client, f"open('/tmp/control', 'w').write({control[::-1]!r}[::-1])")
        found = json.loads(await output(client, MARKER_SCAN.replace("MARKERS", reversed_markers), timeout=300))
        assert found[marker] == [] and "/tmp/control" in found[control]
        # ... and by root, through docker exec (the strings on stdin, not in a command line).
        process = await asyncio.create_subprocess_exec(
            "docker", "exec", "-i", "-u", "0", container.container_id or "", "/opt/ipybox/venv/bin/python", "-c",
            MARKER_SCAN.replace("MARKERS", "json.loads(sys.stdin.read())"),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(process.communicate(json.dumps([marker, control]).encode()), 300)
        assert process.returncode == 0, stderr.decode()
        found = json.loads(stdout)
        assert found[marker] == [] and "/tmp/control" in found[control]
        # Nor does the container's configuration.
        assert marker not in repr(await _inspect(container))


async def _inspect(container: ExecutionContainer) -> dict[str, Any]:
    import aiodocker

    docker = aiodocker.Docker()
    try:
        info: dict[str, Any] = await (await docker.containers.get(container.container_id or "")).show()
        return info
    finally:
        await docker.close()


async def test_a_sandbox_calls_only_names_offered_to_it(make_container: ContainerFactory) -> None:
    first, second = await make_container(), await make_container()
    async with ToolHost(first.resource_port, {"mine": host_server()}) as tools:
        await tools.generate_mcp_sources()
        async with ExecutionClient(port=first.executor_port) as client:
            text = await output(
                client,
                "from ipybox_server.mcp_runtime import call_tool, ToolServerError\n"
                "from mcptools.mine import add\n"
                "print(add.add(add.Params(a=1, b=1)))\n"
                "try:\n"
                "    call_tool('notoffered', 'add', {'a': 1, 'b': 1})\n"
                "except ToolServerError as e:\n"
                "    print(type(e).__name__, e)\n",
            )
            assert text.splitlines()[0] == "2"
            assert text.splitlines()[1].startswith("ToolServerError notoffered.add: ")
            # A cell cannot open the host's websocket itself: it has no secret.
            text = await output(
                client,
                "import urllib.request, urllib.error\n"
                "try:\n"
                "    urllib.request.urlopen('http://localhost:8900/tools/host')\n"
                "except urllib.error.HTTPError as e:\n"
                "    print(e.code)\n",
            )
            assert text == "401"
        async with ExecutionClient(port=second.executor_port) as client:
            text = await output(
                client,
                "from ipybox_server.mcp_runtime import call_tool, ToolServerError\n"
                "try:\n"
                "    call_tool('mine', 'add', {'a': 1, 'b': 1})\n"
                "except ToolServerError as e:\n"
                "    print(type(e).__name__, e)\n",
            )
            assert text.startswith("ToolServerError mine.add: no MCP server 'mine' is registered in this sandbox")


async def test_the_tool_host_going_away_mid_call_fails_the_cell_promptly(
    container: ExecutionContainer, client: ExecutionClient
) -> None:
    tools = ToolHost(container.resource_port, {"leaving": host_server()})
    await tools.start()
    try:
        await tools.generate_mcp_sources()
        execution = await client.submit(
            "import time\n"
            "from mcptools.leaving import sleep, ToolServerError, ToolServerCrashed\n"
            "start = time.monotonic()\n"
            "try:\n"
            "    sleep.sleep(sleep.Params(seconds=120))\n"
            "except ToolServerError as e:\n"
            "    print(type(e).__name__, isinstance(e, ToolServerCrashed), round(time.monotonic() - start), e)\n"
        )
        await asyncio.sleep(2.0)
    finally:
        await tools.close()
    start = time.monotonic()
    result = await execution.result(timeout=30)
    assert time.monotonic() - start < 10
    text = result.text or ""
    assert text.startswith("ToolServerError False "), text
    assert "leaving.sleep" in text and "unavailable" in text and "ToolHost" in text
    # Later calls fail the same way, at once.
    text = await output(
        client,
        "from mcptools.leaving import add\ntry:\n    add.add(add.Params(a=1, b=1))\nexcept Exception as e:\n"
        "    print(type(e).__name__, e)\n",
    )
    assert text.startswith("ToolServerError leaving.add: host-side MCP server 'leaving' is unavailable")


async def test_a_host_server_that_crashes_is_restarted(container: ExecutionContainer, client: ExecutionClient) -> None:
    async with ToolHost(container.resource_port, {"fragile": host_server()}) as tools:
        await tools.generate_mcp_sources()
        text = await output(
            client,
            "from mcptools.fragile import pid, exit_now, ToolServerCrashed\n"
            "before = pid.pid(pid.Params())\n"
            "try:\n"
            "    exit_now.exit_now(exit_now.Params())\n"
            "except ToolServerCrashed as e:\n"
            "    print('crashed', e.server, e.tool)\n"
            "after = pid.pid(pid.Params())\n"
            "print(before != after)\n",
        )
        assert text == "crashed fragile exit_now\nTrue"
        assert tools.stats()["fragile"]["starts"] == 2


async def test_a_timed_out_host_call_raises_tool_timeout(
    container: ExecutionContainer, client: ExecutionClient
) -> None:
    async with ToolHost(container.resource_port, {"slow": host_server()}) as tools:
        await tools.generate_mcp_sources()
        text = await output(
            client,
            "from ipybox_server import mcp_runtime\n"
            "from mcptools.slow import sleep, add, ToolTimeout\n"
            "mcp_runtime.CALL_TIMEOUT = 1.0\n"
            "try:\n"
            "    sleep.sleep(sleep.Params(seconds=30))\n"
            "except ToolTimeout as e:\n"
            "    print('timeout', e.server, e.tool)\n"
            "mcp_runtime.CALL_TIMEOUT = 300.0\n"
            "print(add.add(add.Params(a=1, b=2)))\n",
        )
        assert text == "timeout slow sleep\n3"


async def test_a_failing_cell_does_not_hide_a_missing_tool_host(
    container: ExecutionContainer, client: ExecutionClient
) -> None:
    """Without a ToolHost there is nothing to call: the cell's error names the server."""
    async with ToolHost(container.resource_port, {"once": host_server()}) as tools:
        await tools.generate_mcp_sources()
    with pytest.raises(ExecutionError, match="ToolServerError: once.add: host-side MCP server 'once' is unavailable"):
        await client.execute("from mcptools.once import add\nadd.add(add.Params(a=1, b=1))")


async def test_an_interrupted_cell_cancels_its_call_on_the_host(
    container: ExecutionContainer, client: ExecutionClient
) -> None:
    async with ToolHost(container.resource_port, {"patient": host_server()}) as tools:
        await tools.generate_mcp_sources()
        with pytest.raises(ExecutionTimeoutError):
            await client.execute("from mcptools.patient import sleep\nsleep.sleep(sleep.Params(seconds=60))", timeout=3)
        deadline = time.monotonic() + 10
        while tools.stats()["patient"]["running"]:
            assert time.monotonic() < deadline, "the host still runs the call of the interrupted cell"
            await asyncio.sleep(0.1)
        assert await output(client, "from mcptools.patient import add\nprint(add.add(add.Params(a=1, b=2)))") == "3"


async def test_the_placeholder_url_is_a_client_error_naming_it(container: ExecutionContainer) -> None:
    """Issue 15 point 5 (the seed's example 10b). Before: RemotePathError from the server's HTTP 400."""
    url = "http://[YOUR-HOST-IP-ADDRESS]:8000/mcp"
    async with ResourceClient(port=container.resource_port) as resources:
        with pytest.raises(InvalidServerParamsError, match=r"YOUR-HOST-IP-ADDRESS.*host name or address"):
            await resources.generate_mcp_sources("mcpgen", "github", {"url": url})
    with pytest.raises(InvalidServerParamsError, match="'github'.*YOUR-HOST-IP-ADDRESS"):
        ToolHost(container.resource_port, {"github": {"url": url}})


async def test_a_firewalled_sandbox_still_calls_host_side_tools(make_container: ContainerFactory) -> None:
    """The calls travel on the connection the host opened: the firewall (no allowed domain) is not in the way
    (what it blocks is tests/integration/test_firewall.py's)."""
    container = await make_container()
    await container.init_firewall([])
    async with ToolHost(container.resource_port, {"walled": host_server()}) as tools:
        await tools.generate_mcp_sources()
        async with ExecutionClient(port=container.executor_port) as client:
            assert await output(client, "from mcptools.walled import add\nprint(add.add(add.Params(a=4, b=5)))") == "9"


async def test_host_side_calls_are_approved_like_any_other(container: ExecutionContainer) -> None:
    """A denied call never reaches the host; an allowed one does (the application's policy, issue 15 point 4)."""
    from ipybox.approvals import AllowList

    async with ToolHost(container.resource_port, {"guarded": host_server()}) as tools:
        await tools.generate_mcp_sources()
        async with ExecutionClient(port=container.executor_port, approvals=AllowList(["guarded.add"])) as client:
            text = await output(
                client,
                "from mcptools.guarded import add, pid, ToolDenied\n"
                "print(add.add(add.Params(a=1, b=1)))\n"
                "try:\n"
                "    pid.pid(pid.Params())\n"
                "except ToolDenied as e:\n"
                "    print('denied', e.server, e.tool)\n",
            )
        assert text == "2\ndenied guarded pid"
        assert tools.stats()["guarded"]["calls"] == 1


async def test_a_host_served_name_cannot_be_generated_in_the_sandbox(
    container: ExecutionContainer, tmp_path: Path
) -> None:
    # The 409 comes before the generator runs: no package of that name is written over the host's,
    # though the in-sandbox server would have listed its tools fine (mcp 1.x of the user environment).
    tiny = tmp_path / "tiny.py"
    tiny.write_text(
        "from mcp.server.fastmcp import FastMCP\n"
        "server = FastMCP('tiny')\n"
        "@server.tool()\n"
        "def ping() -> str:\n"
        "    return 'pong'\n"
        "server.run()\n"
    )
    async with ToolHost(container.resource_port, {"taken": host_server()}) as tools:
        async with ResourceClient(port=container.resource_port) as resource:
            await resource.upload_file("tiny.py", tiny)
            with pytest.raises(ResourceError) as refused:
                await resource.generate_mcp_sources(
                    "elsewhere", "taken", {"command": "python", "args": ["/app/tiny.py"]}
                )
            assert refused.value.status == 409 and "served by the host" in str(refused.value)
            with pytest.raises(RemoteFileNotFoundError):
                await resource.get_mcp_sources("elsewhere", "taken")
            assert await resource.generate_mcp_sources(
                "elsewhere", "tiny", {"command": "python", "args": ["/app/tiny.py"]}
            ) == ["ping"]
        assert tools.connected


async def test_a_tool_host_whose_container_ended_stops_reconnecting_at_once(
    make_container: ContainerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: it tried 5 more times, a second apart, logging each failure, for a container that was gone.
    import aiodocker

    container = await make_container()
    async with ToolHost(container.resource_port, {"mine": host_server()}) as tools:
        assert tools.connected
        with caplog.at_level("INFO", logger="ipybox.tool_host"):
            docker = aiodocker.Docker()
            try:
                await (await docker.containers.get(container.container_id or "")).kill()
            finally:
                await docker.close()
            assert tools._reader is not None
            await asyncio.wait_for(asyncio.shield(tools._reader), 30)
        assert not tools.connected
    assert "has ended" in caplog.text
    # At most one try (under load the container may still be ending at the first check), not five.
    assert caplog.text.count("reconnecting failed") <= 1
