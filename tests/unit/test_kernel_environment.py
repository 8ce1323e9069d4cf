"""Server-side pieces of the two environments: the spare kernel, kernel paths, the /modules search path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ipybox" / "_image"))

from ipybox_server import modules, prewarm  # noqa: E402


@pytest.mark.parametrize(
    "argv",
    [
        ["/opt/ipybox/user-venv/bin/python", "-I", "-m", "ipybox_server.kernel_launcher", "-f", "{connection_file}"],
        ["python", "-m", "ipybox_server.kernel_launcher", "-f", "{connection_file}"],
        ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    ],
)
def test_the_spare_stands_in_for_the_standard_kernel_isolated_or_not(argv: list[str]) -> None:
    assert prewarm._is_standard_kernel(argv)


@pytest.mark.parametrize(
    "argv", [["python", "-I", "-m", "other_kernel"], ["python", "-I"], ["/usr/bin/R", "--slave", "-e", "x"]]
)
def test_other_kernels_get_no_spare(argv: list[str]) -> None:
    assert not prewarm._is_standard_kernel(argv)


def test_the_spare_runs_the_user_environment_isolated() -> None:
    assert prewarm.KERNEL_PYTHON == "/opt/ipybox/user-venv/bin/python"


def test_add_user_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel_app = pytest.importorskip("ipybox_server.kernel_app")
    monkeypatch.setattr(sys, "path", ["/usr/lib/python3.11", "/app"])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/app", "/extra", ""]))
    kernel_app.add_user_paths()
    # As a plain `python` would have it: cwd, then PYTHONPATH, then the rest (no duplicates).
    assert sys.path == ["", "/extra", "/usr/lib/python3.11", "/app"]


def test_modules_search_the_kernel_interpreters_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "only_in_user_env.py").write_text("Z = 1\n")
    calls = []

    def fake_run(argv: list[str], **kwargs: object) -> object:
        calls.append(argv)
        return type("Done", (), {"stdout": f'["", "{site}"]'})()

    monkeypatch.setattr(modules, "_cached", None)
    monkeypatch.setattr(modules.subprocess, "run", fake_run)
    assert modules.find_source_file("only_in_user_env") == site / "only_in_user_env.py"
    assert modules.find_source_file("only_in_user_env") is not None
    assert calls == [[modules.KERNEL_PYTHON, "-I", "-c", modules._SYS_PATH_SCRIPT]]  # asked once
    (site / "new_pkg").mkdir()  # an install changed the directory: asked again
    modules.find_source_file("new_pkg")
    assert len(calls) == 2
