"""Every guarantee of a local sandbox, for `ExecutionContainer(backend=Swarm(...))` on the 3-node rig (issue 17).

Each sandbox carries the label `ipybox-test.swarm=t1-<marker>` (one marker per test) and is killed by the
`make_sandbox` fixture; the checks go through the manager's and the nodes' engines as an operator would.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from ipybox import AuthenticationError, ExecutionClient, ExecutionContainer, ResourceClient, Swarm, _routes, _tokens
from ipybox._swarm import SwarmPlacement
from ipybox.executor import ExecutionResult
from tests.swarmlab import SwarmLab

LABEL = "ipybox-test.swarm"

SandboxFactory = Callable[..., Awaitable[ExecutionContainer]]


@pytest.fixture
def swarm_backend(swarm_lab: SwarmLab) -> Swarm:
    """The backend for the lab: its manager, and each node's engine by hostname."""
    return Swarm(swarm_lab.manager_url, swarm_lab.engine_urls)


@pytest.fixture
def marker() -> str:
    return f"t1-{secrets.token_hex(4)}"


@pytest.fixture
async def make_sandbox(swarm_image: str, swarm_backend: Swarm, marker: str) -> AsyncIterator[SandboxFactory]:
    """Starts sandboxes on the lab's swarm (labelled with the test's marker); kills every one afterwards."""
    started: list[ExecutionContainer] = []

    async def make(**kwargs: Any) -> ExecutionContainer:
        kwargs.setdefault("tag", swarm_image)
        kwargs.setdefault("backend", swarm_backend)
        kwargs.setdefault("show_pull_progress", False)
        kwargs.setdefault("memory_limit", "1g")
        kwargs.setdefault("startup_timeout", 180)  # a node pulls the 1 GB image at its first sandbox
        kwargs["labels"] = {LABEL: marker, **kwargs.get("labels", {})}
        container = ExecutionContainer(**kwargs)
        started.append(container)
        await container.run()
        return container

    try:
        yield make
    finally:
        await asyncio.gather(*(container.kill() for container in started), return_exceptions=True)


async def execute(container: ExecutionContainer, code: str, timeout: float = 60) -> ExecutionResult:
    async with ExecutionClient(port=container.executor_port, host=container.host) as client:
        return await client.execute(code, timeout=timeout)


def placement(container: ExecutionContainer) -> SwarmPlacement:
    made = container._placement
    assert isinstance(made, SwarmPlacement)
    return made


def node_containers(lab: SwarmLab, label: str) -> dict[str, list[str]]:
    """Containers (running or not) with `label` on each node's engine."""
    return {name: lab.docker("ps", "-aq", "--filter", f"label={label}", node=name).split() for name in lab.nodes}


# -- 1. start, a cell with a rich result, where it runs, kill ------------------------------------------------


async def test_start_cell_png_and_kill_removes_service_and_container(
    make_sandbox: SandboxFactory, swarm_lab: SwarmLab, marker: str, swarm_backend: Swarm
) -> None:
    t0 = time.monotonic()
    container = await make_sandbox()
    started = time.monotonic() - t0
    made = placement(container)
    assert made.node_name in swarm_lab.nodes
    assert container.host == swarm_lab.node_ips[made.node_name] == made.node_address
    assert made.node_name in swarm_backend.describe(container) and made.name in swarm_backend.describe(container)

    # The ports are the node's host-mode published ports of the task's container.
    info = swarm_lab.docker("inspect", "-f", "{{json .NetworkSettings.Ports}}", container.container_id or "",
                            node=made.node_name)  # fmt: skip
    assert f'"HostPort":"{container.executor_port}"' in info and f'"HostPort":"{container.resource_port}"' in info
    assert swarm_lab.docker("service", "ls", "-q", "--filter", f"label={LABEL}={marker}") == made.service_id[:12]

    result = await execute(container, "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")
    [image] = result.images
    assert image.format == "PNG" and image.size[0] > 100
    [output] = result.outputs
    assert output.png is not None and output.png.startswith(b"\x89PNG")

    t0 = time.monotonic()
    await container.kill()
    killed = time.monotonic() - t0
    assert swarm_lab.docker("service", "ls", "-q", "--filter", f"label={LABEL}={marker}") == ""
    assert node_containers(swarm_lab, f"{LABEL}={marker}")[made.node_name] == []
    print(f"start {started:.2f} s, kill {killed:.2f} s on {made.node_name}")


async def test_clients_use_the_nodes_published_ports_only(make_sandbox: SandboxFactory) -> None:
    """The task's container address is on its node's bridge. Every engine's default bridge is 172.17.0.0/16,
    so the same address on this host's bridge is some other container: a "direct route" there would send
    the sandbox's secret to it. Clients of a swarm sandbox must go to the node's published ports only."""
    container = await make_sandbox()
    for port, inner in ((container.executor_port, 8888), (container.resource_port, 8900)):
        assert _routes.direct_sessions(container.host, port, inner) == []
    async with ExecutionClient(port=container.executor_port, host=container.host) as client:
        assert client._via == "published port"


# -- 2. spread ------------------------------------------------------------------------------------------------


async def test_three_sandboxes_started_at_once_land_on_three_nodes(
    make_sandbox: SandboxFactory, swarm_lab: SwarmLab, marker: str
) -> None:
    sandboxes = await asyncio.gather(*(make_sandbox() for _ in range(3)))
    assert sorted(placement(c).node_name for c in sandboxes) == sorted(swarm_lab.nodes)
    # The nodes' engines agree: one of them on each.
    assert {name: len(ids) for name, ids in node_containers(swarm_lab, f"{LABEL}={marker}").items()} == {
        name: 1 for name in swarm_lab.nodes
    }
    results = await asyncio.gather(*(execute(c, "import socket; print(socket.gethostname())") for c in sandboxes))
    assert all(r.text for r in results)


# -- 3. the secret --------------------------------------------------------------------------------------------

SEARCH = """
import os
secret = ({a!r} + {b!r}).encode()
hits = []
for pid in filter(str.isdigit, os.listdir('/proc')):
    for what in ('environ', 'cmdline'):
        try:
            if secret in open(f'/proc/{{pid}}/{{what}}', 'rb').read(): hits.append((pid, what))
        except OSError:
            pass
for root in ('/run', '/tmp', '/app', '/home', '/etc'):
    for d, _, files in os.walk(root):
        for name in files:
            try:
                if secret in open(os.path.join(d, name), 'rb').read(1 << 20): hits.append(os.path.join(d, name))
            except OSError:
                pass
print(hits, sorted(os.listdir('/run/ipybox')) if os.path.isdir('/run/ipybox') else 'no /run/ipybox')
"""


async def test_secret_is_nowhere_but_the_servers_memory(make_sandbox: SandboxFactory, swarm_lab: SwarmLab) -> None:
    container = await make_sandbox()
    made = placement(container)
    token = _tokens.lookup(container.host, container.executor_port)
    assert token and len(token) >= 32
    half = len(token) // 2
    result = await execute(container, SEARCH.format(a=token[:half], b=token[half:]))
    assert result.text is not None and result.text.startswith("[] "), result.text
    assert "token" not in result.text

    # Not in the swarm's records (service and task) nor in the container's configuration on the node.
    assert made.service_id in swarm_lab.docker("service", "inspect", made.service_id)
    assert token not in swarm_lab.docker("service", "inspect", made.service_id)
    tasks = swarm_lab.docker("service", "ps", "-q", "--no-trunc", made.service_id).split()
    assert tasks and token not in swarm_lab.docker("inspect", *tasks)
    assert token not in swarm_lab.docker("inspect", container.container_id or "", node=made.node_name)

    for port in (container.executor_port,):
        with pytest.raises(AuthenticationError):
            await ExecutionClient(port=port, host=container.host, token="wrong").connect(retries=1)
    with pytest.raises(AuthenticationError):
        async with ResourceClient(port=container.resource_port, host=container.host, token="wrong") as resource:
            await resource.get_module_sources(["os"])


# -- 4. limits ------------------------------------------------------------------------------------------------

LIMITS = r"""
import os, resource, subprocess
def status(key):
    return next(line.split()[1] for line in open('/proc/self/status') if line.startswith(key + ':'))
def first(*paths):
    for path in paths:
        if os.path.exists(path):
            return open(path).read().strip()
    return 'missing'
st = os.statvfs('/tmp')
print('cap', status('CapEff'), status('CapBnd'))
print('nnp', status('NoNewPrivs'))
shell = subprocess.run(['sh', '-c', 'ulimit -n'], capture_output=True, text=True).stdout.strip()
print('nofile', resource.getrlimit(resource.RLIMIT_NOFILE)[0], shell)
print('pids', first('/sys/fs/cgroup/pids/pids.max', '/sys/fs/cgroup/pids.max'))
print('memory', first('/sys/fs/cgroup/memory/memory.limit_in_bytes', '/sys/fs/cgroup/memory.max'))
print('cpu', first('/sys/fs/cgroup/cpu/cpu.cfs_quota_us', '/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us'),
      first('/sys/fs/cgroup/cpu/cpu.cfs_period_us', '/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us'))
print('tmp', st.f_blocks * st.f_frsize)
print('uid', os.getuid(), os.geteuid())
open('/app/hello.sh', 'w').write('#!/bin/sh\necho hello from $(id -un)\n')
os.chmod('/app/hello.sh', 0o755)
print('app', subprocess.run(['/app/hello.sh'], capture_output=True, text=True).stdout.strip())
"""


async def test_limits_hold_inside_the_task(make_sandbox: SandboxFactory) -> None:
    container = await make_sandbox(
        memory_limit="512m", cpu_limit=0.5, pids_limit=200, open_files_limit=2048, tmp_size="64m"
    )
    result = await execute(container, LIMITS)
    lines = dict(line.split(" ", 1) for line in (result.text or "").splitlines())
    assert lines["cap"] == "0000000000000000 0000000000000000"
    assert lines["nnp"] == "1"
    assert lines["nofile"] == "2048 2048"
    assert lines["pids"] == "200"
    assert lines["memory"] == str(512 * 1024 * 1024)
    assert lines["cpu"] == "50000 100000"
    assert lines["tmp"] == str(64 * 1024 * 1024)
    uid = lines["uid"].split()
    assert uid[0] == uid[1] and uid[0] != "0"
    assert lines["app"].startswith("hello from ") and lines["app"] != "hello from root"


# -- 5. labels and clean-up across nodes ------------------------------------------------------------------------


async def test_remove_all_by_label_removes_services_and_containers_on_every_node(
    make_sandbox: SandboxFactory, swarm_lab: SwarmLab, swarm_backend: Swarm, marker: str, swarm_image: str
) -> None:
    selector = f"{LABEL}={marker}"
    ours = await asyncio.gather(*(make_sandbox() for _ in range(3)))
    assert len({placement(c).node_name for c in ours}) == 3
    # A sandbox of another marker stays.
    other = await make_sandbox(labels={LABEL: f"{marker}-other"})
    assert all(node_containers(swarm_lab, selector)[placement(c).node_name] for c in ours)

    removed = await swarm_backend.remove_all([selector])
    assert sorted(removed) == sorted(placement(c).name for c in ours)
    assert swarm_lab.docker("service", "ls", "-q", "--filter", f"label={selector}") == ""
    deadline = time.monotonic() + 15
    while (left := {n: ids for n, ids in node_containers(swarm_lab, selector).items() if ids}) and (
        time.monotonic() < deadline
    ):
        await asyncio.sleep(0.2)
    assert left == {}, f"containers left on nodes after remove_all: {left}"
    assert (await execute(other, "print(6 * 7)")).text == "42"
    for container in ours:
        await container.kill()  # already gone: kill() is quiet


# -- 6. files -------------------------------------------------------------------------------------------------


async def test_upload_read_in_cell_download(make_sandbox: SandboxFactory, tmp_path: Path) -> None:
    container = await make_sandbox()
    data = secrets.token_bytes(300_000)
    source, back = tmp_path / "in.bin", tmp_path / "out.bin"
    source.write_bytes(data)
    async with ResourceClient(port=container.resource_port, host=container.host) as resources:
        await resources.upload_file("data/in.bin", source)
        result = await execute(
            container,
            "import hashlib\nblob = open('data/in.bin', 'rb').read()\n"
            "print(len(blob), hashlib.sha256(blob).hexdigest())\n"
            "_ = open('data/out.bin', 'wb').write(blob[::-1])",
        )
        assert result.text == f"{len(data)} {hashlib.sha256(data).hexdigest()}"
        await resources.download_file("data/out.bin", back)
    assert back.read_bytes() == data[::-1]


# -- 7. MCP generation ------------------------------------------------------------------------------------------

# A stdio server for the user environment's own `python` (mcp 1.x there): needs no network.
MCP1_SERVER = """
from mcp.server.fastmcp import FastMCP

mcp = FastMCP("swarmtest")


@mcp.tool()
def shout(text: str) -> str:
    \"\"\"Upper-cases text.\"\"\"
    return text.upper() + "!"


@mcp.tool()
def add(a: int, b: int) -> int:
    \"\"\"Adds two numbers.\"\"\"
    return a + b


mcp.run()
"""

REPO_SERVER = Path(__file__).parent.parent / "mcp_server" / "server.py"


async def test_mcp_generation_for_a_stdio_server_in_the_sandbox(make_sandbox: SandboxFactory, tmp_path: Path) -> None:
    container = await make_sandbox()
    (tmp_path / "server.py").write_text(MCP1_SERVER)
    async with ResourceClient(port=container.resource_port, host=container.host) as resources:
        await resources.upload_file("mcp_t1_server.py", tmp_path / "server.py")
        params = {"command": "python", "args": ["/app/mcp_t1_server.py"]}
        assert sorted(await resources.generate_mcp_sources("mcpgen", "swarmtest", params)) == ["add", "shout"]
        sources = await resources.get_mcp_sources("mcpgen", "swarmtest")
    assert "def shout(params: Params) -> str:" in sources["shout"]
    result = await execute(
        container,
        "from mcpgen.swarmtest import add, shout\n"
        "print(shout.shout(shout.Params(text='swarm')))\n"
        "print(add.add(add.Params(a=2, b=40)))",
    )
    assert (result.text or "").splitlines() == ["SWARM!", "42"]


async def test_mcp_generation_with_uvx_from_pypi(make_sandbox: SandboxFactory) -> None:
    """The repository's test server (mcp 2.x) through `uvx --with mcp==2.3.0`: the node's task downloads
    from the package index through the node's NAT, as a sandbox of a real swarm would."""
    container = await make_sandbox()
    async with ResourceClient(port=container.resource_port, host=container.host) as resources:
        await resources.upload_file("mcp_test_server.py", REPO_SERVER)
        params = {"command": "uvx", "args": ["--with", "mcp==2.3.0", "python", "/app/mcp_test_server.py"]}
        modules = await resources.generate_mcp_sources("mcpgen", "testsrv", params)
    assert {"echo", "get_weather"} <= set(modules)
    result = await execute(container, "from mcpgen.testsrv import echo\nprint(echo.echo(echo.Params(text='hi')))")
    assert result.text == "hi"


# -- 8. isolation between sandboxes, and from the control plane ---------------------------------------------------

SERVE = """
import socket, threading
server = socket.create_server(("0.0.0.0", 9999))
def serve():
    while True:
        conn, _ = server.accept()
        conn.sendall(b"hello-from-a\\n")
        conn.close()
threading.Thread(target=serve, daemon=True).start()
with socket.create_connection(("127.0.0.1", 9999), timeout=3) as s:
    print(s.recv(100).decode().strip())
"""

PROBE = """
import socket
def probe(host, port):
    try:
        with socket.create_connection((host, port), timeout=3) as s:
            s.settimeout(3)
            try:
                return "open:" + s.recv(100).decode(errors="replace").strip()
            except OSError:
                return "open"
    except OSError as exc:
        return type(exc).__name__
gateway = next(line.split()[2] for line in open("/proc/net/route").readlines()[1:] if line.split()[1] == "00000000")
gateway = socket.inet_ntoa(bytes.fromhex(gateway)[::-1])
targets = {targets!r} + [(gateway, 2375), (gateway, 2377)]
for host, port in targets:
    print(f"{{host}}:{{port}}", probe(host, port))
"""


async def _container_ip(container: ExecutionContainer) -> str:
    return str((await container._container.show())["NetworkSettings"]["IPAddress"])


@pytest.mark.parametrize("firewall", [False, True], ids=["isolated", "firewalled"])
async def test_sandboxes_cannot_reach_each_other_or_the_control_plane(
    make_sandbox: SandboxFactory, swarm_lab: SwarmLab, swarm_backend: Swarm, firewall: bool
) -> None:
    def on(node: str) -> Swarm:
        return Swarm(swarm_lab.manager_url, swarm_lab.engine_urls, constraints=[f"node.hostname=={node}"])

    a, b_same, b_other = await asyncio.gather(
        make_sandbox(backend=on("node2")), make_sandbox(backend=on("node2")), make_sandbox(backend=on("node3"))
    )
    assert [placement(c).node_name for c in (a, b_same, b_other)] == ["node2", "node2", "node3"]
    a_ip = await _container_ip(a)
    targets = [(a_ip, 9999), (a.host, 9999)]
    control = sorted({2375, 2377, *swarm_backend.protected_ports()})
    targets += [(ip, port) for ip in swarm_lab.node_ips.values() for port in control]
    # The server lives as long as a's kernel: a's client stays connected while b probes.
    async with ExecutionClient(port=a.executor_port, host=a.host) as a_client:
        assert (await a_client.execute(SERVE)).text == "hello-from-a"  # the server is up (seen from inside a)
        for b in (b_same, b_other):
            if firewall:
                await b.init_firewall([])
            text = (await execute(b, PROBE.format(targets=targets))).text or ""
            lines = dict(line.split(" ", 1) for line in text.splitlines())
            opened = {target: outcome for target, outcome in lines.items() if outcome.startswith("open")}
            assert opened == {}, f"{placement(b).node_name} reached {opened}"
            assert len(lines) == len(targets) + 2
        probe_a = PROBE.format(targets=[("127.0.0.1", 9999)])
        assert "127.0.0.1:9999 open:hello-from-a" in ((await a_client.execute(probe_a)).text or "")
    # The host still reaches every sandbox (its clients, through the nodes' published ports).
    for container in (a, b_same, b_other):
        assert (await execute(container, "print('still here')")).text == "still here"
    assert set(swarm_backend.protected_ports()) >= {2375, 2377, 7946}


# -- 9. the firewall ----------------------------------------------------------------------------------------------


async def test_firewall_blocks_and_allows_the_lab_registry(make_sandbox: SandboxFactory, swarm_lab: SwarmLab) -> None:
    container = await make_sandbox()
    registry_ip = swarm_lab.registry.split(":")[0]
    fetch = (
        "import urllib.request\n"
        "try:\n"
        f"    print(urllib.request.urlopen('http://{swarm_lab.registry}/v2/', timeout=5).status)\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    assert (await execute(container, fetch)).text == "200"  # reachable before: the firewall is what blocks it
    await container.init_firewall([])
    blocked = (await execute(container, fetch)).text or ""
    assert blocked.startswith("URLError") and ("refused" in blocked or "reset" in blocked), blocked
    await container.init_firewall([registry_ip])
    assert (await execute(container, fetch)).text == "200"


# -- 10. pause and resume -----------------------------------------------------------------------------------------


async def test_pause_resume_keeps_a_running_cell(make_sandbox: SandboxFactory, swarm_lab: SwarmLab) -> None:
    container = await make_sandbox()
    node = placement(container).node_name
    state = ["inspect", "-f", "{{.State.Status}}", container.container_id or ""]
    async with ExecutionClient(port=container.executor_port, host=container.host) as client:
        execution = await client.submit(
            "import time\nfor i in range(8):\n    print(i, flush=True)\n    time.sleep(0.25)"
        )
        await asyncio.sleep(0.6)
        await container.pause()
        assert container.paused and swarm_lab.docker(*state, node=node) == "paused"
        await asyncio.sleep(2)
        await container.resume()
        assert not container.paused and swarm_lab.docker(*state, node=node) == "running"
        result = await execution.result(timeout=30)
    assert (result.text or "").splitlines() == [str(i) for i in range(8)]


# -- 11. snapshot, restore and fork onto the swarm ------------------------------------------------------------


async def test_snapshot_restore_and_fork_onto_the_swarm(
    make_sandbox: SandboxFactory, swarm_backend: Swarm, swarm_lab: SwarmLab, marker: str, tmp_path: Path
) -> None:
    source = await make_sandbox()
    async with ExecutionClient(port=source.executor_port, host=source.host) as client:
        await client.execute(
            "import pathlib\npathlib.Path('notes.txt').write_text('kept')\n"
            "class Box:\n    def __init__(self, v): self.v = v\nbox = Box(41)\ndef bump(b): return b.v + 1"
        )
        snap = await source.snapshot(tmp_path / "snap", clients=[client])
    labels = {LABEL: marker}
    restored = await ExecutionContainer.restore(snap, backend=swarm_backend, labels=labels, startup_timeout=180)
    forks = []
    try:
        result = await restored.client.execute("print(bump(box), open('notes.txt').read())")
        assert result.text == "42 kept"
        forks = await snap.fork(2, backend=swarm_backend, labels=labels, startup_timeout=180)
        await forks[0].client.execute("box.v = 0")
        assert (await forks[1].client.execute("print(bump(box))")).text == "42"
        assert (await forks[0].client.execute("print(bump(box))")).text == "1"
        for sandbox in [restored, *forks]:
            assert isinstance(sandbox.container._placement, SwarmPlacement)
    finally:
        await asyncio.gather(*(s.close() for s in [restored, *forks]), return_exceptions=True)
    # Closing them removed their services: only the source's is left.
    services = swarm_lab.docker("service", "ls", "-q", "--filter", f"label={LABEL}={marker}")
    assert [placement(source).service_id.startswith(s) for s in services.split()] == [True]


# -- 12. attach from another process, by service name or container id ---------------------------------------

ATTACH_CHILD = """
import asyncio, json, sys
from ipybox import ExecutionClient, ExecutionContainer, Swarm

async def main():
    manager, engines, name, kernel_id = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
    container = await ExecutionContainer.attach(name, backend=Swarm(manager, engines))
    try:
        assert kernel_id in await container.kernel_ids()
        async with ExecutionClient(port=container.executor_port, host=container.host, kernel_id=kernel_id) as client:
            print((await client.execute("x += 1; print(x)")).text, container.container_id)
            await client.disconnect(shutdown=False)
    finally:
        await container.detach()

asyncio.run(main())
"""


async def test_attach_from_another_process_then_kill_removes_the_service(
    make_sandbox: SandboxFactory, swarm_backend: Swarm, swarm_lab: SwarmLab, marker: str
) -> None:
    import json
    import subprocess
    import sys

    from ipybox import ContainerError

    container = await make_sandbox()
    made = placement(container)
    client = ExecutionClient(port=container.executor_port, host=container.host)
    await client.connect()
    await client.execute("x = 41")
    kernel_id = client.kernel_id or ""
    await client.disconnect(shutdown=False)

    argv = [sys.executable, "-c", ATTACH_CHILD, swarm_lab.manager_url, json.dumps(swarm_lab.engine_urls)]
    done = await asyncio.to_thread(
        subprocess.run, [*argv, made.name, kernel_id], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["42", container.container_id]

    # This process, by a prefix of the task's container id: the node is named in its errors, and
    # kill() removes the service as the starter's would.
    attached = await ExecutionContainer.attach((container.container_id or "")[:12], backend=swarm_backend)
    assert attached.host == container.host and attached.executor_port == container.executor_port
    assert placement(attached).node_name == made.node_name
    async with ExecutionClient(port=attached.executor_port, host=attached.host, kernel_id=kernel_id) as again:
        assert (await again.execute("print(x)")).text == "42"
    await attached.kill()
    services = swarm_lab.docker("service", "ls", "-q", "--filter", f"label={LABEL}={marker}")
    assert services.split() == []
    with pytest.raises(ContainerError, match="no running ipybox sandbox"):
        await ExecutionContainer.attach(made.name, backend=swarm_backend)


async def test_ps_swarm_lists_the_sandbox_on_its_node_with_its_kernels(
    make_sandbox: SandboxFactory, swarm_lab: SwarmLab
) -> None:
    import json
    import subprocess
    import sys

    container = await make_sandbox()
    async with ExecutionClient(port=container.executor_port, host=container.host):
        engines = [f"--node-engine={name}={url}" for name, url in swarm_lab.engine_urls.items()]
        argv = [sys.executable, "-m", "ipybox", "ps", "--json", "--swarm", swarm_lab.manager_url, *engines]
        done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = {row["id"]: row for row in json.loads(done.stdout)}
    row = rows[container.container_id or ""]
    assert row["node"] == placement(container).node_name and row["host"] == container.host
    assert row["executor_port"] == container.executor_port and row["state"] == "running"
    assert row["kernels"] == 1 and row["attachable"] is True
    assert row["memory"] is None  # a node's pid means nothing on this host: never read here
    table = await asyncio.to_thread(subprocess.run, argv[:4] + argv[5:], capture_output=True, text=True, timeout=120)
    assert "NODE" in table.stdout.splitlines()[0] and placement(container).node_name in table.stdout


async def test_pause_resume_and_snapshot_take_by_cli_on_the_swarm(
    make_sandbox: SandboxFactory, swarm_lab: SwarmLab, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from ipybox import Snapshot

    container = await make_sandbox()
    node = placement(container).node_name
    engines = [f"--node-engine={name}={url}" for name, url in swarm_lab.engine_urls.items()]
    on_swarm = ["--swarm", swarm_lab.manager_url, *engines]

    def ipybox(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ipybox", *args], capture_output=True, text=True, timeout=120)

    state = ["inspect", "-f", "{{.State.Status}}", container.container_id or ""]
    done = await asyncio.to_thread(ipybox, "pause", placement(container).name, *on_swarm)
    assert done.returncode == 0, done.stderr
    assert swarm_lab.docker(*state, node=node) == "paused"
    done = await asyncio.to_thread(ipybox, "resume", (container.container_id or "")[:12], *on_swarm)
    assert done.returncode == 0, done.stderr
    assert swarm_lab.docker(*state, node=node) == "running"
    async with ExecutionClient(port=container.executor_port, host=container.host) as client:
        await client.execute("y = 7")
        await client.disconnect(shutdown=False)  # the kernel stays, for the snapshot to find
        target = tmp_path / "snap"
        done = await asyncio.to_thread(
            ipybox, "snapshot", "take", placement(container).name, "--path", str(target), *on_swarm
        )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(target)
    assert "y" in Snapshot.load(target).kernels[0].captured
