"""Snapshots against real containers: files and namespaces round trip, the report of what was left out,
binds left out, fork independence, pooled restores, and corrupt snapshots refused before any load."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import aiodocker
import pytest

from ipybox import ExecutionClient, ExecutionContainer, SandboxPool
from ipybox import _snapshot_format as fmt
from ipybox._errors import SnapshotError
from ipybox.snapshot import Snapshot, fork, restore, snapshot
from tests.integration.conftest import ContainerFactory, session_labels

NAMESPACE = r"""
import io, math, os, socket, threading
import numpy as np
import pandas as pd

df = pd.DataFrame({"a": np.arange(1000), "b": np.linspace(0, 1, 1000)})
alias = df
k = 3
def f(x):
    return x * k
class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y
    def norm(self):
        return math.hypot(self.x, self.y)
p = Point(3, 4)
sq = lambda v: v * v
class Refuses:
    def __reduce__(self):
        raise RuntimeError("not today")
bad = Refuses()
gen = (i for i in range(3))
sock = socket.socket()
lock = threading.Lock()
th = threading.Thread(target=lambda: None)
fh = open("/app/open.txt", "w")
os.makedirs("/app/sub", exist_ok=True)
with open("/app/sub/data.txt", "w") as out:
    out.write("hello")
"""

CHECK = (
    "print(int(df.a.sum()), alias is df, f(2), p.norm(), type(p).__name__, sq(3), np.__name__, pd.__name__, "
    "open('sub/data.txt').read(), [n for n in ('gen', 'sock', 'lock', 'th', 'fh', 'bad', 'out') if n in dir()])"
)
EXPECTED = "499500 True 6 5.0 Point 9 numpy pandas hello []"


@pytest.fixture(autouse=True)
def _key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPYBOX_SNAPSHOT_KEY_FILE", str(tmp_path / "key" / "snapshot.key"))


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "snapshots"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def _containers() -> list[str]:
    docker = aiodocker.Docker()
    try:
        selector = [f"{key}={value}" for key, value in session_labels().items()]
        return [c.id for c in await docker.containers.list(all=True, filters={"label": selector})]
    finally:
        await docker.close()


async def _snapshot_of(
    make_container: ContainerFactory, path: Path, code: str = NAMESPACE, **options: object
) -> Snapshot:
    container = await make_container(**options)
    async with ExecutionClient(port=container.executor_port) as client:
        await client.execute(code)
        return await snapshot(container, path, clients=[client])


async def test_round_trip_of_files_and_namespace(make_container: ContainerFactory, work: Path) -> None:
    container = await make_container()
    async with ExecutionClient(port=container.executor_port) as client:
        await client.execute(NAMESPACE)
        before = await client.execute("print(get_ipython().execution_count)")
        snap = await snapshot(container, work / "s", clients=[client])
        # Silent: no execution count used, nothing in the history.
        after = await client.execute("print(get_ipython().execution_count)")
        assert int(after.text) == int(before.text) + 1
    assert snap.path == work / "s" and (work / "s" / "manifest.hmac").exists()
    assert not list(work.glob("*.partial-*"))
    report = snap.kernels[0]
    assert {"df", "alias", "f", "Point", "p", "sq", "k"} <= set(report.captured)
    assert report.modules["np"] == "numpy" and report.modules["pd"] == "pandas"
    assert set(snap.skipped) == {"gen", "sock", "lock", "th", "fh", "bad", "out"}
    assert "running frame" in snap.skipped["gen"]
    assert "open connection" in snap.skipped["sock"]
    assert "lock" in snap.skipped["lock"]
    assert "thread" in snap.skipped["th"]
    assert "open file" in snap.skipped["fh"]
    assert "closed file" in snap.skipped["out"]
    assert "not today" in snap.skipped["bad"]
    members = tarfile.open(work / "s" / "files.tar").getnames()
    assert "sub/data.txt" in members and not any(".ipybox-snapshot" in name for name in members)

    async with await restore(snap, labels=session_labels()) as sandbox:
        result = await sandbox.client.execute(CHECK)
        assert result.text == EXPECTED


async def test_binds_under_app_are_left_out(make_container: ContainerFactory, work: Path, tmp_path: Path) -> None:
    host = tmp_path / "bound"
    host.mkdir()
    (host / "hostfile.txt").write_text("from the host")
    os.chmod(host, 0o777)
    snap = await _snapshot_of(
        make_container, work / "s", "x = 1\nopen('own.txt', 'w').write('mine')", binds={str(host): "data"}
    )
    members = tarfile.open(snap.path / "files.tar").getnames()
    assert "own.txt" in members
    assert not [name for name in members if name.startswith("data")]
    async with await restore(snap, labels=session_labels()) as sandbox:
        result = await sandbox.client.execute("import os; print(x, os.path.exists('data'), open('own.txt').read())")
        assert result.text == "1 False mine"


async def test_forks_are_independent(make_container: ContainerFactory) -> None:
    container = await make_container()
    async with ExecutionClient(port=container.executor_port) as client:
        await client.execute("x = []\nopen('f.txt', 'w').write('base')")
        forks = await fork(container, 3, clients=[client], labels=session_labels())
        try:
            for index, sandbox in enumerate(forks):
                await sandbox.client.execute(f"x.append({index})\nopen('f.txt', 'w').write('fork{index}')")
            for index, sandbox in enumerate(forks):
                result = await sandbox.client.execute("print(x, open('f.txt').read())")
                assert result.text == f"[{index}] fork{index}"
            ids = {sandbox.container.container_id for sandbox in forks}
            assert len(ids) == 3 and container.container_id not in ids
            source = await client.execute("print(x, open('f.txt').read())")
            assert source.text == "[] base"
        finally:
            for sandbox in forks:
                await sandbox.close()


async def test_pool_fork_restores_into_pooled_sandboxes(
    image: str, make_container: ContainerFactory, work: Path
) -> None:
    snap = await _snapshot_of(make_container, work / "s", "y = {'a': 1}\nopen('p.txt', 'w').write('pooled')")
    async with SandboxPool(2, tag=image, labels=session_labels()) as pool:
        await pool.wait_ready(timeout=120)
        sandboxes = await pool.fork(snap, 2)
        try:
            assert len(sandboxes) == 2
            for sandbox in sandboxes:
                result = await sandbox.client.execute("print(y['a'], open('p.txt').read())")
                assert result.text == "1 pooled"
        finally:
            for sandbox in sandboxes:
                await sandbox.close()
        await pool.wait_ready(timeout=120)  # refilled once the restores were done
        one = await pool.restore(snap.path)
        async with one:
            assert (await one.client.execute("print(y)")).text == "{'a': 1}"
            await one.client.execute("y['b'] = 2")
            again = await one.snapshot(work / "again")
    async with await again.restore(labels=session_labels()) as sandbox:
        assert (await sandbox.client.execute("print(y)")).text == "{'a': 1, 'b': 2}"


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _edit_manifest(snap: Path) -> None:
    manifest = json.loads((snap / "manifest.json").read_text())
    manifest["options"]["memory_limit"] = 1
    (snap / "manifest.json").write_text(json.dumps(manifest))


def _other_key(snap: Path) -> None:
    os.environ["IPYBOX_SNAPSHOT_KEY_FILE"] = str(snap.parent / "other.key")


CORRUPTIONS = {
    "flipped byte in the pickle": (lambda s: _flip(s / "kernels" / "0.pkl"), "does not match its checksum"),
    "flipped byte in files.tar": (lambda s: _flip(s / "files.tar"), "does not match its checksum"),
    "truncated pickle": (lambda s: _truncate(s / "kernels" / "0.pkl"), "truncated"),
    "edited manifest": (_edit_manifest, "fails its integrity check"),
    "missing hmac": (lambda s: (s / "manifest.hmac").unlink(), "not a complete snapshot"),
    "missing pickle": (lambda s: (s / "kernels" / "0.pkl").unlink(), "kernels/0.pkl is missing"),
    "another user's key": (_other_key, "no snapshot key"),
}

# A value whose unpickling leaves a marker in a bind: it shows whether a load ever ran.
MARKER = """
import os
class Marker:
    def __reduce__(self):
        return (os.makedirs, ("/app/out/loaded",))
m = Marker()
"""


@pytest.mark.parametrize("case", list(CORRUPTIONS))
async def test_corrupt_snapshot_is_refused_before_any_load(
    case: str, make_container: ContainerFactory, work: Path, tmp_path: Path
) -> None:
    snap = await _snapshot_of(make_container, work / "s", MARKER + "\nopen('a.txt', 'w').write('x' * 100000)")
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o777)
    corrupt, message = CORRUPTIONS[case]
    corrupt(snap.path)
    before = await _containers()
    with pytest.raises(SnapshotError, match=message):
        sandbox = await restore(snap.path, labels=session_labels(), binds={str(out): "out"})
        await sandbox.close()
    assert not (out / "loaded").exists()
    assert await _containers() == before  # the sandbox started meanwhile is gone


async def test_intact_snapshot_runs_its_load(make_container: ContainerFactory, work: Path, tmp_path: Path) -> None:
    # The control of the test above: the marker does appear when the snapshot is intact.
    snap = await _snapshot_of(make_container, work / "s", MARKER)
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o777)
    async with await restore(snap, labels=session_labels(), binds={str(out): "out"}):
        assert (out / "loaded").is_dir()


async def test_other_image_is_refused(make_container: ContainerFactory, work: Path) -> None:
    snap = await _snapshot_of(make_container, work / "s", "z = 1")
    manifest = dict(snap._manifest)
    manifest["image"] = {"tag": snap.image["tag"], "id": "sha256:" + "0" * 64}
    resealed = work / "r"
    shutil.copytree(snap.path, work / "r.partial-x")
    fmt.seal(work / "r.partial-x", resealed, manifest)
    before = await _containers()
    with pytest.raises(SnapshotError, match="was made in image"):
        await restore(resealed, labels=session_labels())
    assert await _containers() == before


async def test_load_failure_names_the_module(make_container: ContainerFactory, work: Path) -> None:
    # mymod comes from /app and is gone before the snapshot: the new sandbox cannot import it.
    code = "open('mymod.py', 'w').write('v = 1')\nimport mymod, os\nos.remove('mymod.py')\nw = 2"
    snap = await _snapshot_of(make_container, work / "s", code)
    assert snap.kernels[0].modules == {"mymod": "mymod", "os": "os"}
    before = await _containers()
    with pytest.raises(SnapshotError, match="module 'mymod'"):
        await restore(snap, labels=session_labels())
    assert await _containers() == before


async def test_a_missing_distribution_is_named_with_its_version(make_container: ContainerFactory, work: Path) -> None:
    # A package installed with pip in a cell is not part of the snapshot: the restore into a fresh
    # sandbox must say which distribution (and version) to install. Before: only the module's name.
    code = (
        "import subprocess, sys\n"
        "subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', 'einops==0.8.1'], check=True)\n"
        "from einops import EinopsError\n"
        "err = EinopsError('kept')"
    )
    snap = await _snapshot_of(make_container, work / "s", code)
    assert snap.kernels[0].distributions.get("einops") == "0.8.1"
    with pytest.raises(SnapshotError, match=r"needs module 'einops'.*`pip install einops==0\.8\.1`"):
        await restore(snap, labels=session_labels())


async def test_full_app_is_a_clear_error_and_leaves_nothing(make_container: ContainerFactory, work: Path) -> None:
    container = await make_container(app_size="16m")
    async with ExecutionClient(port=container.executor_port) as client:
        await client.execute("big = bytes(32 * 2**20)")
        with pytest.raises(SnapshotError, match="No space left in /app"):
            await snapshot(container, work / "s", clients=[client])
        left = await client.execute("import glob; print(glob.glob('/app/.ipybox-snapshot-*'), len(big))")
        assert left.text == f"[] {32 * 2**20}"
    assert list(work.iterdir()) == []


async def test_every_kernel_of_a_container_by_default(make_container: ContainerFactory, work: Path) -> None:
    container = await make_container()
    async with ExecutionClient(port=container.executor_port) as first:
        await first.execute("who = 'first'")
        async with ExecutionClient(port=container.executor_port) as second:
            await second.execute("who = 'second'")
            snap = await snapshot(container, work / "s")  # no clients: the gateway's kernels
            assert (await first.execute("print(who)")).text == "first"  # still connected and working
    assert len(snap.kernels) == 2
    async with await restore(snap, labels=session_labels()) as sandbox:
        assert len(sandbox.clients) == 2
        seen = [(await client.execute("print(who)")).text for client in sandbox.clients]
        assert sorted(seen) == ["first", "second"]


async def test_snapshot_of_a_paused_sandbox_leaves_it_paused(make_container: ContainerFactory, work: Path) -> None:
    container = await make_container()
    async with ExecutionClient(port=container.executor_port) as client:
        await client.execute("v = 7")
        await container.pause()
        try:
            snap = await snapshot(container, work / "s", clients=[client])
            assert container.paused
        finally:
            await container.resume()
        assert snap.kernels[0].captured == ["v"]
        assert (await client.execute("print(v)")).text == "7"


async def test_limits_recorded_from_the_engine_and_restored(make_container: ContainerFactory, work: Path) -> None:
    container = await make_container(memory_limit="1g", pids_limit=300, env={"SECRET": "do-not-store"})
    attached = await ExecutionContainer.attach(container.container_id or "")  # an object with default limits
    try:
        snap = await snapshot(attached, work / "s", clients=[])
    finally:
        await attached.detach()
    options = snap._manifest["options"]
    assert (options["memory_limit"], options["pids_limit"], options["app_size"]) == (2**30, 300, 2**29)
    assert "do-not-store" not in (snap.path / "manifest.json").read_text()
    assert snap.kernels == []
    async with await restore(snap, labels=session_labels()) as sandbox:
        assert (sandbox.container._memory_limit, sandbox.container._pids_limit) == (2**30, 300)


async def test_archive_query_options_are_checked(make_container: ContainerFactory) -> None:
    from ipybox.resource.client import ResourceClient

    container = await make_container()
    async with ResourceClient(port=container.resource_port) as resources:
        link = resources._connected()
        async with link.session.get("/directories/", params={"exclude_mounts": "yes"}) as response:
            assert response.status == 400 and "exclude_mounts" in (await response.json())["error"]
        params = [("exclude", "../x"), ("exclude", "/abs"), ("exclude", "")]
        async with link.session.get("/directories/", params=params) as response:
            assert response.status == 200  # names no member has leave nothing out


TINY_SERVER = """
from mcp.server.fastmcp import FastMCP

server = FastMCP("tiny")


@server.tool()
def greet(name: str) -> str:
    return "hello " + name


server.run("stdio")
"""
TINY_PARAMS = {"command": "python", "args": ["/app/tiny_server.py"]}
GREET = "from tools.tiny.greet import greet, Params\nprint(greet(Params(name='fork')))"


async def test_mcp_registrations_are_named_and_restored_from_the_params_given(
    image: str, make_container: ContainerFactory, work: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: a restored sandbox's generated packages failed ("no MCP server 'tiny' is registered") and
    nothing said so; params are still never stored (they may hold secrets)."""
    from ipybox import InvalidServerParamsError, ResourceClient

    container = await make_container()
    async with ExecutionClient(port=container.executor_port) as client:
        await client.execute(f"open('/app/tiny_server.py', 'w').write({TINY_SERVER!r})")
        async with ResourceClient(port=container.resource_port) as resources:
            await resources.generate_mcp_sources("tools", "tiny", TINY_PARAMS)
        assert (await client.execute(GREET, timeout=120)).text == "hello fork"
        snap = await snapshot(container, work / "s", clients=[client])
    assert snap.mcp_servers == ["tiny"]
    assert "tiny_server.py" not in json.dumps(snap._manifest)  # no params in the manifest

    before = set(await _containers())
    with pytest.raises(InvalidServerParamsError, match=r"mcp_servers\['tiny'\]"):
        await restore(snap, labels=session_labels(), mcp_servers={"tiny": {"command": ""}})
    assert set(await _containers()) == before  # refused before anything started

    with caplog.at_level("WARNING", logger="ipybox.snapshot"):
        async with await restore(snap, labels=session_labels()) as bare:
            failed = await bare.client.execute(
                GREET.replace("print(", "try:\n    print(") + "\nexcept Exception as e:\n    print(type(e).__name__, e)"
            )
    assert "ToolServerError tiny.greet: no MCP server 'tiny' is registered" in (failed.text or "")
    assert "restore(..., mcp_servers=" in (failed.text or "")
    assert "mcp_servers" in caplog.text and "tiny" in caplog.text

    async with await restore(snap, labels=session_labels(), mcp_servers={"tiny": TINY_PARAMS}) as restored:
        assert (await restored.client.execute(GREET, timeout=120)).text == "hello fork"

    async with SandboxPool(1, tag=image, labels=session_labels()) as pool:
        async with await pool.restore(snap, mcp_servers={"tiny": TINY_PARAMS}) as pooled:
            assert (await pooled.client.execute(GREET, timeout=120)).text == "hello fork"
