"""The kernels' user environment: installs from a cell work, and nothing done there breaks ipybox.

Real containers, real installs from the package index (the one kind of traffic tests may send out).
Each test gets its own sandbox, since what it installs persists for the sandbox's life. Pinned versions
throughout.
"""

from __future__ import annotations

from pathlib import Path

from ipybox import ExecutionClient, ResourceClient
from tests.integration.conftest import ContainerFactory

PIP_TIMEOUT = 120  # an install from the index, through this machine's proxy


async def test_pip_percent_pip_and_uv_install_from_a_cell(make_container: ContainerFactory) -> None:
    container = await make_container()
    async with ExecutionClient(port=container.executor_port) as client:
        await client.execute("!pip install -q einops==0.8.1", timeout=PIP_TIMEOUT)
        await client.execute("%pip install -q humanize==4.12.3", timeout=PIP_TIMEOUT)
        await client.execute("!uv pip install -q tabulate==0.9.0", timeout=PIP_TIMEOUT)
        result = await client.execute(
            "import einops, humanize, tabulate, sys\n"
            "print(einops.__version__, humanize.__version__, tabulate.__version__)\n"
            "print(sys.prefix)"
        )
        versions, prefix = (result.text or "").splitlines()
        assert versions == "0.8.1 4.12.3 0.9.0"
        assert prefix == "/opt/ipybox/user-venv"
    # Installed for the sandbox's life: a new kernel imports it too.
    async with ExecutionClient(port=container.executor_port) as fresh:
        assert (await fresh.execute("import einops; print(einops.__version__)")).text == "0.8.1"


async def test_npm_install_global_from_a_cell_as_the_sandbox_user(make_container: ContainerFactory) -> None:
    # Before: EACCES (npm's global prefix was /usr/local, root's), so `npm install -g` needed a derived image.
    container = await make_container()
    async with ExecutionClient(port=container.executor_port) as client:
        await client.execute("!npm install -g --silent cowsay@1.6.0", timeout=PIP_TIMEOUT)
        result = await client.execute(
            "!id -u; command -v cowsay; cowsay -W 20 moo | sed -n 2p; npm config get registry; npm config get cafile"
        )
    uid, where, said, registry, cafile = (result.text or "").splitlines()[:5]
    assert uid != "0" and where == "/opt/ipybox/npm-global/bin/cowsay"
    assert said.strip() == "< moo >"
    # The global npmrc (host registry, CA bundle) is still the one npm reads.
    assert registry.startswith("http") and cafile == "/etc/ssl/certs/ca-certificates.crt"


async def test_downgrades_and_planted_modules_leave_ipybox_working(
    make_container: ContainerFactory, tmp_path: Path
) -> None:
    container = await make_container()
    async with ExecutionClient(port=container.executor_port) as client:
        await client.execute("!pip install -q 'aiohttp==3.9.5' 'pydantic<2'", timeout=PIP_TIMEOUT)
        versions = await client.execute(
            "import importlib.metadata as m\nprint(m.version('aiohttp'), m.version('pydantic'))"
        )
        aiohttp_version, pydantic_version = (versions.text or "").split()
        assert aiohttp_version == "3.9.5" and pydantic_version.startswith("1."), versions.text
        # Modules named like ipybox's own dependencies, where the kernel's sys.path looks first.
        for name in ("aiohttp", "pydantic", "mcp", "zmq", "tornado", "traitlets", "jupyter_client", "sitecustomize"):
            await client.execute(f"open('/app/{name}.py', 'w').write('raise SystemExit(\"planted {name}\")')")

    # New kernels start and run cells.
    async with ExecutionClient(port=container.executor_port) as fresh:
        assert (await fresh.execute("print(6 * 7)")).text == "42"
    async with ResourceClient(port=container.resource_port) as resources:
        # File transfers.
        source = tmp_path / "up.txt"
        source.write_text("still moving files")
        await resources.upload_file("moved/up.txt", source)
        await resources.download_file("moved/up.txt", tmp_path / "down.txt")
        assert (tmp_path / "down.txt").read_text() == "still moving files"
        # Module sources as the kernel sees them: /app first (the planted module, not ipybox's aiohttp),
        # then the user's environment (the downgraded pydantic's sibling packages).
        sources = await resources.get_module_sources(["aiohttp", "typing_extensions"])
        assert "planted aiohttp" in sources["aiohttp"]
        assert "def " in sources["typing_extensions"]
        # MCP generation runs in ipybox's own environment: a stdio server that needs nothing of the user's
        # environment (the standard library only) still generates.
        await resources.upload_file("srv/echo_server.py", _stdlib_server(tmp_path))
        modules = await resources.generate_mcp_sources(
            "gen", "echo", {"command": "/usr/bin/python3", "args": ["/app/srv/echo_server.py"]}
        )
        assert modules == ["echo"]


def _stdlib_server(tmp_path: Path) -> Path:
    """A minimal MCP stdio server without any SDK: initialize, tools/list, tools/call."""
    path = tmp_path / "echo_server.py"
    path.write_text(STDLIB_SERVER)
    return path


STDLIB_SERVER = r"""
import json, sys

TOOL = {
    "name": "echo",
    "description": "Echo the text.",
    "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
}

for line in sys.stdin:
    message = json.loads(line)
    if "id" not in message:
        continue
    method, result = message["method"], {}
    if method == "initialize":
        result = {
            "protocolVersion": message["params"]["protocolVersion"],
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "echo", "version": "1"},
        }
    elif method == "tools/list":
        result = {"tools": [TOOL]}
    elif method == "tools/call":
        text = message["params"]["arguments"]["text"]
        result = {"content": [{"type": "text", "text": "echo: " + text}], "isError": False}
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}) + "\n")
    sys.stdout.flush()
"""
