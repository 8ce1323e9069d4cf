"""The `ipybox` command line against real containers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import aiodocker
import pytest

from ipybox import ExecutionContainer
from tests.integration.conftest import ContainerFactory, session_labels

IPYBOX = [sys.executable, "-m", "ipybox"]


def _run(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run([*IPYBOX, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def test_run_prints_output(image: str) -> None:
    done = _run("run", "-t", image, "x = 6\nprint(x * 7)")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "42\n"


def test_run_file_saves_images(image: str, tmp_path: Path) -> None:
    script = tmp_path / "plot.py"
    script.write_text(
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3])\nplt.show()\n"
        "plt.plot([3, 2, 1])\nplt.show()\n"
        "print('two plots')\n"
    )
    out = tmp_path / "images"
    done = _run("run", "-t", image, "-f", str(script), "--images-dir", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "two plots\n"
    saved = sorted(p.name for p in out.iterdir())
    assert saved == ["ipybox-image-1.png", "ipybox-image-2.png"]
    assert str(out / "ipybox-image-1.png") in done.stderr
    assert (out / "ipybox-image-1.png").read_bytes().startswith(b"\x89PNG")


def test_run_error_exits_non_zero_with_trace(image: str) -> None:
    done = _run("run", "-t", image, "print('partial')\n1 / 0")
    assert done.returncode == 1
    assert "ZeroDivisionError: division by zero" in done.stderr
    assert "\x1b[" not in done.stderr


def test_run_needs_code_or_file() -> None:
    done = _run("run")
    assert done.returncode == 2
    assert "either CODE or -f FILE" in done.stderr


def test_module_entry_point_lists_commands() -> None:
    done = _run("--help")
    assert done.returncode == 0
    for command in ("build", "run", "cleanup"):
        assert command in done.stdout


async def test_cleanup_removes_labelled_containers(image: str) -> None:
    container = ExecutionContainer(tag=image, labels=session_labels(case="cleanup"))
    await container.run()
    try:
        done = _run("cleanup")
        assert done.returncode == 0, done.stderr
        assert "removed" in done.stderr
        docker = aiodocker.Docker()
        try:
            left = await docker.containers.list(all=True, filters={"label": ["ai.gradion.ipybox.container"]})
        finally:
            await docker.close()
        assert left == []
    finally:
        await container.kill()  # already gone: kill stays quiet


async def test_cleanup_by_ancestor_removes_unlabelled_containers(image: str) -> None:
    docker = aiodocker.Docker()
    try:
        # A container from the image that ipybox did not start (no ipybox label).
        foreign = await docker.containers.create({"Image": image, "Cmd": ["sleep", "60"], "Labels": session_labels()})
        done = _run("cleanup", "-a", image)
        assert done.returncode == 0, done.stderr
        with pytest.raises(aiodocker.DockerError):
            await docker.containers.get(foreign.id)
    finally:
        await docker.close()


async def test_snapshot_take_ls_rm(
    make_container: ContainerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import json

    from ipybox import ExecutionClient

    monkeypatch.setenv("IPYBOX_SNAPSHOT_KEY_FILE", str(tmp_path / "snapshot.key"))
    directory = tmp_path / "snapshots"
    container = await make_container()
    async with ExecutionClient(port=container.executor_port) as client:
        await client.execute("import socket\nanswer = 42\nopen_socket = socket.socket()")
        assert container.container_id is not None
        took = await asyncio.to_thread(
            _run, "snapshot", "take", container.container_id[:12], "--path", str(directory / "first")
        )
        assert took.returncode == 0, took.stderr
        assert took.stdout.strip() == str(directory / "first")
        assert "not captured: open_socket" in took.stderr
        assert (await client.execute("print(answer)")).text == "42"  # the sandbox and its kernel carry on
    listed = await asyncio.to_thread(_run, "snapshot", "ls", "--dir", str(directory), "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert row["id"] == "first" and row["kernels"] == 1 and "open_socket" in row["skipped"]
    missing = await asyncio.to_thread(_run, "snapshot", "rm", "first", "nothing-here", "--dir", str(directory))
    assert missing.returncode == 1 and "nothing-here: no snapshot there" in missing.stderr
    assert (directory / "first").is_dir()  # one bad name: nothing deleted
    removed = await asyncio.to_thread(_run, "snapshot", "rm", "first", "--dir", str(directory))
    assert removed.returncode == 0, removed.stderr
    assert not (directory / "first").exists()
    assert "first" not in (await asyncio.to_thread(_run, "snapshot", "ls", "--dir", str(directory))).stdout
