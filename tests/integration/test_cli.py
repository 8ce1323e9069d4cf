"""The `ipybox` command line against real containers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import aiodocker
import pytest

from ipybox import ExecutionContainer
from tests.integration.conftest import session_labels

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
