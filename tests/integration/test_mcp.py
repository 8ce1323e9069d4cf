"""MCP client generation against a real MCP server (tests/mcp_server/server.py).

stdio: the server's source is written into the container and started there by the generator and by
the tool service (the generated code calls it by name). Streamable HTTP and SSE: the server runs on
this machine, bound to the Docker bridge's gateway address, which containers on the default bridge
reach.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiodocker
import pytest

from ipybox import ExecutionClient, ExecutionContainer, ResourceClient
from ipybox._errors import InvalidServerParamsError, RemoteFileNotFoundError, RemotePathError, ResourceError

SERVER_DIR = Path(__file__).parent.parent / "mcp_server"
SERVER_SOURCE = (SERVER_DIR / "server.py").read_text()
sys.path.insert(0, str(SERVER_DIR.parent.parent / "ipybox" / "_image"))
sys.path.insert(0, str(SERVER_DIR))

from server import ERROR_MESSAGE, HOSTILE_DESCRIPTION, HOSTILE_NAME, PWNED_PATH  # noqa: E402

from ipybox_server.mcp_generate import sanitize_name  # noqa: E402

HOSTILE_MODULE = sanitize_name(HOSTILE_NAME)
ALL_MODULES = sorted(["echo", "fail", "get_weather", "register", "stats", HOSTILE_MODULE])
# The test server is written for mcp 2.x; the user environment's `python` has mcp 1.x (docs/mcp-generation.md).
STDIO_PARAMS = {"command": "uvx", "args": ["--with", "mcp==2.3.0", "python", "/app/mcp_test_server.py"]}


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(host: str, port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the test MCP server exited with {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the test MCP server did not listen on {host}:{port} within {timeout} s")


@pytest.fixture(scope="module")
async def gateway() -> str:
    docker = aiodocker.Docker()
    try:
        network = await docker.networks.get("bridge")
        info = await network.show()
    finally:
        await docker.close()
    config = info["IPAM"]["Config"][0]
    if "Gateway" in config:
        return str(config["Gateway"])
    # Some engines list only the subnet of the default bridge; its gateway is the subnet's first address.
    return str(next(ipaddress.ip_network(config["Subnet"]).hosts()))


@pytest.fixture(scope="module")
def http_urls(gateway: str) -> Iterator[dict[str, str]]:
    """A streamable HTTP and an SSE server on the host, reachable from containers."""
    processes: list[subprocess.Popen[bytes]] = []
    urls = {}
    try:
        for transport, path in (("streamable-http", "/mcp"), ("sse", "/sse")):
            port = _free_port(gateway)
            process = subprocess.Popen(
                [sys.executable, str(SERVER_DIR / "server.py"), transport, gateway, str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            processes.append(process)
            _wait_for_port(gateway, port, process)
            urls[transport] = f"http://{gateway}:{port}{path}"
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
async def resource(shared_container: ExecutionContainer) -> AsyncIterator[ResourceClient]:
    async with ExecutionClient(port=shared_container.executor_port) as client:
        await client.execute(f"open('/app/mcp_test_server.py', 'w').write({SERVER_SOURCE!r})")
    async with ResourceClient(port=shared_container.resource_port) as resource:
        yield resource


def _params(transport: str, http_urls: dict[str, str]) -> dict[str, object]:
    if transport == "stdio":
        return dict(STDIO_PARAMS)
    if transport == "streamable_http":
        return {"url": http_urls["streamable-http"], "headers": {"X-Ipybox-Test": "1"}}  # found by /mcp
    return {"type": "sse", "url": http_urls["sse"]}


@pytest.mark.parametrize("transport", ["stdio", "streamable_http", "sse"])
async def test_generate_and_call(
    transport: str, resource: ResourceClient, client: ExecutionClient, http_urls: dict[str, str]
) -> None:
    relpath = f"mcpgen/{transport}"
    modules = await resource.generate_mcp_sources(relpath, "testsrv", _params(transport, http_urls))
    assert modules == ALL_MODULES

    sources = await resource.get_mcp_sources(relpath, "testsrv")
    assert sorted(sources) == ALL_MODULES
    assert "def get_weather(params: Params) -> str:" in sources["get_weather"]
    assert "_TOOL_NAME = 'get-weather'" in sources["get_weather"]
    for name, source in sources.items():
        compile(source, name, "exec")

    package = f"mcpgen.{transport}.testsrv"
    result = await client.execute(
        f"from {package} import echo, fail, get_weather, register, stats\n"
        "print(echo.echo(echo.Params(text='hello there')))\n"
        "print(get_weather.get_weather(get_weather.Params(city='Vienna', days=3)))\n"
        "p = register.Params(person={'name': 'Ann', 'address': {'street': 'Main St', 'zip_code': 1010}})\n"
        "print(type(p.person).__name__, type(p.person.address).__name__)\n"
        "print(register.register(p))\n"
        "print('STATS', stats.stats(stats.Params(values=[1.5, 2.5])))\n"
        "try:\n"
        "    fail.fail(fail.Params())\n"
        "except Exception as exc:\n"
        "    print('RAISED', type(exc).__name__, exc)\n"
    )
    lines = (result.text or "").splitlines()
    assert lines[0] == "hello there"
    assert lines[1] == "Vienna: sunny for 3 day(s)"
    assert lines[2] == "Person Address"
    assert lines[3] == "Ann lives at Main St 1010; tags=[]"
    # stats declares an output schema (a dict of floats): the structured content as that type, not as JSON text
    assert lines[4] == "STATS {'count': 2.0, 'total': 4.0}"
    assert lines[5].startswith("RAISED ToolError") and ERROR_MESSAGE in lines[5]


async def test_hostile_names_and_descriptions(resource: ResourceClient, client: ExecutionClient) -> None:
    await resource.generate_mcp_sources("mcpgen/hostile", "testsrv", STDIO_PARAMS)
    sources = await resource.get_mcp_sources("mcpgen/hostile", "testsrv")
    source = sources[HOSTILE_MODULE]
    compile(source, HOSTILE_MODULE, "exec")
    assert "\nimport os" not in source and '\nopen("/app/pwned"' not in source

    result = await client.execute(
        "import importlib, os\n"
        f"m = importlib.import_module('mcpgen.hostile.testsrv.{HOSTILE_MODULE}')\n"
        f"import mcpgen.hostile.testsrv as pkg\n"
        f"print(repr(m.__doc__ == {HOSTILE_DESCRIPTION!r}), repr(m._TOOL_NAME == {HOSTILE_NAME!r}))\n"
        # The function's docstring is the description with its continuation lines indented.
        f"print(m.{HOSTILE_MODULE}.__doc__ == {HOSTILE_DESCRIPTION.replace(chr(10), chr(10) + '    ')!r})\n"
        f"print(pkg.TOOLS[{HOSTILE_NAME!r}] == {HOSTILE_MODULE!r})\n"
        f"print(os.path.exists({PWNED_PATH!r}))\n"
        f"print(m.{HOSTILE_MODULE}(m.Params(x='ok')))\n"
    )
    assert (result.text or "").splitlines() == ["True True", "True", "True", "False", "hostile:ok"]


async def test_regeneration_replaces_the_package(resource: ResourceClient, client: ExecutionClient) -> None:
    relpath = "mcpgen/regen"
    assert "stats" in await resource.generate_mcp_sources(relpath, "testsrv", STDIO_PARAMS)
    without_stats = {**STDIO_PARAMS, "env": {"MCP_TEST_WITHOUT": "stats"}}
    modules = await resource.generate_mcp_sources(relpath, "testsrv", without_stats)
    assert "stats" not in modules and "echo" in modules
    assert "stats" not in await resource.get_mcp_sources(relpath, "testsrv")
    result = await client.execute("import os; print(sorted(os.listdir('/app/mcpgen/regen')))")
    assert result.text == "['testsrv']"  # no staging or old directories left behind
    result = await client.execute("import os; print('stats.py' in os.listdir('/app/mcpgen/regen/testsrv'))")
    assert result.text == "False"


async def test_generated_package_at_app_root(resource: ResourceClient, client: ExecutionClient) -> None:
    await resource.generate_mcp_sources("", "rootsrv", STDIO_PARAMS)
    result = await client.execute("from rootsrv.echo import echo, Params; print(echo(Params(text='root')))")
    assert result.text == "root"


async def test_unreachable_servers_are_422(resource: ResourceClient, gateway: str) -> None:
    with pytest.raises(ResourceError, match="no-such-mcp-command") as info:
        await resource.generate_mcp_sources("mcpgen/bad", "srv", {"command": "no-such-mcp-command"})
    assert info.value.status == 422
    port = _free_port(gateway)  # nothing listens there
    with pytest.raises(ResourceError) as info:
        await resource.generate_mcp_sources("mcpgen/bad", "srv", {"url": f"http://{gateway}:{port}/mcp"})
    assert info.value.status == 422
    with pytest.raises(ResourceError) as info:
        await resource.generate_mcp_sources("mcpgen/bad", "srv", {"command": "python", "args": ["-c", "pass"]})
    assert info.value.status == 422
    with pytest.raises(RemoteFileNotFoundError):
        await resource.get_mcp_sources("mcpgen/bad", "srv")  # nothing was written


@pytest.mark.parametrize(
    ("relpath", "server_name", "params", "message"),
    [
        ("../x", "srv", STDIO_PARAMS, "'..'"),
        ("/tmp", "srv", STDIO_PARAMS, "relative"),
        ("mcpgen", "not-an-identifier", STDIO_PARAMS, "identifier"),
        ("mcpgen", "class", STDIO_PARAMS, "identifier"),
    ],
)
async def test_refused_requests_are_400(
    resource: ResourceClient, relpath: str, server_name: str, params: dict[str, object], message: str
) -> None:
    with pytest.raises(RemotePathError, match=message):
        await resource.generate_mcp_sources(relpath, server_name, params)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"url": "http://example.invalid/other"}, "cannot tell the transport"),
        ({"command": "python", "args": "not a list"}, "args"),
        ({"type": "websocket", "url": "ws://x/mcp"}, "unknown"),
    ],
)
async def test_bad_server_params_are_refused_before_sending(
    resource: ResourceClient, params: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidServerParamsError, match=message):
        await resource.generate_mcp_sources("mcpgen", "srv", params)
    # The server refuses them as well (400), for clients that do not check.
    async with resource._connected().session.post(
        "/mcp/sources", json={"relpath": "mcpgen", "server_name": "srv", "server_params": params}
    ) as response:
        assert response.status == 400 and message in (await response.json())["error"]


async def test_get_sources_of_a_missing_package(resource: ResourceClient) -> None:
    with pytest.raises(RemoteFileNotFoundError):
        await resource.get_mcp_sources("mcpgen", "never_generated")
    with pytest.raises(RemotePathError):
        await resource.get_mcp_sources("..", "srv")


SLOW_SERVER = """
import asyncio
from mcp.server.fastmcp import FastMCP

server = FastMCP("slow")


@server.tool()
async def wait(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "waited"


server.run("stdio")
"""


async def test_interrupting_a_tool_call_keeps_the_kernel_usable(
    resource: ResourceClient, client: ExecutionClient
) -> None:
    # A tool that takes a minute: the call blocks until the kernel is interrupted. The interrupt closes the
    # runtime's connection, which cancels the call in the tool service; the server's session stays.
    await client.execute(f"open('/app/slow_server.py', 'w').write({SLOW_SERVER!r})")
    await resource.generate_mcp_sources(
        "mcpgen/interrupt", "slow", {"command": "python", "args": ["/app/slow_server.py"]}
    )
    await client.execute("from mcpgen.interrupt.slow.wait import wait, Params\nwait(Params(seconds=0))", timeout=60)
    execution = await client.submit("wait(Params(seconds=60))")
    await asyncio.sleep(2)
    await client.interrupt()
    with pytest.raises(Exception, match="KeyboardInterrupt"):
        await execution.result(timeout=30)
    result = await client.execute("print('alive', wait(Params(seconds=0)))", timeout=30)
    assert result.text == "alive waited"
