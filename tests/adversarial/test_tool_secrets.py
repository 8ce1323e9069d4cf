"""MCP server credentials stay out of files a cell can read (issue 15, point 2).

A stdio server gets a marker in its `env`, a streamable HTTP server (on this machine) one in its
`headers`. After generation and a call through each, a cell greps the whole filesystem (but /proc and
/sys) for both: nothing, the generated packages included. The header marker is not in any process's
environment or command line either. (The env marker is, by design, in the environment of the stdio
server's own process, which runs as the sandbox user: docs/mcp-generation.md says so.)

The cell never holds a marker in its source (the kernel keeps cell sources in files): it gets them
reversed.
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiodocker
import pytest

from ipybox import ExecutionClient, ExecutionContainer, ResourceClient

SERVER = Path(__file__).parent.parent / "mcp_server" / "server.py"

ECHO_SERVER = """
from mcp.server.fastmcp import FastMCP

server = FastMCP("quiet")


@server.tool()
def echo(text: str) -> str:
    return text


server.run("stdio")
"""

SEARCH = """
import os, subprocess
markers = [{env!r}[::-1], {header!r}[::-1], {control!r}[::-1]]
open('/tmp/control-marker.txt', 'w').write(markers[2])  # the search must find this one
roots = sorted(f'/{{name}}' for name in os.listdir('/') if name not in ('proc', 'sys'))
for marker in markers:
    found = subprocess.run(['grep', '-rlsF', '--devices=skip', marker, *roots], capture_output=True, text=True)
    print('files', sorted(found.stdout.split()))
processes = {{'environ': [], 'cmdline': []}}
for pid in filter(str.isdigit, os.listdir('/proc')):
    for what in processes:
        try:
            data = open(f'/proc/{{pid}}/{{what}}', 'rb').read()
        except OSError:
            continue
        if markers[1].encode() in data:
            processes[what].append(pid)
print('header marker in processes', processes)
"""


@pytest.fixture(scope="module")
async def gateway() -> str:
    docker = aiodocker.Docker()
    try:
        info = await (await docker.networks.get("bridge")).show()
    finally:
        await docker.close()
    config = info["IPAM"]["Config"][0]
    return str(config.get("Gateway") or next(ipaddress.ip_network(config["Subnet"]).hosts()))


@pytest.fixture(scope="module")
def http_url(gateway: str) -> Iterator[str]:
    """The repository's test server over streamable HTTP on this machine, reachable from containers."""
    with socket.socket() as sock:
        sock.bind((gateway, 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, str(SERVER), "streamable-http", gateway, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((gateway, port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the test MCP server did not start") from None
                time.sleep(0.1)
        yield f"http://{gateway}:{port}/mcp"
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
async def resource(shared_container: ExecutionContainer) -> AsyncIterator[ResourceClient]:
    async with ResourceClient(port=shared_container.resource_port) as resource:
        yield resource


async def test_server_credentials_are_in_no_file_and_headers_in_no_process(
    resource: ResourceClient, client: ExecutionClient, http_url: str
) -> None:
    env_marker = f"ipybox-env-{uuid.uuid4().hex}"
    header_marker = f"ipybox-header-{uuid.uuid4().hex}"
    await client.execute(f"open('/app/quiet_server.py', 'w').write({ECHO_SERVER!r})")
    stdio = {"command": "python", "args": ["/app/quiet_server.py"], "env": {"QUIET_TOKEN": env_marker}}
    await resource.generate_mcp_sources("secretgen", "quiet", stdio)
    http = {"url": http_url, "headers": {"Authorization": f"Bearer {header_marker}"}}
    await resource.generate_mcp_sources("secretgen", "remote", http)
    result = await client.execute(
        "from secretgen.quiet.echo import echo, Params\n"
        "from secretgen.remote.echo import echo as remote_echo, Params as RemoteParams\n"
        "print(echo(Params(text='a')), remote_echo(RemoteParams(text='b')))",
        timeout=120,
    )
    assert result.text == "a b"  # both sessions are up, with their credentials
    control = f"ipybox-control-{uuid.uuid4().hex}"
    search = SEARCH.format(env=env_marker[::-1], header=header_marker[::-1], control=control[::-1])
    result = await client.execute(search, timeout=300)
    assert (result.text or "").splitlines() == [
        "files []",
        "files []",
        "files ['/tmp/control-marker.txt']",
        "header marker in processes {'environ': [], 'cmdline': []}",
    ]
    sources = await resource.get_mcp_sources("secretgen", "remote")
    assert header_marker not in "".join(sources.values())
