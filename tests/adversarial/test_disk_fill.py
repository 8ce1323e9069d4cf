"""Disk fill (issue #6): /app and /tmp are size-capped tmpfs. Filling either gives ENOSPC at the cap;
the kernel and the file API keep working and recover once the filler is gone; nothing lands in the
container's writable layer on the host's disk; binds under /app still work on top of the tmpfs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from ipybox import ExecutionClient, ExecutionContainer, KernelDiedError, ResourceClient, ResourceError

MIB = 2**20
CAP = "64m"

FILL = """
import errno, os, time
written, start = 0, time.monotonic()
fd = os.open({path!r}, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
try:
    while True:
        written += os.write(fd, b'x' * 2**20)
except OSError as e:
    print(e.errno, written, round(time.monotonic() - start, 3))
finally:
    os.close(fd)
"""

SHMEM = """
stat = '/sys/fs/cgroup/memory/memory.stat'  # cgroup v1; v2 has /sys/fs/cgroup/memory.stat
if not os.path.exists(stat):
    stat = '/sys/fs/cgroup/memory.stat'
values = dict(line.split() for line in open(stat))
print(int(values.get('total_shmem', values.get('shmem', 0))))
"""


async def _writable_layer(container: ExecutionContainer) -> tuple[int, int | None]:
    """The container's writable-layer size per Docker (SizeRw) and, when readable, `du` of its upper dir."""
    assert container.container_id is not None
    docker = aiodocker.Docker()
    try:
        info: dict[str, Any] = await (await docker.containers.get(container.container_id)).show(size=1)
    finally:
        await docker.close()
    upper = (info.get("GraphDriver") or {}).get("Data", {}).get("UpperDir")
    du = None
    if upper and os.access(upper, os.R_OK):
        du = int(subprocess.run(["du", "-sb", upper], capture_output=True, text=True, check=True).stdout.split()[0])
    return int(info.get("SizeRw") or 0), du


async def _fill(client: ExecutionClient, path: str) -> tuple[int, int, float]:
    errno_, written, seconds = (await client.execute(FILL.format(path=path), timeout=60)).text.split()  # type: ignore[union-attr]
    return int(errno_), int(written), float(seconds)


async def test_app_fill_stops_at_the_cap_and_everything_recovers(make_container, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    host_dir = tmp_path / "bind"  # missing: ipybox creates it for the sandbox user
    container = await make_container(app_size=CAP, tmp_size=CAP, binds={str(host_dir): "data"})
    layer_before = await _writable_layer(container)
    local = tmp_path / "upload.bin"
    local.write_bytes(os.urandom(MIB))
    async with ExecutionClient(port=container.executor_port) as client:
        mounts = (await client.execute("print(open('/proc/mounts').read())")).text or ""
        app_mount = next(line for line in mounts.splitlines() if line.split()[1] == "/app").split()
        assert app_mount[2] == "tmpfs" and "noexec" not in app_mount[3] and "nosuid" in app_mount[3], app_mount
        assert any(line.split()[1] == "/app/data" for line in mounts.splitlines()), mounts

        start = time.monotonic()
        errno_, written, seconds = await _fill(client, "/app/filler")
        detected = time.monotonic() - start
        assert errno_ == 28, errno_  # ENOSPC
        assert 60 * MIB <= written <= 64 * MIB, written
        assert detected < 10, f"ENOSPC after {detected:.1f} s"
        # The filler is memory of the container (tmpfs pages), not host disk.
        assert int((await client.execute("import os\n" + SHMEM)).text or 0) >= 60 * MIB

        async with ResourceClient(port=container.resource_port) as resources:
            # A full /app: the upload fails at once with a 507 that says why and what to do, leaves no
            # temp file, and the servers stay up.
            start = time.monotonic()
            with pytest.raises(ResourceError) as info:
                await asyncio.wait_for(resources.upload_file("upload.bin", local), 10)
            assert time.monotonic() - start < 10
            assert info.value.status == 507, info.value
            assert "no space left" in str(info.value) and "app_size" in str(info.value)
            assert (await client.execute("print(sorted(os.listdir('/app')))")).text == "['data', 'filler']"
            assert (await resources.status())["status"] == "ok"
            # The running kernel and a new one both work while /app is full.
            assert (await client.execute("print('alive')")).text == "alive"
            async with ExecutionClient(port=container.executor_port) as second:
                assert (await second.execute("print(1 + 1)")).text == "2"
            # A bind under /app is the host directory, on top of the tmpfs.
            await client.execute("open('/app/data/from-sandbox.txt', 'w').write('hello host')")
            assert (host_dir / "from-sandbox.txt").read_text() == "hello host"

            await client.execute("os.remove('/app/filler')")
            await resources.upload_file("upload.bin", local)
            await resources.download_file("upload.bin", tmp_path / "back.bin")
            assert (tmp_path / "back.bin").read_bytes() == local.read_bytes()
            assert (await client.execute("print(os.path.getsize('/app/upload.bin'))")).text == str(MIB)

    size_rw_after, du_after = await _writable_layer(container)
    # 64 MiB went through /app: none of it reached the writable layer (allow 1 MiB of kernel state).
    assert size_rw_after - layer_before[0] < MIB, (layer_before, size_rw_after)
    if du_after is not None and layer_before[1] is not None:
        assert du_after - layer_before[1] < MIB, (layer_before, du_after)


async def test_tmp_fill_stops_at_the_cap_and_everything_recovers(make_container, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    container = await make_container(app_size=CAP, tmp_size=CAP)
    layer_before = await _writable_layer(container)
    local = tmp_path / "upload.bin"
    local.write_bytes(os.urandom(MIB))
    async with ExecutionClient(port=container.executor_port) as client:
        start = time.monotonic()
        errno_, written, _ = await _fill(client, "/tmp/filler")
        assert errno_ == 28 and 60 * MIB <= written <= 64 * MIB, (errno_, written)
        assert time.monotonic() - start < 10
        # /tmp full: the kernel, a new kernel and the file API (which writes to /app) are unaffected.
        assert (await client.execute("print('alive')")).text == "alive"
        async with ExecutionClient(port=container.executor_port) as second:
            assert (await second.execute("print(1 + 1)")).text == "2"
        async with ResourceClient(port=container.resource_port) as resources:
            await resources.upload_file("upload.bin", local)
        await client.execute("import os\nos.remove('/tmp/filler')")
        assert (await client.execute("open('/tmp/ok', 'w').write('x'); print(open('/tmp/ok').read())")).text == "x"
    size_rw_after, _ = await _writable_layer(container)
    assert size_rw_after - layer_before[0] < MIB, (layer_before, size_rw_after)


@pytest.mark.parametrize("directory", ["$HOME", "/var/tmp", "/run/lock"])
async def test_other_writable_directories_are_capped_and_off_the_host_disk(make_container, directory: str) -> None:  # type: ignore[no-untyped-def]
    container = await make_container(app_size=CAP, tmp_size=CAP)
    before, _ = await _writable_layer(container)
    async with ExecutionClient(port=container.executor_port) as client:
        path = (await client.execute(f"import os\nprint(os.path.expandvars({directory!r}))")).text
        assert path and path.startswith("/"), path
        errno_, written, _ = await _fill(client, f"{path}/filler")
        assert errno_ == 28 and 60 * MIB <= written <= 64 * MIB, (errno_, written)
        # `pip install --user` and caches still work in $HOME (executable: ~/.local/bin scripts run).
        await client.execute(f"import os\nos.remove('{path}/filler')")
        if directory == "$HOME":
            script = await client.execute(
                "import os, subprocess\nbin = os.path.expanduser('~/.local/bin'); os.makedirs(bin, exist_ok=True)\n"
                "open(bin + '/hello', 'w').write('#!/bin/sh\\necho hello from home\\n')\n"
                "os.chmod(bin + '/hello', 0o755)\n"
                "print(subprocess.run([bin + '/hello'], capture_output=True, text=True).stdout.strip())"
            )
            assert script.text == "hello from home"
    after, _ = await _writable_layer(container)
    assert after - before < MIB, (before, after)


async def test_without_app_size_app_is_the_writable_layer(make_container) -> None:  # type: ignore[no-untyped-def]
    # The documented opt-out: no cap, and what /app holds lands on the host's disk.
    container = await make_container(app_size=None, tmp_size=CAP)
    before, _ = await _writable_layer(container)
    async with ExecutionClient(port=container.executor_port) as client:
        mounts = (await client.execute("print(open('/proc/mounts').read())")).text or ""
        assert not any(line.split()[1] == "/app" for line in mounts.splitlines()), mounts
        await client.execute("open('/app/eight', 'wb').write(b'x' * 8 * 2**20)")
    after, _ = await _writable_layer(container)
    assert after - before >= 7 * MIB, (before, after)  # 8 MiB, give or take files the server removed


async def test_a_cap_beyond_the_memory_limit_ends_in_an_oom_kill_not_enospc(make_container) -> None:  # type: ignore[no-untyped-def]
    # The trade-off of tmpfs (ExecutionContainer logs a warning for this configuration): the pages
    # count as memory, so with app_size > memory_limit the memory limit is reached first.
    container = await make_container(memory_limit="160m", app_size="256m", tmp_size=CAP)
    async with ExecutionClient(port=container.executor_port) as client:
        start = time.monotonic()
        with pytest.raises(KernelDiedError, match="out of memory"):
            await client.execute(FILL.format(path="/app/filler"), timeout=60)
        assert time.monotonic() - start < 15
        async with ResourceClient(port=container.resource_port) as resources:
            # The filler survives the kernel; deleting it through the file API frees the memory.
            await resources.delete_file("filler")
        assert (await client.execute("print('alive')")).text == "alive"
