"""Twenty sandboxes started and used at once from one process, some failing or cancelled: all removed.

Each sandbox runs a few cells (state across cells), and moves files both ways through its resource
server. Afterwards nothing of any of them may remain: no container with the test's label, no token
file or in-process secret, no temporary file, no listener on their host ports, no asyncio task.
"""

from __future__ import annotations

import asyncio
import hashlib
import resource
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiodocker
import pytest

from ipybox import ExecutionClient, ExecutionContainer, ResourceClient, _tokens
from tests.integration.conftest import session_labels

SANDBOXES = 20
# Twenty concurrent starts on a small machine (2 cores here) are slower than one; the default 30 s
# held in measurement, this only keeps a slow CI runner from failing on start-up time alone.
STARTUP_TIMEOUT = 90
# The whole gather is bounded, so a hang is a failure, not a stuck suite.
GATHER_TIMEOUT = 240


class SimulatedFailure(Exception):
    """What a task raises in the middle of its `async with` block."""


@dataclass
class Run:
    """What the tasks of one gather recorded, for the checks afterwards."""

    case: str
    workdir: Path
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    ports: set[int] = field(default_factory=set)
    container_ids: set[str] = field(default_factory=set)
    tempdirs: set[Path] = field(default_factory=set)
    up: int = 0
    all_up_at: float | None = None
    listening_while_up: set[int] = field(default_factory=set)
    tokens_while_up: set[int] = field(default_factory=set)


def _payload(index: int) -> bytes:
    # Distinct per task, with every byte value in it (binary-safe round trip), and not tiny.
    seed = hashlib.sha256(f"sandbox-{index}".encode()).digest()
    return bytes(range(256)) + seed * 2048


def _listening_ports() -> set[int]:
    """TCP ports in LISTEN state on this host (IPv4 and IPv6), from /proc."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] == "0A":  # TCP_LISTEN
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def _bindable(port: int) -> bool:
    """A server could listen on 127.0.0.1:port now (SO_REUSEADDR: TIME_WAIT leftovers don't count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen(1)
        except OSError:
            return False
        return True


async def _sandbox(run: Run, image: str, index: int, *, fail: bool = False, hang: bool = False) -> int:
    """One sandbox's life. `fail`: raise in the middle of the block; `hang`: block in a cell until cancelled."""
    workdir = Path(tempfile.mkdtemp(prefix=f"sandbox-{index}-", dir=run.workdir))
    run.tempdirs.add(workdir)
    try:
        async with ExecutionContainer(
            tag=image, labels=session_labels(case=run.case), startup_timeout=STARTUP_TIMEOUT
        ) as container:
            assert container.container_id is not None
            run.container_ids.add(container.container_id)
            ports = {container.executor_port, container.resource_port}
            run.ports |= ports
            run.up += 1
            run.tokens_while_up |= {port for port in ports if _tokens.lookup("localhost", port) is not None}
            if run.up == SANDBOXES:
                run.all_up_at = time.monotonic()
                run.listening_while_up = _listening_ports() & run.ports
                run.entered.set()
            # All twenty are running before any is used: the clients really work side by side.
            await asyncio.wait_for(run.entered.wait(), STARTUP_TIMEOUT)

            async with ExecutionClient(port=container.executor_port) as client:
                await client.execute(f"index = {index}\nimport hashlib")
                result = await client.execute("total = sum(i * i for i in range(index * 1000))\nprint(index, total)")
                assert result.text == f"{index} {sum(i * i for i in range(index * 1000))}"

                async with ResourceClient(port=container.resource_port) as files:
                    # Host -> sandbox -> host, and the kernel sees exactly what was uploaded.
                    upload = workdir / "upload.bin"
                    upload.write_bytes(_payload(index))
                    await files.upload_file(f"in/{index}.bin", upload)
                    seen = await client.execute(
                        f"print(hashlib.sha256(open('/app/in/{index}.bin', 'rb').read()).hexdigest())"
                    )
                    assert seen.text == hashlib.sha256(_payload(index)).hexdigest()

                    if fail:
                        raise SimulatedFailure(index)
                    if hang:
                        await client.execute("import time\ntime.sleep(600)", timeout=900)
                        raise AssertionError("the hanging cell returned")

                    await files.download_file(f"in/{index}.bin", workdir / "back.bin")
                    assert (workdir / "back.bin").read_bytes() == _payload(index)

                    # A file the kernel writes, from state of earlier cells.
                    await client.execute(
                        "import os\n"
                        "os.makedirs('/app/out', exist_ok=True)\n"
                        "with open(f'/app/out/{index}.bin', 'wb') as f:\n"
                        "    f.write(bytes(range(256)) * (index + 1) + str(total).encode())"
                    )
                    await files.download_file(f"out/{index}.bin", workdir / "written.bin")
                    expected = bytes(range(256)) * (index + 1) + str(sum(i * i for i in range(index * 1000))).encode()
                    assert (workdir / "written.bin").read_bytes() == expected

                    # Atomic downloads leave no partial or temporary file next to their target.
                    assert sorted(p.name for p in workdir.iterdir()) == ["back.bin", "upload.bin", "written.bin"]
        return index
    finally:
        for path in sorted(workdir.iterdir(), reverse=True):
            path.unlink()
        workdir.rmdir()


def _memory_used() -> int:
    """Host memory in use (MemTotal - MemAvailable), in KiB."""
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])


async def _sample_memory(peak: list[int], stop: asyncio.Event) -> None:
    """Records the peak of `_memory_used()`, sampled every 0.25 s until `stop`."""
    while not stop.is_set():
        peak[0] = max(peak[0], _memory_used())
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except TimeoutError:
            pass


async def _gather(run: Run, image: str, *, failing: set[int], hanging: int | None) -> tuple[list[object], float]:
    tasks = [
        asyncio.create_task(_sandbox(run, image, index, fail=index in failing, hang=index == hanging))
        for index in range(SANDBOXES)
    ]
    if hanging is not None:

        async def cancel_when_hanging() -> None:
            # Cancel once every sandbox is up and the hanging cell has had time to start.
            await run.entered.wait()
            await asyncio.sleep(3)
            tasks[hanging].cancel()

        canceller = asyncio.create_task(cancel_when_hanging())
    start = time.monotonic()
    try:
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), GATHER_TIMEOUT)
    finally:
        if hanging is not None:
            canceller.cancel()
            await asyncio.gather(canceller, return_exceptions=True)
    return results, start


async def _check_nothing_left(run: Run, token_dir: Path, tmp_dir: Path, tasks_before: set[asyncio.Task]) -> None:
    # Positive controls first: the checks below would pass vacuously if nothing had been started.
    assert len(run.container_ids) == SANDBOXES, "not every sandbox started"
    assert len(run.ports) == 2 * SANDBOXES, "host ports were shared between sandboxes"
    assert run.tokens_while_up == run.ports, "a running sandbox had no secret registered"
    assert run.listening_while_up == run.ports, "the published ports were not listening while the sandboxes ran"

    docker = aiodocker.Docker()
    try:
        left = await docker.containers.list(all=True, filters={"label": [f"case={run.case}"]})
        assert not left, f"{len(left)} container(s) left behind: {[c.id[:12] for c in left]}"
        for container_id in run.container_ids:
            with pytest.raises(aiodocker.DockerError) as info:
                await docker.containers.get(container_id)
            assert info.value.status == 404
        # Ports docker has published for containers not of this test (another suite's, running in
        # parallel, may get a port freed here): those are not leftovers of ours.
        others = {
            int(port["PublicPort"])
            for container in await docker.containers.list(all=True)
            for port in container["Ports"]
            if "PublicPort" in port
        }
    finally:
        await docker.close()

    ours = run.ports - others
    assert not (_listening_ports() & ours), "a host port still has a listener"
    assert all(_bindable(port) for port in ours), "a host port cannot be bound again"

    for port in run.ports:
        assert _tokens.lookup("localhost", port) is None, f"secret of port {port} still known"
    assert not list(token_dir.iterdir()), f"token files left: {sorted(p.name for p in token_dir.iterdir())}"

    assert not any(path.exists() for path in run.tempdirs)
    assert not list(tmp_dir.iterdir()), f"temporary files left: {sorted(p.name for p in tmp_dir.iterdir())}"

    await asyncio.sleep(0.1)  # let closed connections finish their callbacks
    stray = {task for task in asyncio.all_tasks() if not task.done()} - tasks_before - {asyncio.current_task()}
    assert not stray, f"asyncio tasks left running: {stray}"


@pytest.fixture
def private_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Token files and temporary files of this test only, so that leftovers can be counted exactly."""
    token_dir, tmp_dir = tmp_path / "run", tmp_path / "tmp"
    tmp_dir.mkdir()
    monkeypatch.setenv("IPYBOX_RUNTIME_DIR", str(token_dir))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_dir))
    assert _tokens.token_dir() == token_dir
    return token_dir, tmp_dir


@pytest.mark.parametrize(
    ("failing", "hanging"),
    [
        pytest.param(set(), None, id="all-succeed"),
        pytest.param({1, 6, 9, 13, 17}, 4, id="5-fail-1-cancelled"),
    ],
)
async def test_twenty_concurrent_sandboxes_leave_nothing_behind(
    image: str, private_dirs: tuple[Path, Path], failing: set[int], hanging: int | None
) -> None:
    token_dir, tmp_dir = private_dirs
    run = Run(case=uuid.uuid4().hex, workdir=Path(tempfile.mkdtemp(prefix="concurrency-")))
    tasks_before = set(asyncio.all_tasks())
    peak, stop = [0], asyncio.Event()
    baseline = _memory_used()
    sampler = asyncio.create_task(_sample_memory(peak, stop))
    try:
        results, start = await _gather(run, image, failing=failing, hanging=hanging)
        end = time.monotonic()
    finally:
        stop.set()
        await sampler
        run.workdir.rmdir()

    for index, outcome in enumerate(results):
        if index in failing:
            assert isinstance(outcome, SimulatedFailure), (index, outcome)
        elif index == hanging:
            assert isinstance(outcome, asyncio.CancelledError), (index, outcome)
        else:
            assert outcome == index, (index, outcome)

    await _check_nothing_left(run, token_dir, tmp_dir, tasks_before | {sampler})

    assert run.all_up_at is not None
    print(
        f"\n{SANDBOXES} concurrent starts: all up after {run.all_up_at - start:.1f} s, gather done after "
        f"{end - start:.1f} s; host memory in use peaked {(peak[0] - baseline) / 1024:.0f} MiB above "
        f"the start; test process max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )


async def test_sandboxes_cancelled_while_starting_leave_nothing_behind(
    image: str, private_dirs: tuple[Path, Path]
) -> None:
    """Twenty starts, each cancelled at a different point of `run()`: create, secret, start, readiness."""
    token_dir, tmp_dir = private_dirs
    case = uuid.uuid4().hex
    containers = [
        ExecutionContainer(tag=image, labels=session_labels(case=case), startup_timeout=STARTUP_TIMEOUT)
        for _ in range(SANDBOXES)
    ]

    async def start_and_cancel(container: ExecutionContainer, delay: float) -> str:
        task = asyncio.create_task(container.run())
        await asyncio.sleep(delay)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        await container.kill()  # started before the cancel arrived: an ordinary exit
        return "started"

    docker = aiodocker.Docker()
    try:
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(start_and_cancel(c, index * 0.03) for index, c in enumerate(containers))),
            GATHER_TIMEOUT,
        )
        # A create request whose caller was cancelled may still be completing in the engine.
        await asyncio.sleep(2)
        left = await docker.containers.list(all=True, filters={"label": [f"case={case}"]})
        states = sorted(container["State"] for container in left)
        for container in left:  # remove them here, so that only this test reports them
            await container.delete(force=True, v=True)
    finally:
        await docker.close()

    assert "cancelled" in outcomes, "no start was cancelled: the delays missed run() entirely"
    assert not left, f"{len(left)} of {SANDBOXES} cancelled starts left a container behind, states {states}"
    assert not token_dir.exists() or not list(token_dir.iterdir()), "token files left behind"
    assert not list(tmp_dir.iterdir())
