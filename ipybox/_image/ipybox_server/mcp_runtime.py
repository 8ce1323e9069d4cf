"""Runtime of generated MCP tool modules, in the kernel: stdlib only, whatever the user environment holds.

Generated modules call `call_tool(SERVER_PARAMS, TOOL_NAME, params[, output])` from kernel code. The
kernel runs in the user environment, where the user may have installed any `mcp` (or none) and any
pydantic, so the MCP call itself happens in a helper process of ipybox's own interpreter,
`python -I -m ipybox_server.mcp_call` (mcp 2.x), one per calling thread, kept for the thread's (or
the kernel's) life: the SDK's import is paid once. Requests and answers are JSON lines over pipes
(see `mcp_call`). Interrupting the kernel during a call kills the helper's process group (the helper
and a stdio server it started) and re-raises the interrupt; the next call starts a new helper.

What a call returns (`tool_value`):

- an error result (`isError`) raises `ToolError` with the result's text, as does an MCP error;
- `output=None` (the tool declares no output schema): the result's text content, blocks joined by
  newlines (`echo: hi`);
- `output=dict`: the structured content as JSON data; `output=<pydantic model>`: the structured content
  validated into that model (pydantic 2's `model_validate`, or pydantic 1's `parse_obj`). A result
  without structured content gives its text.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from typing import Any

MACHINERY_PYTHON = "/opt/ipybox/venv/bin/python"
"""ipybox's own interpreter (mcp 2.x): the helper runs there, isolated (`-I`) from the user's packages."""


class ToolError(Exception):
    """An MCP tool reported an error (an `isError` result or an MCP error); the message is the server's.

    Generated packages re-export it: `from <package> import ToolError`.
    """


class ToolCallError(RuntimeError):
    """An MCP tool call got no result: the server could not be started or reached, or the helper failed."""


def arguments_of(params: Any) -> dict[str, Any]:
    """The JSON arguments of a `Params` model: only fields that were set, by alias (pydantic 2 or 1)."""
    if isinstance(params, dict):
        return params
    dump = getattr(params, "model_dump", None)
    if dump is not None:
        result: dict[str, Any] = dump(mode="json", by_alias=True, exclude_unset=True)
        return result
    # pydantic 1 (after a user's `pip install 'pydantic<2'`): .json() encodes dates, enums, ... as JSON.
    loaded: dict[str, Any] = json.loads(params.json(by_alias=True, exclude_unset=True))
    return loaded


def tool_value(answer: dict[str, Any], output: Any = None) -> Any:
    """What a generated function returns for the helper's `answer` (see the module docstring).

    Raises:
        ToolError: an error result or an MCP error.
        ToolCallError: the call got no result.
    """
    if "error" in answer:
        if answer.get("kind") == "tool":
            raise ToolError(answer["error"])
        raise ToolCallError(f"the MCP tool call failed: {answer['error']}")
    result = answer["result"]
    text = str(result.get("text") or "")
    if result.get("is_error"):
        raise ToolError(text or "the MCP tool reported an error without a message")
    structured = result.get("structured")
    if output is None or structured is None:
        return text
    if output is dict:
        return structured
    validate = getattr(output, "model_validate", None) or output.parse_obj
    return validate(structured)


_helpers = threading.local()


def _helper() -> subprocess.Popen[bytes]:
    process: subprocess.Popen[bytes] | None = getattr(_helpers, "process", None)
    if process is None or process.poll() is not None:
        process = subprocess.Popen(
            [MACHINERY_PYTHON, "-I", "-m", "ipybox_server.mcp_call"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: an interrupt kills it and the server it started
        )
        _helpers.process = process
    return process


def _kill(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def request(server_params: dict[str, Any], tool_name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """One call through this thread's helper; the helper's answer (see `mcp_call`)."""
    line = json.dumps({"server_params": server_params, "tool_name": tool_name, "arguments": arguments})
    process = _helper()
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(line.encode() + b"\n")
        process.stdin.flush()
        reply = process.stdout.readline()
    except BaseException:  # an interrupt (KeyboardInterrupt) or a broken pipe: the helper's state is unknown
        _kill(process)
        raise
    if not reply:
        code = process.wait()
        raise ToolCallError(f"the MCP call helper ({MACHINERY_PYTHON} -m ipybox_server.mcp_call) exited with {code}")
    answer: dict[str, Any] = json.loads(reply)
    return answer


def call_tool(server_params: dict[str, Any], tool_name: str, params: Any, output: Any = None) -> Any:
    """Call MCP tool `tool_name` with a `Params` model (or a dict of JSON arguments).

    Args:
        output: None for the result's text; `dict` for its structured content as JSON data; a pydantic
            model class to validate the structured content into.

    Raises:
        ToolError: the tool reported an error (message from the server).
        ToolCallError: the server could not be started or reached, or failed.
    """
    return tool_value(request(server_params, tool_name, arguments_of(params)), output)
