"""`ipybox mcp`, the sandbox as an MCP server over stdio, driven by the MCP SDK's client and raw JSON-RPC.

Servers, and what each is for:

    shared       one per module: the tools, cell output, files and path containment (default allowed
                 dir = the server's cwd), container options (env, env file, bind, labels, limits)
    firewalled   one per module: --allowed-domain (firewall on) and repeated --allowed-dir
    per test     the clean-up tests (client exits, SIGTERM mid-cell, client SIGKILLed mid-cell, stdin
                 closed during start-up) and the refused command lines (no container at all)

Tests on the shared server set what they need themselves and do not depend on each other's state.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.mcp_client import (
    TOOLS,
    McpServer,
    RawServer,
    case_containers,
    child_pids,
    force_remove,
    killed_client_argv,
    new_case,
    server_argv,
    server_env,
    text_of,
    wait_containers_gone,
    wait_pid_gone,
)
from tests.integration.netlab import egress_guard

MARKER = re.compile(
    r"\[\.\.\. ([\d,]+) characters omitted; full output saved to (/app/\.ipybox/outputs/\S+\.txt) \.\.\.\]"
)
SERVER_MAX_OUTPUT = 3000
FAST = 2.0  # seconds within which the firewall must reject a connection
METADATA = "169.254.169.254"


@dataclass
class Shared:
    server: McpServer
    allowed: Path  # the server's cwd, hence its only allowed directory
    outside: Path  # a sibling of `allowed`
    bind_host: Path  # bound to /app/bound


@pytest.fixture(scope="module")
async def shared(image: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Shared]:
    root = tmp_path_factory.mktemp("mcp-shared")
    allowed, outside, bind_host = root / "allowed", root / "allowed-evil", root / "bind"
    for directory in (allowed, outside, bind_host):
        directory.mkdir()
    bind_host.chmod(0o777)  # the sandbox user need not be root
    (bind_host / "from-host.txt").write_text("bound from the host")
    (bind_host / "from-host.txt").chmod(0o644)
    env_file = root / "sandbox.env"
    env_file.write_text("# comment\nFROM_FILE='file value'\n")
    server = McpServer(
        image,
        "--container-env-var",
        "FROM_FLAG=flag=value",
        "--container-env-var",
        "SECOND_FLAG=2",
        "--container-env-file",
        str(env_file),
        "--container-bind",
        f"{bind_host}:bound",
        "--container-label",
        "ai.gradion.ipybox.test-extra=yes",
        "--memory-limit",
        "1g",
        "--cpu-limit",
        "1.5",
        "--pids-limit",
        "256",
        "--max-output-chars",
        str(SERVER_MAX_OUTPUT),
        cwd=allowed,
    )
    try:
        async with server:
            yield Shared(server, allowed, outside, bind_host)
        await wait_containers_gone(server.case, timeout=15)
    finally:
        await force_remove(server.case)


# -- the handshake and the tool list -----------------------------------------------------------------


async def test_tools_are_listed_with_schemas(shared: Shared) -> None:
    listed = await shared.server.client.list_tools()
    tools = {tool.name: tool for tool in listed.tools}
    assert set(tools) == TOOLS

    execute = tools["execute_ipython_cell"].input_schema
    assert execute["required"] == ["code"]
    assert set(execute["properties"]) == {"code", "timeout", "max_output_chars"}
    assert execute["properties"]["timeout"].get("default") == 120
    for name in ("upload_file", "download_file"):
        schema = tools[name].input_schema
        assert sorted(schema["required"]) == ["local_path", "relpath"], name
    assert not tools["reset"].input_schema.get("required")

    description = tools["execute_ipython_cell"].description or ""
    assert "persist" in description
    assert "!pip install" in description
    assert "await" in description and "asyncio.run" in description
    assert "/app" in description


# -- cells -------------------------------------------------------------------------------------------


async def test_state_persists_between_cells(shared: Shared) -> None:
    await shared.server.output("persisted = 6")
    assert (await shared.server.output("print(persisted * 7)")).strip() == "42"


async def test_a_cell_without_output_says_so(shared: Shared) -> None:
    result = await shared.server.execute("quiet = 1")
    assert not result.is_error
    assert [(item.type, item.text) for item in result.content if item.type == "text"] == [("text", "(no output)")]
    assert len(result.content) == 1


async def test_top_level_await_works(shared: Shared) -> None:
    text = await shared.server.output("import asyncio\nawait asyncio.sleep(0.01)\nprint('awaited')")
    assert text.strip() == "awaited"


async def test_images_come_after_the_text(shared: Shared) -> None:
    result = await shared.server.execute(
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3])\nplt.show()\n"
        "plt.plot([3, 2, 1])\nplt.show()\n"
        "print('two plots')"
    )
    assert not result.is_error, text_of(result)
    assert "two plots" in text_of(result)
    images = result.content[1:]
    assert [item.type for item in images] == ["image", "image"]
    for image in images:
        assert image.type == "image"
        assert image.mime_type == "image/png"
        assert base64.b64decode(image.data).startswith(b"\x89PNG\r\n\x1a\n")


async def test_a_failing_cell_is_an_error_with_a_plain_traceback(shared: Shared) -> None:
    result = await shared.server.execute("def divide():\n    return 1 / 0\n\ndivide()")
    assert result.is_error
    text = text_of(result)
    assert text.startswith("ZeroDivisionError: division by zero\n"), text
    trace = text.split("\n", 1)[1]
    assert "divide" in trace, text
    assert "\x1b[" not in text


async def test_a_timeout_interrupts_the_cell_and_keeps_the_state(shared: Shared) -> None:
    await shared.server.output("before_timeout = 41")
    start = time.monotonic()
    result = await shared.server.execute("import time\ntime.sleep(60)", timeout=2)
    assert time.monotonic() - start < 30
    assert result.is_error
    text = text_of(result)
    assert re.search(r"timeout=2(\.0)?\b", text), text
    assert "interrupted" in text and "state" in text, text
    assert (await shared.server.output("print(before_timeout + 1)")).strip() == "42"


async def test_long_output_is_cut_in_the_middle_and_saved_in_full(shared: Shared) -> None:
    code = "print('HEAD' + 'x' * 5000 + 'TAIL')"
    result = await shared.server.execute(code, max_output_chars=1000)
    assert not result.is_error
    text = text_of(result)
    match = MARKER.search(text)
    assert match, text[:300]
    assert text.startswith("HEAD") and text.rstrip().endswith("TAIL")
    assert len(text) - len(match.group(0)) <= 1000 + 10  # kept characters, plus the marker's spacing
    omitted, saved = int(match.group(1).replace(",", "")), match.group(2)

    check = await shared.server.output(
        f"full = open({saved!r}).read()\nprint(len(full), full.rstrip('\\n') == 'HEAD' + 'x' * 5000 + 'TAIL')"
    )
    length, same = check.split()
    assert same == "True", check
    assert omitted == int(length) - 1000


async def test_server_output_limit_applies_unless_a_call_raises_it(shared: Shared) -> None:
    code = "print('y' * 10000)"
    cut = text_of(await shared.server.execute(code))
    assert MARKER.search(cut), cut[:200]
    assert len(cut) < SERVER_MAX_OUTPUT + 200

    whole = text_of(await shared.server.execute(code, max_output_chars=20000))
    assert not MARKER.search(whole)
    assert whole.strip() == "y" * 10000


async def test_reset_gives_a_fresh_kernel_and_keeps_files(shared: Shared) -> None:
    await shared.server.output("doomed = 1\nopen('/app/survives-reset.txt', 'w').write('still here')")
    result = await shared.server.call("reset")
    assert not result.is_error, text_of(result)
    text = await shared.server.output(
        "try:\n    doomed\n    print('variable kept')\nexcept NameError:\n    print('variable gone')\n"
        "print(open('/app/survives-reset.txt').read())"
    )
    assert text.split() == ["variable", "gone", "still", "here"]


@pytest.mark.parametrize("pool", [0, 1], ids=["no pool", "pool of 1"])
async def test_reset_new_sandbox_replaces_the_container(image: str, tmp_path: Path, pool: int) -> None:
    server = McpServer(image, "--pool", str(pool), "--container-env-var", "KEPT=yes", cwd=tmp_path)
    try:
        async with server:
            await server.output("doomed = 1\nopen('/app/gone.txt', 'w').write('x')")
            # With a pool, one spare is kept started beside the sandbox in use.
            assert len(await case_containers(server.case)) == 1 + pool
            first = {c["Id"] for c in await case_containers(server.case)}
            result = await server.call("reset", new_sandbox=True)
            assert not result.is_error, text_of(result)
            assert "new sandbox" in text_of(result)
            text = await server.output(
                "import os\nprint('doomed' in globals(), os.path.exists('/app/gone.txt'), os.environ['KEPT'])"
            )
            assert text.split() == ["False", "False", "yes"]
            now = {c["Id"] for c in await case_containers(server.case)}
            assert len(now) == 1 + pool
            if pool:
                assert len(now & first) == 1  # the former spare is in use; the used one is removed
        await wait_containers_gone(server.case, timeout=15)
    finally:
        await force_remove(server.case)


# -- container options --------------------------------------------------------------------------------


async def test_container_options_reach_the_container(shared: Shared) -> None:
    text = await shared.server.output(
        "import json, os\n"
        "print(json.dumps([os.environ.get(k) for k in ('FROM_FLAG', 'SECOND_FLAG', 'FROM_FILE')]))\n"
        "print(open('/app/bound/from-host.txt').read())"
    )
    env_line, bound = text.strip().split("\n")
    assert json.loads(env_line) == ["flag=value", "2", "file value"]
    assert bound == "bound from the host"

    (container,) = await case_containers(shared.server.case)
    assert container["Config"]["Labels"]["ai.gradion.ipybox.test-extra"] == "yes"
    host_config = container["HostConfig"]
    assert host_config["Memory"] == 1024**3
    assert host_config["NanoCpus"] == 1_500_000_000
    assert host_config["PidsLimit"] == 256


# -- files ----------------------------------------------------------------------------------------------


async def test_upload_file_copies_bytes_into_app(shared: Shared) -> None:
    data = os.urandom(10_000)
    local = shared.allowed / "upload.bin"
    local.write_bytes(data)
    result = await shared.server.call("upload_file", relpath="uploads/data.bin", local_path=str(local))
    assert not result.is_error, text_of(result)
    assert text_of(result) == f"uploaded 10000 bytes from {local.resolve()} to /app/uploads/data.bin"
    digest = await shared.server.output(
        "import hashlib\nprint(hashlib.sha256(open('/app/uploads/data.bin', 'rb').read()).hexdigest())"
    )
    assert digest.strip() == hashlib.sha256(data).hexdigest()


async def test_download_file_copies_bytes_out_of_app(shared: Shared) -> None:
    await shared.server.output(
        "import os\nos.makedirs('/app/downloads', exist_ok=True)\n"
        "open('/app/downloads/out.bin', 'wb').write(bytes(range(256)) * 40)"
    )
    local = shared.allowed / "out.bin"
    result = await shared.server.call("download_file", relpath="downloads/out.bin", local_path=str(local))
    assert not result.is_error, text_of(result)
    assert text_of(result) == f"downloaded 10240 bytes from /app/downloads/out.bin to {local.resolve()}"
    assert local.read_bytes() == bytes(range(256)) * 40


def _hostile_local_path(shared: Shared, kind: str) -> Path:
    """A local path that looks as if in the allowed directory, or plainly is not, but resolves outside."""
    secret = shared.outside / "secret.txt"
    secret.write_text("outside")
    if kind == "sibling-prefix":
        return secret
    if kind == "dotdot":
        return shared.allowed / ".." / shared.outside.name / "secret.txt"
    if kind == "dir-symlink":
        link = shared.allowed / "link-to-outside"
        if not link.is_symlink():
            link.symlink_to(shared.outside, target_is_directory=True)
        return link / "secret.txt"
    if kind == "file-symlink":
        link = shared.allowed / "secret-link.txt"
        if not link.is_symlink():
            link.symlink_to(secret)
        return link
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["sibling-prefix", "dotdot", "dir-symlink", "file-symlink"])
async def test_upload_from_outside_the_allowed_dirs_is_refused(shared: Shared, kind: str) -> None:
    local = _hostile_local_path(shared, kind)
    result = await shared.server.call("upload_file", relpath=f"stolen-{kind}.txt", local_path=str(local))
    assert result.is_error, text_of(result)
    assert str(shared.allowed) in text_of(result)
    check = await shared.server.output(f"import os\nprint(os.path.exists('/app/stolen-{kind}.txt'))")
    assert check.strip() == "False"


@pytest.mark.parametrize("kind", ["sibling-prefix", "dotdot", "dir-symlink", "file-symlink"])
async def test_download_to_outside_the_allowed_dirs_is_refused(shared: Shared, kind: str) -> None:
    local = _hostile_local_path(shared, kind)
    if kind in ("sibling-prefix", "dotdot", "dir-symlink"):
        local = local.with_name(f"planted-{kind}.txt")
    await shared.server.output("open('/app/planted.txt', 'w').write('planted')")
    result = await shared.server.call("download_file", relpath="planted.txt", local_path=str(local))
    assert result.is_error, text_of(result)
    assert str(shared.allowed) in text_of(result)
    assert (shared.outside / "secret.txt").read_text() == "outside"
    assert sorted(p.name for p in shared.outside.iterdir()) == ["secret.txt"]


# -- the firewall and repeated --allowed-dir ------------------------------------------------------------


@dataclass
class Firewalled:
    server: McpServer
    first: Path
    second: Path
    elsewhere: Path


@pytest.fixture(scope="module")
async def firewalled(image: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Firewalled]:
    root = tmp_path_factory.mktemp("mcp-firewalled")
    cwd, first, second, elsewhere = (root / name for name in ("cwd", "first", "second", "elsewhere"))
    for directory in (cwd, first, second, elsewhere):
        directory.mkdir()
    server = McpServer(
        image,
        "--allowed-domain",
        "127.0.0.1",
        "--allowed-dir",
        str(first),
        "--allowed-dir",
        str(second),
        cwd=cwd,
    )
    try:
        async with server:
            yield Firewalled(server, first, second, elsewhere)
        await wait_containers_gone(server.case, timeout=15)
    finally:
        await force_remove(server.case)


@pytest.fixture
def guard_default_networks(firewalled: Firewalled) -> Iterator[None]:
    """Host rules that keep the sandbox's traffic on this machine even if its firewall is broken."""
    subnets = _bridge_subnets()
    with egress_guard(subnets):
        yield


def _bridge_subnets() -> list[str]:
    done = subprocess.run(
        ["docker", "network", "inspect", "bridge", "--format", "{{json .IPAM.Config}}"],
        capture_output=True,
        text=True,
        check=True,
    )
    subnets = [entry["Subnet"] for entry in json.loads(done.stdout) if ":" not in entry.get("Subnet", ":")]
    assert subnets, done.stdout
    return subnets


async def test_allowed_domain_turns_the_firewall_on(firewalled: Firewalled, guard_default_networks: None) -> None:
    # The sandbox must sit on the guarded network; otherwise a broken firewall could let the probe out.
    await firewalled.server.output("print('up')")
    (container,) = await case_containers(firewalled.server.case)
    assert list(container["NetworkSettings"]["Networks"]) == ["bridge"]

    text = await firewalled.server.output(
        "import socket, time\n"
        "start = time.monotonic()\n"
        "try:\n"
        f"    socket.create_connection(({METADATA!r}, 80), timeout=3).close()\n"
        "    outcome = 'connected'\n"
        "except TimeoutError:\n"
        "    outcome = 'timeout'\n"
        "except OSError as exc:\n"
        "    outcome = f'refused:{exc.errno}'\n"
        "print(outcome, time.monotonic() - start)"
    )
    outcome, elapsed = text.split()
    assert outcome.startswith("refused:"), text
    assert float(elapsed) < FAST, text


async def test_repeated_allowed_dirs_are_all_allowed(firewalled: Firewalled) -> None:
    source = firewalled.second / "in.txt"
    source.write_text("from the second dir")
    uploaded = await firewalled.server.call("upload_file", relpath="in.txt", local_path=str(source))
    assert not uploaded.is_error, text_of(uploaded)
    target = firewalled.first / "back.txt"
    downloaded = await firewalled.server.call("download_file", relpath="in.txt", local_path=str(target))
    assert not downloaded.is_error, text_of(downloaded)
    assert target.read_text() == "from the second dir"

    # The server's cwd is no longer allowed once directories are given.
    for path in (firewalled.elsewhere / "x.txt", firewalled.server.cwd / "x.txt"):
        refused = await firewalled.server.call("download_file", relpath="in.txt", local_path=str(path))
        assert refused.is_error, text_of(refused)
        assert str(firewalled.first) in text_of(refused) and str(firewalled.second) in text_of(refused)
        assert not path.exists()


# -- the command line ----------------------------------------------------------------------------------


def _run_mcp(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ipybox", "mcp", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**server_env(), "COLUMNS": "200"},
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_help_lists_every_option(tmp_path: Path) -> None:
    done = _run_mcp("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for option in (
        "--allowed-dir",
        "--allowed-domain",
        "--container-tag",
        "--container-env-var",
        "--container-env-file",
        "--container-bind",
        "--container-label",
        "--memory-limit",
        "--cpu-limit",
        "--pids-limit",
        "--max-output-chars",
        "--pool",
        "--tool-server",
        "--tool-config",
        "--allow-call",
    ):
        assert option in done.stdout, option


@pytest.mark.parametrize(
    "args",
    [
        ["--container-env-var", "NOEQUALS"],
        ["--container-env-file", "/does/not/exist.env"],
        ["--container-bind", "/abs:/abs-container"],
        ["--container-bind", "/abs:../escape"],
        ["--container-label", "NOEQUALS"],
        ["--allowed-dir", "/does/not/exist"],
        ["--max-output-chars", "0"],
        ["--memory-limit", "lots"],
        ["--cpu-limit", "0"],
        ["--pids-limit", "0"],
        ["--pool", "-1"],
        ["--tool-server", "NOEQUALS"],
        ["--tool-server", "name="],
        ["--tool-server", "1st=python server.py"],
        ["--tool-server", "a=one", "--tool-server", "a=two"],
        ["--tool-config", "/does/not/exist.json"],
        ["--allow-call", ".echo"],
    ],
    ids=lambda args: " ".join(args),
)
async def test_bad_options_exit_2_with_one_line_before_any_container(
    image: str, tmp_path: Path, args: list[str]
) -> None:
    case = new_case()
    argv = server_argv(image, case, *args)
    done = _run_mcp(*argv[4:], cwd=tmp_path)
    try:
        assert done.returncode == 2, done.stderr
        assert done.stdout == ""
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert await case_containers(case) == []
    finally:
        await force_remove(case)


# -- host-side MCP servers (--tool-server, --tool-config) ---------------------------------------------

HOST_SERVER = Path(__file__).resolve().parents[1] / "mcp_server" / "host_server.py"
TEST_SERVER = Path(__file__).resolve().parents[1] / "mcp_server" / "server.py"


async def test_tool_servers_run_on_the_host_and_cells_call_them(
    image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inherited = "inherited" + os.urandom(8).hex()  # in `ipybox mcp`'s environment: --tool-server gets it
    configured = "configured" + os.urandom(8).hex()  # in the config entry's env
    monkeypatch.setenv("IPYBOX_HOST_MARKER", inherited)
    config = tmp_path / "tools.json"
    config.write_text(
        json.dumps(
            {
                "mcpServers": {
                    "repo-test": {"command": sys.executable, "args": [str(TEST_SERVER)]},
                    "configured": {
                        "command": sys.executable,
                        "args": [str(HOST_SERVER)],
                        "env": {"IPYBOX_HOST_MARKER": configured},
                    },
                    "off": {"command": "does-not-exist", "disabled": True},
                }
            }
        )
    )
    server = McpServer(
        image, "--tool-server", f"hostside={sys.executable} {HOST_SERVER}", "--tool-config", str(config), cwd=tmp_path
    )
    try:
        async with server:
            listed = await server.client.list_tools()
            execute = next(tool for tool in listed.tools if tool.name == "execute_ipython_cell")
            assert "mcptools.{repo_test, configured, hostside}" in (execute.description or "")
            text = await server.output(
                "from mcptools.repo_test.echo import Params, echo\n"
                "from mcptools.hostside import marker_sha256 as h\n"
                "from mcptools.configured import marker_sha256 as c\n"
                "import os\n"
                "print(echo(Params(text='via the host')))\n"
                "print(h.marker_sha256(h.Params()))\n"
                "print(c.marker_sha256(c.Params()))\n"
                "print(sorted(os.listdir('/app/mcptools')))\n"
            )
            lines = text.splitlines()
            assert lines[0] == "via the host"
            assert lines[1] == hashlib.sha256(inherited.encode()).hexdigest()
            assert lines[2] == hashlib.sha256(configured.encode()).hexdigest()
            assert "configured" in lines[3] and "hostside" in lines[3] and "off" not in lines[3]
            # Neither marker is anywhere in the sandbox's files or process environments (strings reversed in
            # the cell, so that its source does not plant them).
            scan = (
                "import os\n"
                f"markers = [m[::-1].encode() for m in {[inherited[::-1], configured[::-1]]!r}]\n"
                "hits = []\n"
                "for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
                "    try:\n"
                "        data = open(f'/proc/{pid}/environ', 'rb').read()\n"
                "    except OSError:\n"
                "        continue\n"
                "    hits += [pid for m in markers if m in data]\n"
                "for root, dirs, files in os.walk('/'):\n"
                "    dirs[:] = [d for d in dirs if os.path.join(root, d) not in ('/proc', '/sys', '/dev')]\n"
                "    for f in files:\n"
                "        path = os.path.join(root, f)\n"
                "        try:\n"
                "            if os.path.isfile(path) and not os.path.islink(path):\n"
                "                data = open(path, 'rb').read()\n"
                "                hits += [path for m in markers if m in data]\n"
                "        except OSError:\n"
                "            pass\n"
                "print('hits', hits)\n"
            )
            assert await server.output(scan, timeout=300) == "hits []"
            # A new sandbox gets the host-side servers too.
            result = await server.call("reset", new_sandbox=True)
            assert not result.is_error, text_of(result)
            text = await server.output("from mcptools.hostside import add\nprint(add.add(add.Params(a=20, b=22)))")
            assert text == "42"
        await wait_containers_gone(server.case, timeout=15)
    finally:
        await force_remove(server.case)


async def test_allow_call_denies_every_other_tool_call_and_shell_escape_in_every_sandbox(
    image: str, tmp_path: Path
) -> None:
    # Before: `ipybox mcp` had no way to turn approvals on; every call the code made ran.
    server = McpServer(
        image,
        "--tool-server",
        f"repo={sys.executable} {TEST_SERVER}",
        "--allow-call",
        "repo.echo",
        "--allow-call",
        "shell.%%bash",
        "--pool",
        "1",
        cwd=tmp_path,
    )
    calls = (
        "from mcptools.repo import echo, get_weather\n"
        "print(echo.echo(echo.Params(text='allowed')))\n"
        "try:\n"
        "    get_weather.get_weather(get_weather.Params(city='Graz'))\n"
        "except Exception as e:\n"
        "    print(type(e).__name__)\n"
        "try:\n"
        "    get_ipython().system('echo ran')\n"
        "except Exception as e:\n"
        "    print(type(e).__name__)\n"
    )
    try:
        async with server:
            assert (await server.output(calls)).splitlines() == ["allowed", "ToolDenied", "ShellEscapeDenied"]
            assert await server.output("%%bash\necho from bash") == "from bash"
            for new_sandbox in (False, True):  # a fresh kernel, then a pooled sandbox: still only these
                result = await server.call("reset", new_sandbox=new_sandbox)
                assert not result.is_error, text_of(result)
                assert (await server.output(calls)).splitlines() == ["allowed", "ToolDenied", "ShellEscapeDenied"]
        await wait_containers_gone(server.case, timeout=15)
    finally:
        await force_remove(server.case)


async def test_a_placeholder_url_in_the_tool_config_exits_2_naming_it(image: str, tmp_path: Path) -> None:
    config = tmp_path / "tools.json"
    url = "http://[YOUR-HOST-IP-ADDRESS]:8000/mcp"
    config.write_text(json.dumps({"mcpServers": {"github": {"url": url}}}))
    case = new_case()
    try:
        done = _run_mcp(*server_argv(image, case, "--tool-config", str(config))[4:], cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        [line] = done.stderr.strip().splitlines()
        assert url in line and "github" in line and "host name or address" in line
        assert await case_containers(case) == []
    finally:
        await force_remove(case)


async def test_a_tool_server_that_cannot_start_fails_the_first_call_naming_it(image: str, tmp_path: Path) -> None:
    server = McpServer(image, "--tool-server", f"broken={sys.executable} -c 'raise SystemExit(7)'", cwd=tmp_path)
    try:
        async with server:
            result = await server.execute("print(1)")
            assert result.is_error
            assert "broken" in text_of(result) and "could not start" in text_of(result)
        await wait_containers_gone(server.case, timeout=15)
    finally:
        await force_remove(server.case)


# -- stdout, start-up and clean-up -----------------------------------------------------------------


async def test_stdout_is_only_json_rpc_and_closing_stdin_during_start_up_removes_the_container(
    image: str, tmp_path: Path
) -> None:
    async with RawServer(image, cwd=tmp_path) as raw:
        try:
            initialized = await raw.initialize()
            assert "result" in initialized, initialized
            listed = await raw.response(await raw.request("tools/list"), timeout=10)
            tools = {tool["name"]: tool for tool in listed["result"]["tools"]}
            assert set(tools) == TOOLS
            assert all(tool["inputSchema"]["type"] == "object" for tool in tools.values())

            # The container may be starting now: stopping must not leave it behind.
            code = await raw.close_stdin_and_drain(timeout=30)
            assert code == 0, raw.stderr()
            for line in raw.stdout_lines:
                message = json.loads(line)
                assert message.get("jsonrpc") == "2.0", line
            await wait_containers_gone(raw.case, timeout=10)
        finally:
            await force_remove(raw.case)


async def test_client_exit_removes_the_container(image: str, tmp_path: Path) -> None:
    server = McpServer(image, cwd=tmp_path)
    try:
        async with server:
            await server.output("print('up')")
            assert len(await case_containers(server.case)) == 1
        await wait_containers_gone(server.case, timeout=10)
    finally:
        await force_remove(server.case)


async def test_sigterm_mid_cell_removes_the_container(image: str, tmp_path: Path) -> None:
    async with RawServer(image, cwd=tmp_path) as raw:
        try:
            await raw.initialize()
            first = await raw.response(await raw.call_tool("execute_ipython_cell", {"code": "print('up')"}))
            assert first["result"].get("isError") is not True, first
            await raw.call_tool("execute_ipython_cell", {"code": "import time; time.sleep(60)"})
            await asyncio.sleep(1)  # the cell is running
            raw.terminate()
            await wait_containers_gone(raw.case, timeout=15)
            try:
                await asyncio.wait_for(raw.proc.wait(), 5)
            except TimeoutError:
                pytest.fail(f"the server still runs after SIGTERM and the container's removal; stderr:\n{raw.stderr()}")
            assert "Traceback" not in raw.stderr(), raw.stderr()
        finally:
            await force_remove(raw.case)


async def test_a_killed_client_mid_cell_makes_the_server_remove_the_container(image: str, tmp_path: Path) -> None:
    case = new_case()
    client = await asyncio.create_subprocess_exec(
        *killed_client_argv(server_argv(image, case), tmp_path),
        cwd=tmp_path,
        env=server_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    server_pid: int | None = None
    try:
        assert client.stdout is not None
        line = await asyncio.wait_for(client.stdout.readline(), 180)
        assert line == b"ready\n", line
        (server_pid,) = child_pids(client.pid)
        await asyncio.sleep(1)  # the long cell is running
        os.kill(client.pid, signal.SIGKILL)
        await client.wait()
        await wait_containers_gone(case, timeout=15)
        await wait_pid_gone(server_pid, timeout=15)
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
        if server_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server_pid, signal.SIGKILL)
        await force_remove(case)
