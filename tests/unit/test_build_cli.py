"""build_command: plain progress lines off a terminal, one-line errors and exit code 1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer

from ipybox import build_cli
from ipybox._build import BuildEvent
from ipybox._errors import BuildError, DependencyFileError


async def fake_build(tag: str, **kwargs: Any) -> str:
    kwargs["on_progress"](BuildEvent("base", "Using local base image b"))
    kwargs["on_progress"](BuildEvent("build", "Step 3/14 : RUN x", 3, 14))
    return "sha256:" + "a" * 64


def test_plain_progress_lines_and_success(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    seen: dict[str, Any] = {}

    async def build(tag: str, **kwargs: Any) -> str:
        seen.update(kwargs, tag=tag)
        return await fake_build(tag, **kwargs)

    monkeypatch.setattr(build_cli, "build_image", build)
    monkeypatch.setenv("IPYBOX_BASE_IMAGE", "from-env:1")
    build_cli.build_command("t", None, False, "")
    out, err = capsys.readouterr()
    assert out == ""  # stdout belongs to the sandbox's output
    assert "[base] Using local base image b" in err
    assert "[build] Step 3/14 : RUN x" in err
    assert "Built image t" in err
    assert seen["base_image"] == "from-env:1"
    assert seen["root"] is False


def test_error_is_one_line_and_exit_1(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    async def failing(tag: str, **kwargs: Any) -> str:
        raise DependencyFileError("deps.txt", 2, "bad line", "Expected end")

    monkeypatch.setattr(build_cli, "build_image", failing)
    with pytest.raises(typer.Exit) as info:
        build_cli.build_command("t", Path("deps.txt"), False, "b")
    assert info.value.exit_code == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: deps.txt, line 2: 'bad line' is not a valid requirement: Expected end"


def test_build_log_tail_follows_the_error_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def failing(tag: str, **kwargs: Any) -> str:
        raise BuildError("Building t failed at Step 2/2 : RUN x: code 1\nLast build output:\n[x] not markup")

    monkeypatch.setattr(build_cli, "build_image", failing)
    with pytest.raises(typer.Exit):
        build_cli.build_command("t", None, False, "b")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "error: Building t failed at Step 2/2 : RUN x: code 1"
    assert lines[-1] == "[x] not markup"
