"""What `ipybox mcp` tells an agent about outcomes: an execution that did not run, a missing host file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ipybox import ExecutionAbortedError
from ipybox._mcp_session import Sandbox, SandboxOptions
from ipybox.mcp_server import create_server


class AbortingSandbox:
    """Stands in for the MCP server's sandbox: every execution was skipped by the kernel."""

    async def execute(self, code: str, timeout: float, max_output_chars: int | None) -> Any:
        raise ExecutionAbortedError(
            "the execution did not run: kernel k skipped it because an earlier execution failed "
            "(ZeroDivisionError: division by zero)",
            kernel_id="k",
        )


async def test_an_aborted_cell_is_an_error_that_says_it_did_not_run() -> None:
    server = create_server(AbortingSandbox())  # type: ignore[arg-type]
    result = await server.call_tool("execute_ipython_cell", {"code": "x = 1"})
    assert getattr(result, "is_error", False)
    text = result.content[0].text  # type: ignore[union-attr]
    assert "did not run" in text and "ZeroDivisionError" in text, text


async def test_uploading_a_missing_host_file_says_it_does_not_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = Sandbox(SandboxOptions(tag="t", allowed_dirs=[tmp_path]))

    class Unreachable:
        """No sandbox: the host file is opened, and found missing, before any request."""

        def _connected(self) -> None:
            return None

    async def ready() -> tuple[None, Unreachable]:
        return None, Unreachable()

    monkeypatch.setattr(sandbox, "ready", ready)
    with pytest.raises(FileNotFoundError, match="File not found: .*does not exist"):
        await sandbox.upload("x.txt", str(tmp_path / "missing.txt"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        await sandbox.upload("x.txt", str(tmp_path / "folder"))
    await sandbox.close()
